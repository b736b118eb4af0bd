"""CPU implementations of kernels whose torch twin (kernels/ref/) is the readable oracle but not the fastest exact
path; each is tested against its twin."""
from .lora import lora_cpu, lora_multi_cpu

__all__ = ["lora_cpu", "lora_multi_cpu"]
