"""The fast exact CPU path of the 4-bit kernels (C, compiled at first use; see _build.py)."""
from .nf4 import available, dequant_cpu, nf4_matmul_cpu, supports

__all__ = ["available", "dequant_cpu", "nf4_matmul_cpu", "supports"]
