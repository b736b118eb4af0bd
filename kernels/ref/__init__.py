"""Pure-torch twins of the Triton kernels: test oracles and the CPU path."""
from .dequant import dequant_ref

__all__ = ["dequant_ref"]
