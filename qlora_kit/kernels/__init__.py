"""Triton kernels, each beside a pure-torch twin in kernels/ref/. CUDA tensors run Triton, CPU tensors torch."""
from ._device import MIN_CAPABILITY
from ._dispatch import BackendError, use_triton
from .adamw8bit import adamw8bit, adamw8bit_multi
from .cross_entropy import chunked_cross_entropy
from .dequant import dequant
from .lora import lora, lora_multi, lora_multi_group
from .nf4_matmul import nf4_matmul
from .rmsnorm import rmsnorm
from .rope import rope
from .swiglu import swiglu

__all__ = ["MIN_CAPABILITY", "BackendError", "adamw8bit", "adamw8bit_multi", "chunked_cross_entropy", "dequant", "lora",
           "lora_multi", "lora_multi_group", "nf4_matmul", "rmsnorm", "rope", "swiglu", "use_triton"]
