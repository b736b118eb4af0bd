"""Examples -> rows -> micro-batches, in a seeded order, and the explicit per-step batch object.

Order for epoch e is a permutation drawn from Generator(seed + e * 1_000_003), so a resumed run that
knows (epoch, micro-batch index) rebuilds exactly the batches an uninterrupted run would have seen.
With length grouping, examples are sorted by length inside chunks of 16 micro-batches and the
batches are then shuffled, so padding shrinks while the order stays random across chunks.
Packing fills rows of max_seq_len first-fit; each packed example keeps its own segment id, so
attention never crosses examples (models.build_meta) and positions restart at 0 (Batch.resolved_positions).
"""
from dataclasses import dataclass, replace

import torch

from qlora_kit.models import Batch

from .data import IGNORE, Example

GROUP_CHUNK = 16  # micro-batches per length-grouping chunk


@dataclass
class StepBatch:
    """One micro-batch: the decoder input, shifted labels (IGNORE = no loss) and token counts."""

    batch: Batch
    labels: torch.Tensor
    num_tokens: int
    num_loss_tokens: int

    def to(self, device) -> "StepBatch":
        """This micro-batch with the decoder input (every field, Batch.to) and the labels on `device`."""
        return replace(self, batch=self.batch.to(device), labels=self.labels.to(device))


def _first_fit(indices: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    rows, room = [], []
    for i in indices:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def plan_epoch(lengths: list[int], epoch: int, seed: int, batch_size: int, max_seq_len: int, packing: bool,
               group_by_length: bool) -> list[list[list[int]]]:
    """Micro-batches of one epoch: each a list of rows, each row a list of example indices."""
    gen = torch.Generator().manual_seed(seed + epoch * 1_000_003)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    per_chunk = batch_size * GROUP_CHUNK
    if packing:  # a chunk holds about enough examples to fill GROUP_CHUNK micro-batches
        mean = max(1, sum(lengths) // len(lengths))
        per_chunk = batch_size * GROUP_CHUNK * max(1, max_seq_len // mean)
    batches = []
    for lo in range(0, len(order), per_chunk):
        chunk = order[lo:lo + per_chunk]
        if group_by_length:
            chunk = sorted(chunk, key=lambda i: -lengths[i])
        rows = _first_fit(chunk, lengths, max_seq_len) if packing else [[i] for i in chunk]
        batches += [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
    if group_by_length:
        batches = [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]
    return batches


def collate(rows: list[list[int]], examples: list[Example], pad_id: int, packed: bool, adapter_id: int) -> StepBatch:
    """Right-padded tensors for one micro-batch, every row tagged with LoRA slot `adapter_id` (-1 = base only);
    packed rows carry segment ids (padding is segment -1)."""
    T = max(sum(len(examples[i]) for i in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    real = torch.zeros(B, T, dtype=torch.bool)
    for b, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row):
            ex = examples[i]
            n = len(ex)
            ids[b, t:t + n] = torch.tensor(ex.input_ids)
            labels[b, t:t + n] = torch.tensor(ex.labels)
            segments[b, t:t + n] = s
            real[b, t:t + n] = True
            t += n
    padded = not bool(real.all())
    batch = Batch(ids, adapter_ids=torch.full((B,), adapter_id, dtype=torch.long),
                  attention_mask=real if padded and not packed else None,
                  segment_ids=segments if packed else None)
    return StepBatch(batch, labels, int(real.sum()), int((labels != IGNORE).sum()))
