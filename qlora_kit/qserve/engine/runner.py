"""Turns a ScheduledBatch into tensors for models/ and samples one token per finishing row.

The KV cache is paged: one preallocated pool per layer, (num_blocks * block_size, num_kv_heads, head_dim) for
keys and the same for values. A token at position p of a request lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Each step the runner builds, per row, the slots of
this step's tokens (written by `update`) and the slots of the whole context (gathered for attention), and
plugs them into the decoder through models' KV-cache interface (`prepare` / `update`).

Rows are right-padded to the longest chunk of the step: a prefill chunk and one-token decodes share a forward.
Padding queries attend to key 0 only (finite, ignored); padding keys are masked out. Per-row adapters go in
`Batch.adapter_ids` as the resident slot index (-1 = base).
"""
import threading
from dataclasses import dataclass

import torch

from qlora_kit.models import AttentionMeta, Batch, KVCache, sample

from ..errors import SamplingFailed
from .scheduler import ScheduledBatch


@dataclass
class PagedMeta(AttentionMeta):
    """AttentionMeta plus where this step's keys go (`write_slots`, flat over valid tokens) and which slots
    each row attends to (`read_slots`, (B, S))."""

    write_slots: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    read_slots: torch.Tensor | None = None


class PagedKVCache(KVCache):
    """Per-layer KV pools indexed by block tables; the runner sets the step's layout with `set_step`."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self._step: dict | None = None

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def set_step(self, positions, valid, write_slots, read_slots, context_lens) -> None:
        self._step = dict(positions=positions, valid=valid, write_slots=write_slots, read_slots=read_slots,
                          context_lens=context_lens)

    def prepare(self, batch: Batch, sliding_window: int | None = None) -> PagedMeta:
        s = self._step
        q_pos, ctx = s["positions"], s["context_lens"]
        S = s["read_slots"].shape[1]
        k_pos = torch.arange(S, device=q_pos.device)
        ok = (k_pos.view(1, 1, S) <= q_pos.unsqueeze(2)) & (k_pos.view(1, 1, S) < ctx.view(-1, 1, 1))
        if sliding_window is not None:
            ok = ok & (q_pos.unsqueeze(2) - k_pos.view(1, 1, S) < sliding_window)
        ok[..., 0] |= ~s["valid"]  # padding queries see key 0: finite output, never used
        return PagedMeta(ok.unsqueeze(1), q_pos, 0, s["write_slots"], s["valid"], s["read_slots"])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: PagedMeta):
        # k, v: (B, H_kv, T, D) -> store valid tokens, then gather each row's context (B, H_kv, S, D)
        kt, vt = k.transpose(1, 2)[meta.valid], v.transpose(1, 2)[meta.valid]
        self.k[layer].index_copy_(0, meta.write_slots, kt.to(self.k.dtype))
        self.v[layer].index_copy_(0, meta.write_slots, vt.to(self.v.dtype))
        # index_select over the flat slots: the same copy as advanced indexing, ~5x faster on CPU at 2,000 slots
        shape = meta.read_slots.shape + self.k.shape[2:]
        flat = meta.read_slots.reshape(-1)
        keys = self.k[layer].index_select(0, flat).view(shape).transpose(1, 2)
        values = self.v[layer].index_select(0, flat).view(shape).transpose(1, 2)
        return keys, values


class ModelRunner:
    """Runs scheduled batches on one models.Llama with a paged KV cache.

    Args:
        model: the decoder (eval mode).
        num_blocks, block_size: KV cache geometry (must match the BlockManager's).

    `lock` is held during a forward and while adapters are installed/evicted, so an admin unload from another
    thread never changes LoRA weights mid-step.
    """

    def __init__(self, model, num_blocks: int, block_size: int):
        cfg = model.cfg
        self.model, self.block_size = model, block_size
        self.device = model.model.embed_tokens.weight.device
        self.cache = PagedKVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                  model.dtype, self.device)
        self.lock = threading.RLock()
        self._generators: dict[str, torch.Generator] = {}

    @staticmethod
    def pin_threads(n: int) -> None:
        """Intra-op threads of the calling thread's torch ops (the engine calls this first in its step thread)."""
        torch.set_num_threads(n)

    def _layout(self, batch: ScheduledBatch):
        bs, items = self.block_size, batch.items
        B, T = len(items), max(it.num_tokens for it in items)
        S = max(it.start + it.num_tokens for it in items)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        read = torch.zeros(B, S, dtype=torch.long)
        writes = []
        for row, it in enumerate(items):
            req, n, start = it.request, it.num_tokens, it.start
            table = torch.tensor(batch.block_tables[req.request_id], dtype=torch.long)
            ctx = torch.arange(start + n)
            slots = table[ctx // bs] * bs + ctx % bs
            ids[row, :n] = torch.tensor(req.all_token_ids[start:start + n])
            pos[row, :n] = ctx[start:]
            valid[row, :n] = True
            read[row, :start + n] = slots
            writes.append(slots[start:])
        ctx_lens = torch.tensor([it.start + it.num_tokens for it in items])
        d = self.device
        return (ids.to(d), pos.to(d), valid.to(d), torch.cat(writes).to(d), read.to(d), ctx_lens.to(d))

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> dict[str, int | SamplingFailed]:
        """One forward over `batch`; returns request_id -> sampled token for the items with `samples`, or the
        SamplingFailed of a row whose own sampling failed (the other rows are unaffected)."""
        if not batch.items:
            return {}
        ids, pos, valid, writes, read, ctx_lens = self._layout(batch)
        adapters = torch.tensor([it.adapter_slot for it in batch.items], dtype=torch.long, device=self.device)
        with self.lock:
            self.cache.set_step(pos, valid, writes, read, ctx_lens)
            h = self.model.hidden_states(Batch(ids, positions=pos, adapter_ids=adapters, cache=self.cache))
        rows = [i for i, it in enumerate(batch.items) if it.samples]
        if not rows:
            return {}
        last = torch.tensor([batch.items[i].num_tokens - 1 for i in rows], device=self.device)
        logits = self.model.logits(h[torch.tensor(rows, device=self.device), last]).float()
        return self._sample(batch, rows, logits)

    def _sample(self, batch: ScheduledBatch, rows: list[int], logits: torch.Tensor) -> dict[str, int | SamplingFailed]:
        out, greedy = {}, logits.argmax(dim=-1).tolist()
        for j, i in enumerate(rows):
            req = batch.items[i].request
            sp = req.sampling
            if sp.greedy:
                out[req.request_id] = greedy[j]
                continue
            try:
                gen = self._generators.get(req.request_id)
                if gen is None:
                    gen = torch.Generator(device=self.device)
                    gen.manual_seed(sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, ()).item()))
                    self._generators[req.request_id] = gen
                out[req.request_id] = int(sample(logits[j:j + 1], sp, gen)[0])
            except (RuntimeError, ValueError, OverflowError) as err:  # this row's parameters: fail it alone
                out[req.request_id] = SamplingFailed(f"sampling failed for this request: {err}")
        return out

    def release(self, request_id: str) -> None:
        """Forget a finished request's RNG."""
        self._generators.pop(request_id, None)
