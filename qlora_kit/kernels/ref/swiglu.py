"""Torch twin of kernels/swiglu.py.

Traffic for n elements: forward reads 2n*s and writes n*s; backward reads 3n*s (gate, up, dy) and
writes 2n*s. bench counts GB/s as 3 * n * sizeof(dtype) / t forward, 5 * n * sizeof(dtype) / t backward.
"""
import torch
import torch.nn.functional as F


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y = silu(gate) * up = gate * sigmoid(gate) * up (Shazeer 2020), in gate.dtype.

    silu is computed in fp32 and rounded to gate.dtype, then the product is rounded again: the order of Hugging
    Face's LlamaMLP and of models/llama.py's MLP, which calls this through kernels.swiglu.
    """
    return F.silu(gate) * up
