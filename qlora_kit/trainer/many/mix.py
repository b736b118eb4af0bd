"""One forward pass over rows of several adapters: mixing micro-batches and taking each part's loss.

Rows of different jobs are stacked into one micro-batch; each row keeps the adapter id its job's collate
gave it (models.Batch.adapter_ids picks that job's LoRA slot), so the frozen base runs once for all of
them. Rows never attend across each other, and adapter a's weights only touch rows tagged a, so every
job's gradient is exactly its own (up to float summation order). Micro-batches of different shapes are
right-padded to the longest; to keep one attention rule for packed and unpacked jobs, every row then
carries segment ids (an unpacked row is segment 0, padding -1), which gives the same mask and positions
as the single-job batch.
"""
from dataclasses import dataclass

import torch
from torch import nn

from qlora_kit.kernels import chunked_cross_entropy
from qlora_kit.models import Batch, Llama

from ..batching import StepBatch
from ..data import IGNORE


@dataclass
class Part:
    """One job's micro-batch (rows tagged with the job's slot) inside a mixed pass; `micro` is its index in the step."""

    job: object
    step: StepBatch
    micro: int = 0


def _segments(step: StepBatch) -> torch.Tensor:
    b = step.batch
    if b.segment_ids is not None:
        return b.segment_ids
    if b.attention_mask is not None:
        return torch.where(b.attention_mask.bool(), 0, -1)
    return torch.zeros_like(b.input_ids)


def mix(parts: list[Part], pad_id: int) -> tuple[StepBatch, list[slice]]:
    """The parts' rows stacked into one micro-batch, and each part's rows in it; a single part is kept as it is."""
    if len(parts) == 1:
        step = parts[0].step
        return step, [slice(0, step.batch.input_ids.shape[0])]
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
    batch = Batch(torch.cat(ids), adapter_ids=torch.cat([p.step.batch.adapter_ids for p in parts]),
                  segment_ids=None if plain else torch.cat(segs))
    step = StepBatch(batch, torch.cat(labels), sum(p.step.num_tokens for p in parts),
                     sum(p.step.num_loss_tokens for p in parts))
    return step, rows


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


def part_losses(model: Llama, step: StepBatch, rows: list[slice], checkpointing: bool,
                chunk_size: int) -> list[torch.Tensor]:
    """The summed token cross-entropy (fp32 scalar) of each row range of `step`; divide by the token count.

    The forward is models' (Llama.hidden_states, `checkpointing` per layer); the loss is
    kernels.chunked_cross_entropy over the loss tokens only, so the [tokens, vocab] logits never exist.
    """
    h = model.hidden_states(step.batch, checkpointing)
    w = model.head_weight().to(h.dtype)
    out = []
    for r in rows:
        y = step.labels[r]
        keep = y != IGNORE
        out.append(chunked_cross_entropy(h[r][keep], w, y[keep], IGNORE, chunk_size, reduction="sum"))
    return out
