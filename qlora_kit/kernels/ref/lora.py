"""Torch twin of kernels/lora.py.

FLOPs for x (M, K), A (r, K), B (N, r): 2*M*r*(K + N) forward and 4*M*r*(K + N) backward; traffic is
dominated by base_out and y (2*M*N*s) plus x (M*K*s). bench counts GB/s as
(2 * M * N + M * K) * sizeof(dtype) / t.
"""
import torch


def lora_ref(base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """y = base_out + s * (x @ A^T) @ B^T (Hu et al. 2021, eq. 3), fp32 accumulation, cast to base_out.dtype."""
    xa = x.float() @ lora_a.float().t()
    return (base_out.float() + scale * (xa @ lora_b.float().t())).to(base_out.dtype)


def lora_multi_ref(
    base_out: torch.Tensor,
    x: torch.Tensor,
    adapter_ids: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    offsets: torch.Tensor,
    scales: torch.Tensor,
) -> torch.Tensor:
    """y_m = base_m + s_i * (x_m @ A_i^T) @ B_i^T with i = adapter_ids[m]; rows with i = -1 get base_m.

    A_i = lora_a[offsets[i]:offsets[i+1]] (r_i, K); B_i = lora_b[:, offsets[i]:offsets[i+1]] (N, r_i).
    """
    xf = x.reshape(-1, x.shape[-1])
    ids = adapter_ids.reshape(-1)
    out = base_out.reshape(-1, base_out.shape[-1]).float()
    bounds = offsets.tolist()
    rows = []
    for i in range(len(bounds) - 1):
        sel = (ids == i).nonzero().squeeze(1)
        if sel.numel() == 0 or bounds[i + 1] == bounds[i]:
            continue
        a, b = lora_a[bounds[i]:bounds[i + 1]].float(), lora_b[:, bounds[i]:bounds[i + 1]].float()
        rows.append((sel, scales[i].float() * ((xf[sel].float() @ a.t()) @ b.t())))
    for sel, delta in rows:
        out = out.index_add(0, sel, delta)
    return out.to(base_out.dtype).reshape(base_out.shape)


def lora_multi_group_ref(
    base_outs: list[torch.Tensor],
    x: torch.Tensor,
    adapter_ids: torch.Tensor,
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    offsets: torch.Tensor,
    scales: torch.Tensor,
) -> list[torch.Tensor]:
    """lora_multi_ref for P projections sharing x, adapter_ids and the packing: y_p = lora_multi_ref(base_outs[p], x,
    adapter_ids, lora_as[p], lora_bs[p], offsets, scales). FLOPs and traffic: the sum of the P lora_multi ones."""
    return [lora_multi_ref(b, x, adapter_ids, a, bb, offsets, scales) for b, a, bb in zip(base_outs, lora_as, lora_bs)]
