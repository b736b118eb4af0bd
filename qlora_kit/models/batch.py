"""The per-step input of the decoder: token ids plus everything that varies per row or per step.

Trainer and server both build a `Batch`; nothing about a step lives in module globals.
"""
from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Batch:
    """One forward step.

    Args:
        input_ids: (B, T) long.
        positions: (B, T) long RoPE positions; None = derived (see `resolved_positions`).
        adapter_ids: (B,) long LoRA adapter per row, -1 = base model only; None = every row base only.
        attention_mask: (B, T) bool/int, 1 = real token, 0 = padding (left or right); None = no padding.
        segment_ids: (B, T) long document id per token for packed rows: a token attends only to earlier
            tokens of the same segment; None = one segment per row.
        cache: a KVCache (models.attention) holding earlier steps' keys/values, or None.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor | None = None
    adapter_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    cache: object | None = None

    def __post_init__(self):
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got {tuple(self.input_ids.shape)}")
        shape = tuple(self.input_ids.shape)
        for name in ("positions", "attention_mask", "segment_ids"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} must have input_ids' shape {shape}, got {tuple(t.shape)}")
        if self.adapter_ids is not None and tuple(self.adapter_ids.shape) != (shape[0],):
            raise ValueError(f"adapter_ids must be ({shape[0]},), got {tuple(self.adapter_ids.shape)}")

    def to(self, device) -> "Batch":
        """This batch with every tensor field on `device` (the cache, not a tensor, is kept as it is)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def resolved_positions(self, offset: torch.Tensor | int = 0) -> torch.Tensor:
        """Positions given, else: index within the segment (packed), else count of real tokens before
        each token (padding-aware) plus `offset` (per-row tokens already in the cache)."""
        if self.positions is not None:
            return self.positions
        B, T = self.input_ids.shape
        device = self.input_ids.device
        if self.segment_ids is not None:
            idx = torch.arange(T, device=device).expand(B, T)
            starts = torch.ones_like(self.segment_ids, dtype=torch.bool)
            starts[:, 1:] = self.segment_ids[:, 1:] != self.segment_ids[:, :-1]
            start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
            return idx - start_idx
        if self.attention_mask is not None:
            pos = self.attention_mask.long().cumsum(dim=1) - 1
            return pos.clamp(min=0) + (offset if isinstance(offset, int) else offset.unsqueeze(1))
        pos = torch.arange(T, device=device).expand(B, T)
        return pos + (offset if isinstance(offset, int) else offset.unsqueeze(1))
