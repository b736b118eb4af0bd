"""Torch twin of kernels/swiglu.py.

Traffic for n elements: forward reads 2n*s and writes n*s; backward reads 3n*s (gate, up, dy) and
writes 2n*s. bench counts GB/s as 3 * n * sizeof(dtype) / t forward, 5 * n * sizeof(dtype) / t backward.
"""
import torch


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y = silu(gate) * up = gate * sigmoid(gate) * up (Shazeer 2020), in fp32, cast to gate.dtype."""
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)
