"""One forward pass over rows of several adapters: mixing micro-batches and taking each part's loss.

Rows of different jobs are stacked into one models.Batch whose per-row `adapter_ids` pick each job's
LoRA slot, so the frozen base runs once for all of them. Rows never attend across each other, and
adapter a's weights only touch rows tagged a, so every job's gradient is exactly its own (up to float
summation order). Micro-batches of different shapes are right-padded to the longest; to keep one
attention rule for packed and unpacked jobs, every row then carries segment ids (an unpacked row is
segment 0, padding -1), which gives the same mask and positions as the single-job batch.
"""
from dataclasses import dataclass

import torch
from torch import nn

from qlora_kit.kernels import chunked_cross_entropy
from qlora_kit.models import Batch

from ..batching import StepBatch
from ..data import IGNORE
from ..forward import head_weight, hidden_states


@dataclass
class Part:
    """One job's micro-batch inside a mixed pass; `weight` 0 marks a filler pass (data-parallel padding)."""

    job: object
    slot: int
    step: StepBatch
    micro: int = 0
    weight: float = 1.0


@dataclass
class MixedBatch:
    """The stacked decoder input, its labels and each part's rows."""

    batch: Batch
    labels: torch.Tensor
    rows: list[slice]


def _segments(step: StepBatch) -> torch.Tensor:
    b = step.batch
    if b.segment_ids is not None:
        return b.segment_ids
    if b.attention_mask is not None:
        return torch.where(b.attention_mask.bool(), 0, -1)
    return torch.zeros_like(b.input_ids)


def mix(parts: list[Part], pad_id: int) -> MixedBatch:
    """Stack the parts' rows (each tagged with its slot) into one batch; a single part is kept as it is."""
    tags = [torch.full((p.step.batch.input_ids.shape[0],), p.slot, dtype=torch.long) for p in parts]
    if len(parts) == 1:
        b = parts[0].step.batch
        one = Batch(b.input_ids, adapter_ids=tags[0], attention_mask=b.attention_mask, segment_ids=b.segment_ids)
        return MixedBatch(one, parts[0].step.labels, [slice(0, b.input_ids.shape[0])])
    T = max(p.step.batch.input_ids.shape[1] for p in parts)
    plain = all(p.step.batch.attention_mask is None and p.step.batch.segment_ids is None
                and p.step.batch.input_ids.shape[1] == T for p in parts)
    ids, labels, segs, rows, lo = [], [], [], [], 0
    for p in parts:
        n, t = p.step.batch.input_ids.shape
        ids.append(nn.functional.pad(p.step.batch.input_ids, (0, T - t), value=pad_id))
        labels.append(nn.functional.pad(p.step.labels, (0, T - t), value=IGNORE))
        segs.append(nn.functional.pad(_segments(p.step), (0, T - t), value=-1))
        rows.append(slice(lo, lo + n))
        lo += n
    batch = Batch(torch.cat(ids), adapter_ids=torch.cat(tags), segment_ids=None if plain else torch.cat(segs))
    return MixedBatch(batch, torch.cat(labels), rows)


def group_passes(parts: list[Part], rows_per_pass: int) -> list[list[Part]]:
    """Split the round's parts (micro-batch index major) into passes of at most rows_per_pass rows (0 = by index)."""
    passes, cur, rows, index = [], [], 0, None
    for p in parts:
        idx, n = p.micro, p.step.batch.input_ids.shape[0]
        full = rows_per_pass and cur and rows + n > rows_per_pass
        if cur and (full or (not rows_per_pass and idx != index)):
            passes.append(cur)
            cur, rows = [], 0
        cur.append(p)
        rows, index = rows + n, idx
    return passes + ([cur] if cur else [])


class PassLoss(nn.Module):
    """model + mixed batch -> one summed token loss per part (fp32 scalars); a module so DDP can wrap it."""

    def __init__(self, model: nn.Module, checkpointing: bool, chunk_size: int):
        super().__init__()
        self.model, self.checkpointing, self.chunk_size = model, checkpointing, chunk_size

    def forward(self, mixed: MixedBatch) -> list[torch.Tensor]:
        h = hidden_states(self.model, mixed.batch, self.checkpointing)
        w = head_weight(self.model).to(h.dtype)
        out = []
        for rows in mixed.rows:
            y = mixed.labels[rows]
            keep = y != IGNORE
            out.append(chunked_cross_entropy(h[rows][keep], w, y[keep], IGNORE, self.chunk_size, reduction="sum"))
        return out
