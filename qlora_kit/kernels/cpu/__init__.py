"""The fast exact CPU path of the 4-bit kernels (C, compiled at first use; see _build.py)."""
from .capability import matmul_dtype, native_16bit_matmul
from .nf4 import available, dequant_cpu, nf4_matmul_cpu, supports

__all__ = ["available", "dequant_cpu", "matmul_dtype", "native_16bit_matmul", "nf4_matmul_cpu", "supports"]
