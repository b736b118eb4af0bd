"""Pure-torch twins of the Triton kernels: test oracles and the CPU path."""
from .adamw8bit import adamw8bit_ref
from .cross_entropy import chunked_cross_entropy_ref
from .dequant import dequant_ref
from .lora import lora_multi_group_ref, lora_multi_ref, lora_ref
from .nf4_matmul import nf4_matmul_ref
from .rmsnorm import rmsnorm_ref
from .rope import rope_ref
from .swiglu import swiglu_ref

__all__ = [
    "adamw8bit_ref", "chunked_cross_entropy_ref", "dequant_ref", "lora_multi_group_ref", "lora_multi_ref", "lora_ref",
    "nf4_matmul_ref", "rmsnorm_ref", "rope_ref", "swiglu_ref",
]
