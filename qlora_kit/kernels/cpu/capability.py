"""Whether this CPU multiplies 16-bit matrices natively (AMX, AVX-512 BF16/FP16).

Where it does, oneDNN's bf16/fp16 GEMMs are the fast path; where it does not (e.g. an AVX2-only CPU), torch
emulates them and an fp32 GEMM over the same 16-bit values is many times faster while giving the same products
(each 16-bit value is exact in fp32; accumulation is fp32 either way, only its order differs).
"""
from functools import cache

import torch

from ._build import _cpu_features

_FLAGS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}


@cache
def native_16bit_matmul(dtype: torch.dtype) -> bool:
    """True when `dtype` matmuls run on native CPU instructions here (False for fp32 and unknown CPUs)."""
    flags = set(_cpu_features().split())
    return any(f in flags for f in _FLAGS.get(dtype, ()))


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a CPU matmul of `dtype` operands should run in: itself where native, else fp32."""
    return dtype if dtype == torch.float32 or native_16bit_matmul(dtype) else torch.float32
