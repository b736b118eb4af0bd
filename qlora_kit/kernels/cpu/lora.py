"""The CPU path of kernels.lora / kernels.lora_multi: the same math as kernels/ref/lora.py, in the input's dtype
(torch's CPU GEMMs accumulate bf16/fp16 products in fp32) and made of differentiable torch ops, so autograd
gives dbase, dx, dA and dB.

lora:        u = s (x A^T)   (M, r), the scale on the rank-r intermediate, not on the (M, N) output
             y = base + u B^T                                      (one addmm when base shares x's dtype)

lora_multi:  y_m = base_m + s_i (x_m A_i^T) B_i^T,  i = ids[m]  (Hu et al. 2021, eq. 3, per row; -1: y_m = base_m)
    One computation for all rows, grouped by distinct rank (a few groups), never by adapter: within the group
    of rank r, the rows of its P present adapters are sorted by adapter and laid out as a zero-padded
    (P, c, K) block (c = the most rows any of them has), then

             U = s[:, None, None] * bmm(X, A_g^T)      A_g (P, r, K):  A_i stacked, a view of lora_a
             D = bmm(U, B_g^T)                          B_g (P, N, r):  B_i stacked, a view of lora_b

    and D's real rows are added to base. A_g and B_g are views (no copy) when the group's adapters are
    contiguous in the packing and all present (LoraLinear packs by rank); otherwise the present ones are
    gathered once each. FLOPs: 2 P c r (K + N) per group; weight traffic: each present adapter read once.
"""
import torch


def lora_cpu(base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             scale: float) -> torch.Tensor:
    """base_out + scale (x A^T) B^T in x's dtype, the scale applied to the (M, r) intermediate."""
    x2 = x.reshape(-1, x.shape[-1])
    base2 = base_out.reshape(-1, base_out.shape[-1])
    u = (x2 @ lora_a.t()) * scale
    if base2.dtype == u.dtype:
        y = torch.addmm(base2, u, lora_b.t())
    else:
        y = base2 + (u @ lora_b.t()).to(base2.dtype)
    return y.view(base_out.shape)


def _group_weights(lora_a, lora_b, first: int, starts: torch.Tensor, rank: int, contiguous: bool):
    """A_g (P, r, K) and B_g^T (P, r, N) for the P adapters of rank `rank` whose first packed row/column is
    `starts` (P,); `contiguous`: they are the packed rows/columns [first, first + P r), taken as views."""
    k, n = lora_a.shape[1], lora_b.shape[0]
    p = starts.numel()
    if contiguous:  # views: A rows [first, first + P r), B columns likewise
        a_g = lora_a[first:first + p * rank].view(p, rank, k)
        b_g = lora_b[:, first:first + p * rank].view(n, p, rank).permute(1, 2, 0)
        return a_g, b_g
    cols = (starts.unsqueeze(1) + torch.arange(rank)).reshape(-1)
    a_g = lora_a.index_select(0, cols).view(p, rank, k)
    b_g = lora_b.index_select(1, cols).view(n, p, rank).permute(1, 2, 0)
    return a_g, b_g


def lora_multi_cpu(base_out: torch.Tensor, x: torch.Tensor, adapter_ids: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-row multi-adapter LoRA as grouped bmm (module docstring); arguments as kernels.lora_multi."""
    k, n = x.shape[-1], base_out.shape[-1]
    x2 = x.reshape(-1, k)
    base2 = base_out.reshape(-1, n)
    ids = adapter_ids.reshape(-1).to(torch.int64)
    bounds = offsets.tolist()
    ranks = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    rank_of = torch.tensor([0] + ranks, dtype=torch.int64)[ids + 1]  # 0 for -1 and for empty adapters
    y = base2
    for rank in sorted(set(r for r in ranks if r > 0)):
        rows = (rank_of == rank).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        rid = ids[rows]
        rid, order = torch.sort(rid, stable=True)
        rows = rows[order]
        present, counts = torch.unique_consecutive(rid, return_counts=True)
        p, c = present.numel(), int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        group = torch.repeat_interleave(torch.arange(p), counts)
        slot = group * c + (torch.arange(rows.numel()) - starts[group])  # row's place in the (P, c) block
        first = torch.tensor(bounds[:-1], dtype=torch.int64)[present]
        members = [i for i, r in enumerate(ranks) if r == rank]
        whole = p == len(members) and members == list(range(members[0], members[0] + p)) \
            and bounds[members[-1] + 1] - bounds[members[0]] == p * rank
        a_g, bt_g = _group_weights(lora_a, lora_b, bounds[members[0]] if whole else 0, first, rank, whole)
        xs = x2.index_select(0, rows)
        xp = xs.new_zeros(p * c, k).index_copy(0, slot, xs).view(p, c, k)
        u = torch.bmm(xp, a_g.transpose(1, 2))
        u = (u * scales.index_select(0, present).view(p, 1, 1)).to(u.dtype)
        d = torch.bmm(u, bt_g).view(p * c, n).index_select(0, slot)
        y = y.index_add(0, rows, d.to(y.dtype))
    return y.view(base_out.shape) if y is not base2 else base_out.clone()
