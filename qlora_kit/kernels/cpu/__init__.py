"""The fastest exact CPU paths of kernels whose torch twin (kernels/ref/) is the readable oracle; each is tested
against its twin. The C kernels are compiled at first use (_build.py): nf4.c (4-bit dequant and GEMM, the 16-bit
weight GEMM of dense.py) and lora.c (multi-adapter LoRA rows for inference); training's LoRA is grouped torch
(lora.py)."""
from .capability import matmul_dtype, native_16bit_matmul
from .dense import linear16, linear16_ref
from .lora import lora_cpu, lora_multi_cpu, lora_multi_group_cpu
from .nf4 import available, dequant_cpu, nf4_matmul_cpu, supports

__all__ = ["available", "dequant_cpu", "linear16", "linear16_ref", "lora_cpu", "lora_multi_cpu", "lora_multi_group_cpu",
           "matmul_dtype", "native_16bit_matmul", "nf4_matmul_cpu", "supports"]
