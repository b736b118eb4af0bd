"""The fastest exact CPU paths of kernels whose torch twin (kernels/ref/) is the readable oracle; each is tested
against its twin. The 4-bit kernels are C compiled at first use (_build.py, nf4.c); LoRA is grouped torch (lora.py)."""
from .capability import matmul_dtype, native_16bit_matmul
from .lora import lora_cpu, lora_multi_cpu
from .nf4 import available, dequant_cpu, nf4_matmul_cpu, supports

__all__ = ["available", "dequant_cpu", "lora_cpu", "lora_multi_cpu", "matmul_dtype", "native_16bit_matmul",
           "nf4_matmul_cpu", "supports"]
