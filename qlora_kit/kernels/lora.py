"""LoRA fused with the base layer's output (Hu et al. 2021, eq. 3; QLoRA eq. 5):

    y = base_out + s (x A^T) B^T,      A (r, K), B (N, r), s = alpha / r
    backward, with u = x A^T and g = s dy B:   dA = g^T x,  dB = s dy^T u,  dx = g A,  d base_out = dy

and its per-row multi-adapter form (S-LoRA / Punica style): row m uses adapter i = ids[m] (-1: none),
whose A_i, B_i are slices [o_i, o_{i+1}) of row-concatenated A and column-concatenated B, so
adapters of different ranks are stored without padding. Single-adapter products all go through one
strided kernel, C = add + s A B^T.
"""
import torch

from ._dispatch import use_triton
from ._triton import tl, triton
from .cpu.lora import lora_cpu, lora_multi_cpu

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _lora_kernel(
    a_ptr,  # (M, R) left operand, strides (stride_am, stride_ar)
    b_ptr,  # (N, R) right operand (used transposed), strides (stride_bn, stride_br)
    add_ptr,  # (M, N) contiguous, added when HAS_ADD (the base layer output)
    c_ptr,  # (M, N) contiguous output
    M,
    N,
    R,
    stride_am,
    stride_ar,
    stride_bn,
    stride_br,
    scale,
    HAS_ADD: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Program (i, j) owns C rows [i BLOCK_M, ...) x cols [j BLOCK_N, ...), reducing over R in BLOCK_R steps.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * stride_am + rr[None, :] * stride_ar,
                    mask=(rm < M)[:, None] & (rr < R)[None, :], other=0.0)
        b = tl.load(b_ptr + rn.to(tl.int64)[None, :] * stride_bn + rr[:, None] * stride_br,
                    mask=(rn < N)[None, :] & (rr < R)[:, None], other=0.0)
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
    acc = acc * scale
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if HAS_ADD:
        acc += tl.load(add_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_multi_kernel(
    x_ptr,  # (M, K) contiguous activations
    base_ptr,  # (M, N) contiguous base layer output
    ids_ptr,  # (M,) int32/int64 adapter index per row, -1 = none
    a_ptr,  # (sum r_i, K) contiguous: A_i stacked by rows
    b_ptr,  # (N, sum r_i) contiguous: B_i stacked by columns
    offsets_ptr,  # (num_adapters + 1,) int64: o_i, the first row of A_i / column of B_i
    scales_ptr,  # (num_adapters,) fp32: s_i
    y_ptr,  # (M, N) output
    N,
    K,
    R_TOTAL,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Program (m, j) computes y[m, j BLOCK_N : (j + 1) BLOCK_N]; it recomputes row m's u = x_m A_i^T (r_i <= BLOCK_R).
    m = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    aid = tl.load(ids_ptr + m).to(tl.int32)
    has = aid >= 0
    safe = tl.where(has, aid, 0)
    start = tl.load(offsets_ptr + safe)
    rank = tl.where(has, tl.load(offsets_ptr + safe + 1) - start, 0)
    scale = tl.load(scales_ptr + safe)
    rr = tl.arange(0, BLOCK_R)
    u = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + m * K + rk, mask=rk < K, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + (start + rr).to(tl.int64)[:, None] * K + rk[None, :],
                    mask=(rr < rank)[:, None] & (rk < K)[None, :], other=0.0).to(tl.float32)
        u += tl.sum(a * xk[None, :], axis=1)
    b = tl.load(b_ptr + rn.to(tl.int64)[None, :] * R_TOTAL + (start + rr)[:, None],
                mask=(rr < rank)[:, None] & (rn < N)[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(u[:, None] * b, axis=0) * scale
    base = tl.load(base_ptr + m * N + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * N + rn, (base + delta).to(y_ptr.dtype.element_ty), mask=rn < N)


def _mm(a: torch.Tensor, b: torch.Tensor, scale: float, add: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
    """add + scale * a @ b.T for strided 2-d a (M, R), b (N, R)."""
    m, r = a.shape
    n = b.shape[0]
    c = torch.empty(m, n, dtype=dtype or a.dtype, device=a.device)
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 32} if a.is_cuda else {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_R": 64}
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _lora_kernel[grid](a, b, add if add is not None else c, c, m, n, r, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                       float(scale), HAS_ADD=add is not None, FP32_DOT=not a.is_cuda, **cfg)
    return c


class _Lora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        base2 = base_out.reshape(-1, base_out.shape[-1]).contiguous()
        u = _mm(x2, lora_a, 1.0)  # (M, r) in x's dtype, as PEFT's lora_A output
        ctx.save_for_backward(x2, lora_a, lora_b, u)
        ctx.scale, ctx.x_shape = scale, x.shape
        return _mm(u, lora_b, scale, add=base2, dtype=base_out.dtype).view(base_out.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, lora_a, lora_b, u = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        g = _mm(dy2, lora_b.t(), ctx.scale, dtype=torch.float32)  # (M, r) = s dy B
        da = _mm(g.t(), x2.t(), 1.0).to(lora_a.dtype) if ctx.needs_input_grad[2] else None  # (r, K)
        db = _mm(dy2.t(), u.t(), ctx.scale, dtype=torch.float32).to(lora_b.dtype) if ctx.needs_input_grad[3] else None
        dx = _mm(g, lora_a.t(), 1.0, dtype=x2.dtype).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        return dy, dx, da, db, None


class _LoraMulti(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out, x, ids, lora_a, lora_b, offsets, scales):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        base2 = base_out.reshape(-1, base_out.shape[-1]).contiguous()
        m, k = x2.shape
        n = base2.shape[1]
        ranks = offsets[1:] - offsets[:-1]
        block_r = triton.next_power_of_2(max(int(ranks.max()) if ranks.numel() else 1, 1))
        y = torch.empty_like(base2)
        grid = (m, triton.cdiv(n, 128))
        _lora_multi_kernel[grid](x2, base2, ids.reshape(-1).contiguous(), lora_a, lora_b, offsets, scales, y,
                                 n, k, lora_a.shape[0], BLOCK_N=128, BLOCK_K=64, BLOCK_R=block_r)
        ctx.save_for_backward(x2, ids, lora_a, lora_b, offsets, scales)
        ctx.x_shape = x.shape
        return y.view(base_out.shape)

    @staticmethod
    def backward(ctx, dy):
        # Grouped by adapter: each adapter's rows form one dense LoRA backward (see the module docstring).
        x2, ids, lora_a, lora_b, offsets, scales = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).float()
        ids = ids.reshape(-1)
        dx = torch.zeros(x2.shape, dtype=torch.float32, device=x2.device)
        da = torch.zeros(lora_a.shape, dtype=torch.float32, device=x2.device)
        db = torch.zeros(lora_b.shape, dtype=torch.float32, device=x2.device)
        bounds = offsets.tolist()
        for i in range(len(bounds) - 1):
            o0, o1 = bounds[i], bounds[i + 1]
            sel = (ids == i).nonzero().squeeze(1)
            if sel.numel() == 0 or o1 == o0:
                continue
            a, b, s = lora_a[o0:o1].float(), lora_b[:, o0:o1].float(), scales[i].float()
            xs, gs = x2[sel].float(), dy2[sel]
            g = s * (gs @ b)
            da[o0:o1] = g.t() @ xs
            db[:, o0:o1] = s * (gs.t() @ (xs @ a.t()))
            dx[sel] = g @ a
        return (dy, dx.to(x2.dtype).view(ctx.x_shape), None, da.to(lora_a.dtype), db.to(lora_b.dtype), None, None)


def lora(base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
         backend: str | None = None) -> torch.Tensor:
    """base_out + scale * (x @ A^T) @ B^T, differentiable in base_out, x, A and B.

    Args:
        base_out: (..., N) the frozen base layer's output (e.g. from nf4_matmul).
        x: (..., K) the layer input, same leading shape and dtype as base_out.
        lora_a: (r, K). lora_b: (N, r). One dtype (e.g. fp32 masters under bf16 activations): Triton casts them to
            x's dtype in registers; the CPU path computes in their dtype (fp32 GEMMs beat bf16 ones on CPUs without
            AVX-512 BF16) and adds the product in base_out's dtype.
        scale: alpha / r.
        backend: None/"auto", "torch" or "triton" (kernels/_dispatch.py). "torch" runs kernels/cpu/lora.py (the
            twin, kernels/ref/lora.py, is its test oracle).

    Returns:
        (..., N) in base_out.dtype.

    Raises:
        ValueError on mismatched shapes, dtypes or devices (checked before dispatch: every backend raises alike).
    """
    _check(base_out, x, lora_a, lora_b)
    if not use_triton(x, backend):
        return lora_cpu(base_out, x, lora_a, lora_b, scale)
    return _Lora.apply(base_out, x, lora_a, lora_b, scale)


def lora_multi(base_out: torch.Tensor, x: torch.Tensor, adapter_ids: torch.Tensor, lora_a: torch.Tensor,
               lora_b: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Per-row multi-adapter LoRA: y_m = base_m + s_i (x_m A_i^T) B_i^T, i = adapter_ids[m] (-1: y_m = base_m).

    Args:
        base_out: (..., N). x: (..., K), same leading shape.
        adapter_ids: (...) integer adapter index per row, -1 for none.
        lora_a: (sum r_i, K) = torch.cat([A_0, A_1, ...]); lora_b: (N, sum r_i) = torch.cat([B_0, B_1, ...], dim=1).
            Concatenating trainable A_i / B_i keeps them differentiable. One dtype, as in lora().
        offsets: (num_adapters + 1,) int64 cumulative ranks [0, r_0, r_0 + r_1, ...].
        scales: (num_adapters,) fp32 alpha_i / r_i.
        backend: None/"auto", "torch" or "triton" (kernels/_dispatch.py). "torch" runs kernels/cpu/lora.py, grouped
            bmm by distinct rank (the twin, kernels/ref/lora.py, is its test oracle).

    Returns:
        (..., N) in base_out.dtype.

    Raises:
        ValueError on mismatched shapes, dtypes or devices (checked before dispatch: every backend raises alike).
    """
    _check(base_out, x, lora_a, lora_b)
    n_adapters = scales.numel()
    if (offsets.shape != (n_adapters + 1,) or offsets.dtype.is_floating_point or int(offsets[0]) != 0
            or int(offsets[-1]) != lora_a.shape[0] or bool((offsets[1:] < offsets[:-1]).any())):
        raise ValueError(f"lora_multi: offsets {offsets.tolist()} do not cut {lora_a.shape[0]} rank rows into {n_adapters} adapters")
    if (adapter_ids.shape != x.shape[:-1] or adapter_ids.dtype.is_floating_point
            or bool(((adapter_ids < -1) | (adapter_ids >= n_adapters)).any())):
        raise ValueError(f"lora_multi: adapter_ids {tuple(adapter_ids.shape)} must match x's rows and lie in [-1, {n_adapters})")
    if not use_triton(x, backend):
        return lora_multi_cpu(base_out, x, adapter_ids, lora_a, lora_b, offsets, scales)
    return _LoraMulti.apply(base_out, x, adapter_ids, lora_a.contiguous(), lora_b.contiguous(),
                            offsets.to(torch.int64).contiguous(), scales.float().contiguous())


def _check(base_out, x, lora_a, lora_b) -> None:
    if (x.dtype not in _DTYPES or lora_a.dtype not in _DTYPES or lora_b.dtype != lora_a.dtype
            or base_out.dtype not in _DTYPES):
        raise ValueError(f"lora: x {x.dtype}, A {lora_a.dtype}, B {lora_b.dtype}, base_out {base_out.dtype}: each must be "
                         "bf16, fp16 or fp32, and A and B must share one")
    if (lora_a.shape[1] != x.shape[-1] or lora_b.shape[0] != base_out.shape[-1] or lora_b.shape[1] != lora_a.shape[0]
            or base_out.shape[:-1] != x.shape[:-1]):
        raise ValueError(f"lora: base_out {tuple(base_out.shape)}, x {tuple(x.shape)}, A {tuple(lora_a.shape)}, "
                         f"B {tuple(lora_b.shape)} do not fit")
    if len({t.device for t in (base_out, x, lora_a, lora_b)}) != 1:
        raise ValueError("lora: base_out, x, A and B must be on one device")
