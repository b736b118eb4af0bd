"""Triton kernels, each beside a pure-torch twin in kernels/ref/. CUDA tensors run Triton, CPU tensors torch."""
from ._dispatch import BackendError, use_triton
from .dequant import dequant

__all__ = ["BackendError", "dequant", "use_triton"]
