"""The CPU path of kernels.lora / kernels.lora_multi: the same math as kernels/ref/lora.py, computed in the adapter
weights' dtype w (x is cast to w; with fp32 masters this is PEFT's order, and on CPUs without AVX-512 BF16 an fp32
GEMM is several times faster than a bf16 one), made of differentiable torch ops so autograd gives dbase, dx, dA, dB.

lora:        u = s (x A^T)   (M, r) in w, the scale on the rank-r intermediate, not on the (M, N) output
             y = base + u B^T                  (one addmm when base is in w; else the product is cast, then added)

lora_multi:  y_m = base_m + s_i (x_m A_i^T) B_i^T,  i = ids[m]  (Hu et al. 2021, eq. 3, per row; -1: y_m = base_m)
    One computation for all rows, grouped by distinct rank (a few groups), never by adapter: within the group
    of rank r, the rows of its P present adapters are sorted by adapter and laid out as a zero-padded
    (P, c, K) block (c = the most rows any of them has), then

             U = s[:, None, None] * bmm(X, A_g^T)      A_g (P, r, K):  A_i stacked, a view of lora_a
             D = bmm(U, B_g^T)                          B_g (P, N, r):  B_i stacked, a view of lora_b

    and D's real rows are added to base. A_g and B_g are views (no copy) of the packed span from the first to
    the last present adapter of that rank when at most half of the span is absent (LoraLinear packs by rank, so
    a rank's adapters are contiguous); otherwise the present ones are gathered once each.
    FLOPs: 2 P c r (K + N) per group; weight traffic: each adapter of the block read once.
    The grouping depends only on the ids and offsets, so it is made once per forward and reused by every layer
    (they receive views of one ids tensor).

    Without autograd (serving) lora_multi runs kernels/cpu/lora.c instead: per row, the shrink and expand GEMVs of
    its own adapter (Punica's BGMV; a prompt's consecutive rows of one adapter as tiles of up to 4 sharing the
    weight loads, each row's sums in the same order whatever its tile) with the same roundings in w's dtype and fp32
    sums, in one call per layer; no grouping, padding, gather or scatter. Rows are split over torch's intra-op threads when the work is large.
    Projections that share x and the packing (q/k/v, gate/up: lora_multi_group_cpu) go to lora.c in one call, which
    casts each tile of x once and runs each projection's sums as its own call would; the caller may let it write
    each output into its base output (no new (M, N) tensor).
"""
import ctypes
import functools
import operator
import weakref
from dataclasses import dataclass

import torch

from ._build import library
from .nf4 import _KIND, _run, _split


def lora_cpu(base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             scale: float) -> torch.Tensor:
    """base_out + scale (x A^T) B^T in A's dtype, the scale applied to the (M, r) intermediate. Without autograd,
    the rows kernel with every row on this one adapter (the same arithmetic as a mixed batch's rows)."""
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in (base_out, x, lora_a, lora_b))
    if not recorded and library() is not None and lora_a.shape[0] <= ROWS_MAX_RANK:
        ids = torch.zeros(x.shape[:-1], dtype=torch.int64)
        offsets, scales = _one_adapter(lora_a.shape[0], float(scale))
        return _lora_rows([base_out], x, ids, [lora_a], [lora_b], offsets, scales, [0, lora_a.shape[0]])[0]
    base2 = base_out.reshape(-1, base_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1]).to(lora_a.dtype)
    u = (x2 @ lora_a.t()) * scale
    if base2.dtype == u.dtype:
        y = torch.addmm(base2, u, lora_b.t())
    else:
        y = base2 + (u @ lora_b.t()).to(base2.dtype)
    return y.view(base_out.shape)


@functools.lru_cache(maxsize=256)
def _one_adapter(rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The packing of one adapter: offsets [0, rank] (int64) and scales [scale] (fp32). Shared by every lora_cpu call
    with these values and never written, so _weight_args finds a layer's arguments again at each call."""
    with torch.inference_mode(False):  # normal tensors even when first made under a serving forward
        return torch.tensor([0, rank]), torch.tensor([scale], dtype=torch.float32)


@dataclass
class _Group:
    """The rows of one rank's adapters: `rows` (sorted by adapter) and each one's place `slot` in the zero-padded
    (P, c) block of the P adapters `adapters` (with their first packed rows `starts`). `first` >= 0: those P are
    contiguous in the packing from row `first` (their weights are views)."""

    rank: int
    rows: torch.Tensor
    slot: torch.Tensor
    adapters: torch.Tensor
    starts: torch.Tensor
    c: int
    first: int


_LAST_PLAN: tuple = (None, -1, None, None, None)  # (ids tensor, held so its address is never reused; version; bounds;
                                                 # shape; groups), replaced whole so threads never see half of one


def _plan(adapter_ids: torch.Tensor, bounds: list[int]) -> list[_Group]:
    """The grouping of rows by rank; every layer of one forward passes views of the same ids, so it is made once."""
    global _LAST_PLAN
    held = adapter_ids if adapter_ids._base is None else adapter_ids._base
    version = -1 if held.is_inference() else held._version  # inference tensors have no version counter
    last = _LAST_PLAN
    if last[0] is held and last[1] == version and last[2] == bounds and last[3] == adapter_ids.shape:
        return last[4]
    ids = adapter_ids.reshape(-1).to(torch.int64)
    ranks = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    rank_of = torch.tensor([0] + ranks, dtype=torch.int64)[ids + 1]  # 0 for -1 and for empty adapters
    groups = []
    for rank in sorted(set(r for r in ranks if r > 0)):
        rows = (rank_of == rank).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        rid, order = torch.sort(ids[rows], stable=True)
        rows = rows[order]
        present, counts = torch.unique_consecutive(rid, return_counts=True)
        c = int(counts.max())
        begin = torch.cumsum(counts, 0) - counts
        place = torch.arange(rows.numel()) - torch.repeat_interleave(begin, counts)  # row's place among its adapter's
        lo, hi = int(present[0]), int(present[-1])
        members = set(i for i, r in enumerate(ranks) if r == rank)
        if hi - lo + 1 <= 2 * present.numel() and all(i in members for i in range(lo, hi + 1)):
            # the span lo..hi is contiguous in the packing and at most half absent: take it as views (absent
            # adapters get zero rows) rather than copy the present ones
            adapters, first, group = torch.arange(lo, hi + 1), bounds[lo], rid - lo
        else:
            adapters, first = present, -1
            group = torch.repeat_interleave(torch.arange(present.numel()), counts)
        starts = torch.tensor(bounds[:-1], dtype=torch.int64)[adapters]
        groups.append(_Group(rank, rows, group * c + place, adapters, starts, c, first))
    _LAST_PLAN = (held, version, bounds, adapter_ids.shape, groups)
    return groups


def _group_weights(lora_a: torch.Tensor, lora_b: torch.Tensor, g: _Group) -> tuple[torch.Tensor, torch.Tensor]:
    """A_g (P, r, K) and B_g^T (P, r, N) of group g: views when g.first >= 0, else the present adapters gathered.
    B^T rows are B's columns: cheap to gather when lora_b is the transpose of a contiguous (sum r_i, N) tensor."""
    k = lora_a.shape[1]
    p, r = g.adapters.numel(), g.rank
    bt = lora_b.t()  # (sum r_i, N)
    if g.first >= 0:
        return lora_a[g.first:g.first + p * r].view(p, r, k), bt[g.first:g.first + p * r].unflatten(0, (p, r))
    cols = (g.starts.unsqueeze(1) + torch.arange(r)).reshape(-1)
    return lora_a.index_select(0, cols).view(p, r, k), bt.index_select(0, cols).view(p, r, -1)


def _rows_setup(tensors: tuple[torch.Tensor, ...], offsets: torch.Tensor,
               bounds: list[int] | None) -> tuple[bool, list[int]]:
    """(whether autograd records ops on `tensors`, the packing's row bounds: offsets.tolist() unless `bounds` is
    given)."""
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return recorded, offsets.tolist() if bounds is None else bounds


def lora_multi_cpu(base_out: torch.Tensor, x: torch.Tensor, adapter_ids: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor,
                   bounds: list[int] | None = None, reuse_base: bool = False) -> torch.Tensor:
    """Per-row multi-adapter LoRA (module docstring): the C rows kernel without autograd, else grouped bmm;
    arguments as kernels.lora_multi, plus `bounds` = offsets.tolist() when the caller has read them already."""
    recorded, bounds = _rows_setup((base_out, x, lora_a, lora_b), offsets, bounds)
    if not recorded and library() is not None and _rows_fit(bounds):
        return _lora_rows([base_out], x, adapter_ids, [lora_a], [lora_b], offsets, scales, bounds, reuse_base)[0]
    k, n = x.shape[-1], base_out.shape[-1]
    x2 = x.reshape(-1, k)
    base2 = base_out.reshape(-1, n)
    y = base2
    for g in _plan(adapter_ids, bounds):
        a_g, bt_g = _group_weights(lora_a, lora_b, g)
        p = g.adapters.numel()
        xs = x2.index_select(0, g.rows).to(lora_a.dtype)
        dense = p * g.c == g.rows.numel()  # no padding: slot is 0, 1, 2, ...
        if not dense:  # rows of one adapter side by side, zero rows pad each adapter to c
            xs = xs.new_zeros(p * g.c, k).index_copy(0, g.slot, xs)
        u = torch.bmm(xs.view(p, g.c, k), a_g.transpose(1, 2))
        u = (u * scales.index_select(0, g.adapters).view(p, 1, 1)).to(u.dtype)
        d = torch.bmm(u, bt_g).view(p * g.c, n)
        if not dense:
            d = d.index_select(0, g.slot)
        y = y.index_add(0, g.rows, d.to(y.dtype))
    return y.view(base_out.shape) if y is not base2 else base_out.clone()


def lora_multi_group_cpu(base_outs: list[torch.Tensor], x: torch.Tensor, adapter_ids: torch.Tensor,
                         lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor], offsets: torch.Tensor,
                         scales: torch.Tensor, bounds: list[int] | None = None,
                         reuse_base: bool = False) -> list[torch.Tensor]:
    """lora_multi_cpu for P projections sharing x and one packing (kernels.lora_multi_group): without autograd, one
    lora.c call for all P, the same arithmetic as P calls (bit for bit); else (or past the kernel's rank limit, or
    with A/B dtypes that differ between projections) P lora_multi_cpu calls. `reuse_base`: the rows kernel writes
    each output into its base_out (the caller gives them up); the returned list holds the outputs either way."""
    recorded, bounds = _rows_setup((x, *base_outs, *lora_as, *lora_bs), offsets, bounds)
    w, y = lora_as[0].dtype, base_outs[0].dtype
    if (recorded or library() is None or not _rows_fit(bounds) or any(t.dtype != w for t in lora_as)
            or any(b.dtype != y for b in base_outs)):
        return [lora_multi_cpu(b, x, adapter_ids, a, bb, offsets, scales, bounds)
                for b, a, bb in zip(base_outs, lora_as, lora_bs)]
    return _lora_rows(base_outs, x, adapter_ids, lora_as, lora_bs, offsets, scales, bounds, reuse_base)


ROWS_MAX_RANK = 1024  # lora.c QK_LORA_MAX_RANK: the rows kernel's scratch; larger ranks run the grouped bmm


def _rows_fit(bounds: list[int]) -> bool:
    """Every rank of the packing within the rows kernel's ROWS_MAX_RANK (all of them together, the common case, or
    each one)."""
    return bounds[-1] - bounds[0] <= ROWS_MAX_RANK or _r_max(bounds) <= ROWS_MAX_RANK


def _r_max(bounds: list[int]) -> int:
    """The largest rank max(bounds[i + 1] - bounds[i]), 0 with no adapter."""
    return max(map(int.__sub__, bounds[1:], bounds[:-1]), default=0)


def _lora_rows(bases: list[torch.Tensor], x: torch.Tensor, adapter_ids: torch.Tensor, lora_as: list[torch.Tensor],
               lora_bs: list[torch.Tensor], offsets: torch.Tensor, scales: torch.Tensor, bounds: list[int],
               reuse_base: bool = False) -> list[torch.Tensor]:
    """kernels/cpu/lora.c qk_lora_rows_group over all rows, for the P projections p (one A_p, B_p, base_p (..., N_p)
    each, one x (..., K), ids (...) and packing, all of one leading shape, taken as M rows without reshaping):
    y_p = base_p + the row's adapter's LoRA term (no autograd), of base_p's shape; y_p is base_p itself when
    `reuse_base` and base_p is contiguous. bounds = offsets.tolist() (the largest rank sizes the work for a thread
    split). x goes in its own dtype (the kernel casts it to w's); every argument already in the kernel's layout is
    passed as it is, and the weights' and packing's part of the arguments is made once (_weight_args): a decode
    step makes ~100 such calls."""
    x_c = x.contiguous()
    ids = (adapter_ids if adapter_ids.dtype == torch.int64 else adapter_ids.to(torch.int64)).contiguous()
    m, k = ids.numel(), x_c.shape[-1]  # ids: x's leading shape
    static, kept = _weight_args(lora_as, lora_bs, offsets, scales)
    base_c = [b.contiguous() for b in bases]
    if reuse_base:
        ys = [b if b is b0 else torch.empty_like(b) for b, b0 in zip(base_c, bases)]
    else:
        ys = [torch.empty_like(b) for b in base_c]
    ptrs = ctypes.c_void_p * len(ys)
    base_p = ptrs(*map(torch.Tensor.data_ptr, base_c))
    y_p = base_p if all(map(operator.is_, ys, base_c)) else ptrs(*map(torch.Tensor.data_ptr, ys))
    lib = library()
    # the tensors above (and `kept`) stay alive until the calls return
    args = (x_c.data_ptr(), _KIND[x_c.dtype], k, ids.data_ptr(), len(ys), *static[:5], base_p, y_p, static[5],
            _KIND[ys[0].dtype])

    def call(begin: int, end: int) -> None:
        if lib.qk_lora_rows_group(*args, begin, end) != 0:
            raise MemoryError(f"qk_lora_rows_group: no memory for {4 * k} floats of scratch")

    if torch.get_num_threads() == 1:
        call(0, m)
    else:
        _run(_split(m, 1, m * _r_max(bounds) * (k * len(ys) + sum(b.shape[-1] for b in base_c))), call)
    return ys


# (ids of the A_p, B_p, offsets, scales) -> (weak references to them, their data pointers, the arguments): a serving
# forward passes each layer's same packed tensors every step, already in the kernel's layout
_WEIGHT_ARGS: dict[tuple, tuple] = {}


def _weight_args(lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor], offsets: torch.Tensor,
                 scales: torch.Tensor) -> tuple[tuple, tuple]:
    """(the A_p pointers, the B_p^T pointers, w's kind, the offsets and scales pointers, the N_p), and the tensors
    those pointers point into when they had to be made here (else empty). When every tensor is already in the
    kernel's layout (A_p contiguous, B_p the transpose of a contiguous (sum r_i, N_p), int64 offsets, fp32
    scales; LoraLinear's CPU packings are), the arguments are remembered for those tensors (weakly: they are
    dropped with them) and found again by identity (live referents with this call's ids are these tensors) and
    data pointer."""
    tensors = (*lora_as, *lora_bs, offsets, scales)
    key = tuple(map(id, tensors))
    seen = _WEIGHT_ARGS.get(key)
    if (seen is not None and tuple(map(id, map(operator.call, seen[0]))) == key
            and tuple(map(torch.Tensor.data_ptr, tensors)) == seen[1]):
        return seen[2], ()
    off = offsets.contiguous() if offsets.dtype == torch.int64 else offsets.to(torch.int64).contiguous()
    sc = scales.contiguous() if scales.dtype == torch.float32 else scales.to(torch.float32).contiguous()
    a = [t.contiguous() for t in lora_as]
    bt = [t.t().contiguous() for t in lora_bs]  # (sum r_i, N): a view, no copy, for the packing LoraLinear makes on CPU
    ptrs = ctypes.c_void_p * len(a)
    static = (ptrs(*map(torch.Tensor.data_ptr, a)), ptrs(*map(torch.Tensor.data_ptr, bt)), ctypes.c_int(_KIND[a[0].dtype]),
              ctypes.c_void_p(off.data_ptr()), ctypes.c_void_p(sc.data_ptr()),
              (ctypes.c_int64 * len(bt))(*[t.shape[1] for t in bt]))
    kept = (a, bt, off, sc)
    if (off is offsets and sc is scales and all(map(operator.is_, a, lora_as))
            and all(t.data_ptr() == u.data_ptr() for t, u in zip(bt, lora_bs))):  # nothing was made here
        if len(_WEIGHT_ARGS) >= 4096:  # packings made and dropped (adapters added, removed): forget them all
            _WEIGHT_ARGS.clear()
        _WEIGHT_ARGS[key] = (tuple(map(weakref.ref, tensors)), tuple(map(torch.Tensor.data_ptr, tensors)), static)
        kept = ()
    return static, kept
