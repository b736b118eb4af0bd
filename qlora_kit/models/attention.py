"""Grouped-query attention through F.scaled_dot_product_attention, masks, and the KV-cache interface.

    o = softmax(q k^T / sqrt(head_dim) + M) v,   num_heads query heads share num_kv_heads key/value heads

M is 0 where attention is allowed and -inf elsewhere, built from the Batch: causal order, padding
(keys that are padding are never attended), packed segments (a query sees only its own segment)
and an optional sliding window (q_pos - k_pos < window). A query always sees itself, so padding
rows stay finite. Without padding, packing, window or cache, SDPA's own causal path is used.

A cache plugs in through two calls per forward: `prepare(batch)` once (reserves slots, returns the
AttentionMeta that every layer uses) and `update(layer, k, v, meta)` per layer (stores this step's
k/v, returns all keys/values to attend to). A paged cache implements the same two methods.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qlora_kit.kernels.cpu import matmul_dtype

from .batch import Batch


@dataclass
class AttentionMeta:
    """What every layer needs for one step: the mask (B, 1, T, S) bool or None (= plain causal),
    the RoPE positions (B, T), and cache bookkeeping (`start`: first slot written this step)."""

    mask: torch.Tensor | None
    positions: torch.Tensor
    start: int = 0


def _allowed(q_idx, k_idx, q_pos, k_pos, window):
    """Causal (by slot order) and windowed (by position) rule: (B, T, S) bool."""
    ok = k_idx.unsqueeze(0).unsqueeze(1) <= q_idx.unsqueeze(0).unsqueeze(2)
    if window is not None:
        ok = ok & (q_pos.unsqueeze(2) - k_pos.unsqueeze(1) < window)
    return ok


def build_meta(batch: Batch, sliding_window: int | None = None) -> AttentionMeta:
    """Mask and positions for a batch without a cache (training, scoring, one-shot prefill)."""
    positions = batch.resolved_positions()
    B, T = batch.input_ids.shape
    plain = batch.attention_mask is None and batch.segment_ids is None
    if plain and (sliding_window is None or T <= sliding_window):
        return AttentionMeta(None, positions)
    idx = torch.arange(T, device=batch.input_ids.device)
    ok = _allowed(idx, idx, positions, positions, sliding_window)
    if batch.attention_mask is not None:
        ok = ok & batch.attention_mask.bool().unsqueeze(1)
    if batch.segment_ids is not None:
        ok = ok & (batch.segment_ids.unsqueeze(2) == batch.segment_ids.unsqueeze(1))
    ok = ok | torch.eye(T, dtype=torch.bool, device=ok.device)
    return AttentionMeta(ok.unsqueeze(1), positions)


class KVCache:
    """Interface of a KV cache (see the module docstring); StaticKVCache is the contiguous one."""

    def prepare(self, batch: Batch, sliding_window: int | None = None) -> AttentionMeta:
        raise NotImplementedError

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta):
        raise NotImplementedError


class StaticKVCache(KVCache):
    """Preallocated (layers, B, num_kv_heads, max_len, head_dim) keys and values, filled left to right.

    All rows advance together; padding slots (attention_mask 0, e.g. left-padded prompts) are
    recorded and never attended. Packed segments are not supported with a cache.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.key_pos = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len

    @property
    def row_lengths(self) -> torch.Tensor:
        """(B,) real tokens stored per row."""
        return self.valid.sum(dim=1)

    def prepare(self, batch: Batch, sliding_window: int | None = None) -> AttentionMeta:
        if batch.segment_ids is not None:
            raise ValueError("StaticKVCache: packed batches (segment_ids) cannot use a KV cache")
        B, T = batch.input_ids.shape
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"StaticKVCache: {end} tokens exceed max_len={self.max_len}")
        positions = batch.resolved_positions(offset=self.row_lengths)
        self.valid[:, start:end] = True if batch.attention_mask is None else batch.attention_mask.bool()
        self.key_pos[:, start:end] = positions
        self.length = end
        window_binds = sliding_window is not None and end > sliding_window
        if not window_binds and (T == 1 or start == 0) and bool(self.valid[:, :end].all()):
            return AttentionMeta(None, positions, start)  # plain causal: SDPA's own path, as without a cache
        q_idx = torch.arange(start, end, device=self.valid.device)
        k_idx = torch.arange(end, device=self.valid.device)
        ok = _allowed(q_idx, k_idx, positions, self.key_pos[:, :end], sliding_window)
        ok = ok & self.valid[:, :end].unsqueeze(1)
        ok = ok | (k_idx.unsqueeze(0) == q_idx.unsqueeze(1)).unsqueeze(0)
        return AttentionMeta(ok.unsqueeze(1), positions, start)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta):
        end = meta.start + k.shape[2]
        self.k[layer, :, :, meta.start:end] = k
        self.v[layer, :, :, meta.start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, H_kv, S, D) -> (B, H, T, D) via SDPA with GQA.

    On a CPU without native 16-bit matrix instructions, 16-bit q/k/v are attended in fp32 (exact upcasts, the
    result rounded back once): torch's emulated bf16 attention is many times slower there (kernels.cpu).
    """
    if q.device.type == "cpu" and matmul_dtype(q.dtype) != q.dtype:
        return attend(q.float(), k.float(), v.float(), meta).to(q.dtype)
    gqa = q.shape[1] != k.shape[1]
    if meta.mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=meta.mask, enable_gqa=gqa)
