"""Optimizers for LoRA training: AdamW with 32-bit or blockwise 8-bit states, each optionally paged."""
from .adamw import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from .paging import PageStreamer
from .qmaps import signed_dynamic_map, unsigned_dynamic_map

__all__ = ["AdamW", "AdamW8bit", "PageStreamer", "PagedAdamW", "PagedAdamW8bit", "signed_dynamic_map",
           "unsigned_dynamic_map"]
