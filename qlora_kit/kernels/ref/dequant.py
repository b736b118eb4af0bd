"""Torch twin of kernels/dequant.py.

Traffic per element: reads 0.5 byte of codes + (absmax: 4 / B bytes, or 1 / B + 4 / (256 B) with
double quant) and writes sizeof(dtype); bench/dequant.py counts GB/s as (n / 2 + n * sizeof(dtype)) / t.
"""
import torch

from qlora_kit.formats import Packed4bit, dequantize_4bit


def dequant_ref(packed: Packed4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W'_i = Q[code_i] * absmax_k in fp32, cast to `dtype` (FORMAT.md §2.3); the codec is the reference."""
    return dequantize_4bit(packed, dtype)
