"""LoRA fused with the base layer's output (Hu et al. 2021, eq. 3; QLoRA eq. 5):

    y = base_out + s (x A^T) B^T,      A (r, K), B (N, r), s = alpha / r
    backward, with u = x A^T and g = s dy B:   dA = g^T x,  dB = s dy^T u,  dx = g A,  d base_out = dy

and its per-row multi-adapter form (S-LoRA / Punica style): row m uses adapter i = ids[m] (-1: none),
whose A_i, B_i are slices [o_i, o_{i+1}) of row-concatenated A and column-concatenated B, so
adapters of different ranks are stored without padding. Single-adapter products all go through one
strided kernel, C = add + s A B^T. The multi-adapter form is a shrink (u_m = x_m A_i^T, once per row) and an
expand (y_m = base_m + s_i u_m B_i^T), Punica's BGMV split; the loop bound r_i is read on the device, so no
host sync and CUDA graphs can capture it.
"""
import torch

from ._dispatch import use_triton
from ._triton import tl, triton
from .cpu.lora import lora_cpu, lora_multi_cpu, lora_multi_group_cpu

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
        # int64 products: R is the token count in dA/dB, and rr * stride passes 2**31 past ~150k tokens at N = 14336
        a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * stride_am + rr.to(tl.int64)[None, :] * stride_ar,
                    mask=(rm < M)[:, None] & (rr < R)[None, :], other=0.0)
        b = tl.load(b_ptr + rn.to(tl.int64)[None, :] * stride_bn + rr.to(tl.int64)[:, None] * stride_br,
                    mask=(rn < N)[None, :] & (rr < R)[:, None], other=0.0)
        if FP32_DOT or a.dtype == tl.float32 or b.dtype == tl.float32:
            # an fp32 operand (fp32 model, or the fp32 gradient g in backward) is multiplied in IEEE fp32, not TF32
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
def _lora_shrink_kernel(
    x_ptr,  # (M, K) contiguous rows
    ids_ptr,  # (M,) int adapter index per row, -1 = none
    a_ptr,  # (sum r_i, K) view with strides (stride_ar, stride_ak): A_i is rows [o_i, o_{i+1})
    offsets_ptr,  # (num_adapters + 1,) int64: o_i
    u_ptr,  # (M, R_TOTAL) fp32, zero-filled: row m gets x_m A_i^T in columns [o_i, o_{i+1}) of its adapter
    K,
    R_TOTAL,
    stride_ar,
    stride_ak,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program m: the shrink u_m = x_m A_i^T (Punica BGMV), r_i rows of A_i in BLOCK_R chunks; the loop bound r_i is
    # read on the device, so no host sync picks a rank.
    m = tl.program_id(0).to(tl.int64)
    aid = tl.load(ids_ptr + m).to(tl.int32)
    safe = tl.where(aid >= 0, aid, 0)
    start = tl.load(offsets_ptr + safe)
    rank = tl.where(aid >= 0, tl.load(offsets_ptr + safe + 1) - start, 0)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rmask = rr < rank
        u = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + m * K + rk, mask=rk < K, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + (start + rr).to(tl.int64)[:, None] * stride_ar + rk.to(tl.int64)[None, :] * stride_ak,
                        mask=rmask[:, None] & (rk < K)[None, :], other=0.0).to(tl.float32)
            u += tl.sum(a * xk[None, :], axis=1)
        tl.store(u_ptr + m * R_TOTAL + start + rr, u, mask=rmask)


@triton.jit
def _lora_expand_kernel(
    u_ptr,  # (M, R_TOTAL) fp32 from the shrink
    ids_ptr,  # (M,) int adapter index per row, -1 = none
    b_ptr,  # (N, sum r_i) view with strides (stride_bn, stride_br): B_i is columns [o_i, o_{i+1})
    offsets_ptr,  # (num_adapters + 1,) int64: o_i
    scales_ptr,  # (num_adapters,) fp32: s_i
    base_ptr,  # (M, N) contiguous, added when HAS_BASE
    y_ptr,  # (M, N) contiguous output
    N,
    R_TOTAL,
    stride_bn,
    stride_br,
    HAS_BASE: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Program (m, j): the expand y[m, j BLOCK_N : (j + 1) BLOCK_N] = base + s_i u_m B_i^T over r_i in BLOCK_R chunks.
    m = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    aid = tl.load(ids_ptr + m).to(tl.int32)
    safe = tl.where(aid >= 0, aid, 0)
    start = tl.load(offsets_ptr + safe)
    rank = tl.where(aid >= 0, tl.load(offsets_ptr + safe + 1) - start, 0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rmask = rr < rank
        u = tl.load(u_ptr + m * R_TOTAL + start + rr, mask=rmask, other=0.0)
        b = tl.load(b_ptr + rn.to(tl.int64)[:, None] * stride_bn + (start + rr).to(tl.int64)[None, :] * stride_br,
                    mask=nmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(b * u[None, :], axis=1)
    if SCALE:
        acc = acc * tl.load(scales_ptr + safe)
    if HAS_BASE:
        acc += tl.load(base_ptr + m * N + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * N + rn, acc.to(y_ptr.dtype.element_ty), mask=nmask)


def _multi_config() -> dict:
    """Shrink/expand tiles (the same on every device: per-row GEMVs, no shared-memory staging)."""
    return {"BLOCK_R": 16, "BLOCK_K": 128, "BLOCK_N": 128, "num_warps": 4}


def _shrink(x: torch.Tensor, ids: torch.Tensor, a: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(M, R_TOTAL) fp32: row m holds x_m A_i^T in its adapter's columns, zeros elsewhere. `a` may be strided."""
    m, k = x.shape
    u = torch.zeros(m, a.shape[0], dtype=torch.float32, device=x.device)
    cfg = _multi_config()
    _lora_shrink_kernel[(m,)](x, ids, a, offsets, u, k, a.shape[0], a.stride(0), a.stride(1), BLOCK_R=cfg["BLOCK_R"],
                              BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return u


def _expand(u: torch.Tensor, ids: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor,
            base: torch.Tensor | None, dtype: torch.dtype, scale: bool) -> torch.Tensor:
    """(M, N) = base + s_i u_m B_i^T per row (s_i only when `scale`). `b` (N, R_TOTAL) may be strided."""
    m, n = u.shape[0], b.shape[0]
    y = torch.empty(m, n, dtype=dtype, device=u.device)
    cfg = _multi_config()
    _lora_expand_kernel[(m, triton.cdiv(n, cfg["BLOCK_N"]))](
        u, ids, b, offsets, scales, base if base is not None else y, y, n, u.shape[1], b.stride(0), b.stride(1),
        HAS_BASE=base is not None, SCALE=scale, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"], num_warps=cfg["num_warps"])
    return y


def _config(cuda: bool, fp32: bool = False) -> dict:
    """_lora_kernel tiles: 64 x 64 x 32 on CUDA for 16-bit operands (tensor cores); an fp32 operand means an IEEE FMA
    dot, whose operand tiles live in registers: 32 x 64 x 16 keeps it spill-free on sm_90 and sm_80
    (tests/unit/kernels/test_compile_cuda.py). Fewer, larger programs for the interpreter."""
    if cuda:
        return {"BLOCK_M": 32 if fp32 else 64, "BLOCK_N": 64, "BLOCK_R": 16 if fp32 else 32, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_R": 64}


def _mm(a: torch.Tensor, b: torch.Tensor, scale: float, add: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
    """add + scale * a @ b.T for strided 2-d a (M, R), b (N, R)."""
    m, r = a.shape
    n = b.shape[0]
    c = torch.empty(m, n, dtype=dtype or a.dtype, device=a.device)
    cfg = _config(a.is_cuda, torch.float32 in (a.dtype, b.dtype))
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
    """Forward: shrink then expand. Backward, with U the shrink output and S = diag(s_ids):
    G = S shrink(dy, B^T) (zero outside each row's adapter columns), dx = expand(G, A^T),
    dA = G^T x, dB = dy^T S U: two dense GEMMs whose zero blocks keep adapters apart; no host sync anywhere."""

    @staticmethod
    def forward(ctx, base_out, x, ids, lora_a, lora_b, offsets, scales):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        base2 = base_out.reshape(-1, base_out.shape[-1]).contiguous()
        ids = ids.reshape(-1).contiguous()
        u = _shrink(x2, ids, lora_a, offsets)
        y = _expand(u, ids, lora_b, offsets, scales, base2, base2.dtype, scale=True)
        ctx.save_for_backward(x2, ids, lora_a, lora_b, offsets, scales, u)
        ctx.x_shape = x.shape
        return y.view(base_out.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, ids, lora_a, lora_b, offsets, scales, u = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        s_row = torch.where(ids >= 0, scales[ids.clamp(min=0).long()], 0.0)[:, None]  # (M, 1), gathered on the device
        g = _shrink(dy2, ids, lora_b.t(), offsets) * s_row  # (M, R_TOTAL) = s dy B_i in row m's adapter columns
        dx = _expand(g, ids, lora_a.t(), offsets, scales, None, x2.dtype, scale=False) if ctx.needs_input_grad[1] else None
        da = (g.t() @ x2.float()).to(lora_a.dtype) if ctx.needs_input_grad[3] else None
        db = (dy2.t().float() @ (u * s_row)).to(lora_b.dtype) if ctx.needs_input_grad[4] else None
        return dy, dx.view(ctx.x_shape) if dx is not None else None, None, da, db, None, None


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
               lora_b: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, backend: str | None = None,
               reuse_base: bool = False) -> torch.Tensor:
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
        reuse_base: as in lora_multi_group (the CPU kernel may write the output into base_out).

    Returns:
        (..., N) in base_out.dtype.

    Raises:
        ValueError on mismatched shapes, dtypes or devices (checked before dispatch: every backend raises alike).
    """
    _check(base_out, x, lora_a, lora_b)
    bounds = _check_multi(x, adapter_ids, lora_a, offsets, scales)
    if not use_triton(x, backend):
        return lora_multi_cpu(base_out, x, adapter_ids, lora_a, lora_b, offsets, scales, bounds, reuse_base)
    return _LoraMulti.apply(base_out, x, adapter_ids, lora_a.contiguous(), lora_b.contiguous(),
                            offsets.to(torch.int64).contiguous(), scales.float().contiguous())


def lora_multi_group(base_outs: list[torch.Tensor], x: torch.Tensor, adapter_ids: torch.Tensor,
                     lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor], offsets: torch.Tensor, scales: torch.Tensor,
                     backend: str | None = None, reuse_base: bool = False) -> list[torch.Tensor]:
    """lora_multi for P projections that share their input and one adapter packing (q/k/v; gate/up):
    [lora_multi(base_outs[p], x, adapter_ids, lora_as[p], lora_bs[p], offsets, scales) for p], equal to those calls
    bit for bit.

    On CPU without autograd it is one kernels/cpu/lora.c call for all P (x cast once per tile of rows, each
    projection's sums in the order of its own call); with autograd, P lora_multi calls. On CUDA (and Triton by
    request) it is the P per-projection Triton lora_multi calls: there is no fused Triton kernel yet.

    Args:
        base_outs: P tensors (..., N_p), one dtype. x: (..., K), shared.
        adapter_ids, offsets, scales: as in lora_multi, shared by every projection.
        lora_as: P tensors (sum r_i, K); lora_bs: P tensors (N_p, sum r_i); each A_p and B_p as in lora_multi.
        backend: as in lora_multi.
        reuse_base: the caller gives up base_outs: the CPU kernel writes each output into its base_out instead of a
            new tensor (inference only; the returned list is the result either way).

    Returns:
        P tensors (..., N_p) in base_outs' dtype.

    Raises:
        ValueError on mismatched shapes, dtypes or devices, or a lora_as[p] whose rank rows differ from lora_as[0]'s.
    """
    if not base_outs or len(base_outs) != len(lora_as) or len(lora_as) != len(lora_bs):
        raise ValueError(f"lora_multi_group: {len(base_outs)} base outputs, {len(lora_as)} A and {len(lora_bs)} B: "
                         "one of each per projection, at least one")
    for b, a, bb in zip(base_outs, lora_as, lora_bs):
        _check(b, x, a, bb)
        if a.shape[0] != lora_as[0].shape[0]:
            raise ValueError(f"lora_multi_group: A {tuple(a.shape)} and A {tuple(lora_as[0].shape)} have different rank "
                             "rows: the projections of a group share one packing")
    bounds = _check_multi(x, adapter_ids, lora_as[0], offsets, scales)
    if not use_triton(x, backend):
        return lora_multi_group_cpu(base_outs, x, adapter_ids, lora_as, lora_bs, offsets, scales, bounds, reuse_base)
    off, sc = offsets.to(torch.int64).contiguous(), scales.float().contiguous()
    return [_LoraMulti.apply(b, x, adapter_ids, a.contiguous(), bb.contiguous(), off, sc)
            for b, a, bb in zip(base_outs, lora_as, lora_bs)]


_IDS_SEEN: tuple = (None, -1, 0, 0)  # (ids, version, lo, hi): the last host adapter_ids whose range was read; every
                                    # layer of a forward passes the same ids, so it is read once per forward
_BOUNDS_SEEN: dict[int, tuple] = {}  # id(offsets) -> (offsets, version, bounds) of host offsets already read and found
                                     # cut in order (one per layer's packing); the tensor is held, so its id stays its own


def _check_multi(x, adapter_ids, lora_a, offsets, scales) -> list[int] | None:
    """Shapes always; values only where they are already on the host. On CUDA, reading offsets[-1] or the id range
    would be a device-to-host sync per layer (and illegal during CUDA-graph capture), so those two checks become
    device-side asserts (torch._assert_async): a bad value aborts at the next sync instead of raising ValueError.
    Host values are read once per tensor (and version): the ids' range and each offsets tensor's bounds are
    remembered, and only the comparisons with this call's rank rows and adapter count are made again.
    Returns the offsets as host integers when they were read here (CPU), else None."""
    n_adapters = scales.numel()
    if offsets.shape != (n_adapters + 1,) or offsets.dtype.is_floating_point:
        raise ValueError(f"lora_multi: offsets {offsets.dtype} {tuple(offsets.shape)} must be {n_adapters + 1} integers "
                         "(num_adapters + 1)")
    if adapter_ids.shape != x.shape[:-1] or adapter_ids.dtype.is_floating_point:
        raise ValueError(f"lora_multi: adapter_ids {adapter_ids.dtype} {tuple(adapter_ids.shape)} must be integers "
                         f"matching x's rows {tuple(x.shape[:-1])}")
    if offsets.is_cuda or adapter_ids.is_cuda:
        return _check_values(x, adapter_ids, lora_a, offsets, n_adapters)
    bounds = _host_bounds(offsets)
    if bounds is None or bounds[-1] != lora_a.shape[0]:
        return _check_values(x, adapter_ids, lora_a, offsets, n_adapters)  # raises, naming the offsets
    if adapter_ids.numel():
        lo, hi = _host_range(adapter_ids)
        if not -1 <= lo <= hi < n_adapters:
            return _check_values(x, adapter_ids, lora_a, offsets, n_adapters)  # raises, naming the ids
    return bounds


def _host_bounds(offsets: torch.Tensor) -> list[int] | None:
    """offsets.tolist() when it starts at 0 and never decreases, else None; remembered per tensor and version."""
    version = -1 if offsets.is_inference() else offsets._version  # inference tensors have no version counter
    seen = _BOUNDS_SEEN.get(id(offsets))
    if seen is not None and seen[0] is offsets and seen[1] == version:
        return seen[2]
    bounds = offsets.tolist()
    if bounds[0] != 0 or sorted(bounds) != bounds:
        return None
    if len(_BOUNDS_SEEN) >= 4096:  # packings made and dropped (adapters added, removed): forget them all
        _BOUNDS_SEEN.clear()
    _BOUNDS_SEEN[id(offsets)] = (offsets, version, bounds)
    return bounds


def _host_range(adapter_ids: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty host adapter_ids, remembered for the last tensor and version."""
    global _IDS_SEEN
    version = -1 if adapter_ids.is_inference() else adapter_ids._version
    seen = _IDS_SEEN
    if seen[0] is adapter_ids and seen[1] == version:
        return seen[2], seen[3]
    lo, hi = torch.aminmax(adapter_ids)
    _IDS_SEEN = (adapter_ids, version, int(lo), int(hi))
    return _IDS_SEEN[2], _IDS_SEEN[3]


def _check_values(x, adapter_ids, lora_a, offsets, n_adapters: int) -> list[int] | None:
    """_check_multi's value checks (device-side asserts for CUDA tensors, ValueError on the host)."""
    if offsets.is_cuda:
        cut_ok = (offsets[-1] == lora_a.shape[0]) & (offsets[0] == 0) & (offsets[1:] >= offsets[:-1]).all()
        torch._assert_async(cut_ok, f"lora_multi: offsets do not cut {lora_a.shape[0]} rank rows")
    bounds = None
    if not offsets.is_cuda:  # a few host integers: checked in Python, two torch ops rather than ten per layer
        bounds = offsets.tolist()
        if bounds[0] != 0 or bounds[-1] != lora_a.shape[0] or sorted(bounds) != bounds:
            raise ValueError(f"lora_multi: offsets {bounds} do not cut {lora_a.shape[0]} rank rows into {n_adapters} adapters")
    if adapter_ids.is_cuda:
        ids_ok = ((adapter_ids >= -1) & (adapter_ids < n_adapters)).all()
        torch._assert_async(ids_ok, f"lora_multi: adapter_ids must lie in [-1, {n_adapters})")
    elif adapter_ids.numel() and not -1 <= int((lo_hi := torch.aminmax(adapter_ids))[0]) <= int(lo_hi[1]) < n_adapters:
        raise ValueError(f"lora_multi: adapter_ids {tuple(adapter_ids.shape)} must match x's rows and lie in [-1, {n_adapters})")
    return bounds


def _check(base_out, x, lora_a, lora_b) -> None:
    if (x.dtype not in _DTYPES or lora_a.dtype not in _DTYPES or lora_b.dtype != lora_a.dtype
            or base_out.dtype not in _DTYPES):
        raise ValueError(f"lora: x {x.dtype}, A {lora_a.dtype}, B {lora_b.dtype}, base_out {base_out.dtype}: each must be "
                         "bf16, fp16 or fp32, and A and B must share one")
    xs, ys, sa, sb = x.shape, base_out.shape, lora_a.shape, lora_b.shape  # each .shape makes a new torch.Size
    if sa[1] != xs[-1] or sb[0] != ys[-1] or sb[1] != sa[0] or ys[:-1] != xs[:-1]:
        raise ValueError(f"lora: base_out {tuple(ys)}, x {tuple(xs)}, A {tuple(sa)}, B {tuple(sb)} do not fit")
    # all on the CPU (one device; is_cpu is a flag, .device builds an object): the common case checked cheaply
    if not (base_out.is_cpu and x.is_cpu and lora_a.is_cpu and lora_b.is_cpu) and len(
            {t.device for t in (base_out, x, lora_a, lora_b)}) != 1:
        raise ValueError("lora: base_out, x, A and B must be on one device")
