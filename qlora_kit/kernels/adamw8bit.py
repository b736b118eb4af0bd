"""Triton AdamW step on blockwise 8-bit states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").

Per block k of BLOCKSIZE elements, with D1 the signed and D2 the unsigned dynamic map:
    m = D1[q1] a1_k,  v = D2[q2] a2_k
    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
    p = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)      (AdamW, Loshchilov & Hutter 2019)
    a1_k = max_k |m|,  q1 = argmin_j |m / a1_k - D1_j|   (ties to the lower code; likewise v)
"""
import math
import weakref

import torch

from ._dispatch import use_triton
from ._triton import tl, triton
from .ref.adamw8bit import adamw8bit_ref

_PARAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _adamw8bit_block(
    blk,  # the quantization block this program owns: elements [blk BLOCKSIZE, (blk + 1) BLOCKSIZE)
    p_ptr,  # (n,) parameter, updated in place
    g_ptr,  # (n,) gradient
    q1_ptr,  # (n,) uint8 codes of m into D1, updated in place
    q2_ptr,  # (n,) uint8 codes of v into D2, updated in place
    a1_ptr,  # (blocks,) fp32 absmax of m, updated in place
    a2_ptr,  # (blocks,) fp32 absmax of v, updated in place
    d1_ptr,  # (256,) fp32 sorted signed dynamic map D1
    d2_ptr,  # (256,) fp32 sorted unsigned dynamic map D2
    mid1_ptr,  # (256,) fp32 midpoints between consecutive D1 entries (last entry unused)
    mid2_ptr,  # (256,) fp32 midpoints of D2
    n,
    beta1,
    beta2,
    eps,
    decay,  # 1 - lr * weight_decay
    step_size,  # lr / (1 - beta1^t)
    inv_bc2_sqrt,  # 1 / sqrt(1 - beta2^t)
    BLOCKSIZE: tl.constexpr,
):
    """One block's AdamW step and requantization (the module docstring's equations)."""
    off = blk.to(tl.int64) * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    mask = off < n
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32)
    q1 = tl.load(q1_ptr + off, mask=mask, other=0).to(tl.int32)
    q2 = tl.load(q2_ptr + off, mask=mask, other=0).to(tl.int32)
    m = tl.load(d1_ptr + q1) * tl.load(a1_ptr + blk)
    v = tl.load(d2_ptr + q2) * tl.load(a2_ptr + blk)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * (g * g)
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
    # div_rn: IEEE round-to-nearest division, as torch divides in the twin (Triton's `/` on fp32 is div.full, ~2 ulp)
    p = p * decay - step_size * tl.math.div_rn(m, denom)
    tl.store(p_ptr + off, p.to(p_ptr.dtype.element_ty), mask=mask)
    # requantize: new absmax, then a branch-free binary search over the 255 sorted midpoints
    am1 = tl.max(tl.abs(m), axis=0)
    am2 = tl.max(v, axis=0)
    s1 = tl.where(am1 > 0, tl.math.div_rn(m, tl.where(am1 > 0, am1, 1.0)), 0.0)
    s2 = tl.where(am2 > 0, tl.math.div_rn(v, tl.where(am2 > 0, am2, 1.0)), 0.0)
    c1 = tl.zeros((BLOCKSIZE,), dtype=tl.int32)
    c2 = tl.zeros((BLOCKSIZE,), dtype=tl.int32)
    for i in tl.static_range(8):
        half = 128 >> i
        c1 = tl.where(tl.load(mid1_ptr + c1 + half - 1) < s1, c1 + half, c1)
        c2 = tl.where(tl.load(mid2_ptr + c2 + half - 1) < s2, c2 + half, c2)
    tl.store(q1_ptr + off, c1.to(tl.uint8), mask=mask)
    tl.store(q2_ptr + off, c2.to(tl.uint8), mask=mask)
    tl.store(a1_ptr + blk, am1)
    tl.store(a2_ptr + blk, am2)


@triton.jit
def _adamw8bit_kernel(
    p_ptr, g_ptr, q1_ptr, q2_ptr, a1_ptr, a2_ptr,  # one tensor's param, grad, codes, absmax (see _adamw8bit_block)
    d1_ptr, d2_ptr, mid1_ptr, mid2_ptr,  # (256,) fp32 maps and their midpoints
    n, beta1, beta2, eps, decay, step_size, inv_bc2_sqrt,
    BLOCKSIZE: tl.constexpr,
):
    # Program k owns quantization block k of the one tensor.
    _adamw8bit_block(tl.program_id(0), p_ptr, g_ptr, q1_ptr, q2_ptr, a1_ptr, a2_ptr, d1_ptr, d2_ptr, mid1_ptr, mid2_ptr,
                     n, beta1, beta2, eps, decay, step_size, inv_bc2_sqrt, BLOCKSIZE)


@triton.jit
def _adamw8bit_multi_kernel(
    addr_ptr,  # (T, 6) int64: addresses of tensor i's param, grad, codes 1, codes 2, absmax 1, absmax 2
    numel_ptr,  # (T,) int64: n_i
    owner_ptr,  # (total blocks,) int32: the tensor i owning global block k
    first_ptr,  # (T,) int32: tensor i's first global block
    d1_ptr, d2_ptr, mid1_ptr, mid2_ptr,  # (256,) fp32 maps and their midpoints
    beta1, beta2, eps, decay, step_size, inv_bc2_sqrt,
    P_DTYPE: tl.constexpr,  # every param of one launch has one dtype, every grad one dtype
    G_DTYPE: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
):
    # Program k owns global block k = tensor i's local block k - first_i: one launch steps every tensor of a group.
    k = tl.program_id(0)
    i = tl.load(owner_ptr + k)
    row = addr_ptr + i.to(tl.int64) * 6
    _adamw8bit_block(
        k - tl.load(first_ptr + i),
        tl.load(row).to(tl.pointer_type(P_DTYPE)), tl.load(row + 1).to(tl.pointer_type(G_DTYPE)),
        tl.load(row + 2).to(tl.pointer_type(tl.uint8)), tl.load(row + 3).to(tl.pointer_type(tl.uint8)),
        tl.load(row + 4).to(tl.pointer_type(tl.float32)), tl.load(row + 5).to(tl.pointer_type(tl.float32)),
        d1_ptr, d2_ptr, mid1_ptr, mid2_ptr, tl.load(numel_ptr + i), beta1, beta2, eps, decay, step_size, inv_bc2_sqrt,
        BLOCKSIZE)


_MIDPOINTS: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}  # id(map) -> (the map, its version, midpoints)


def _midpoints(qmap: torch.Tensor) -> torch.Tensor:
    """(256,) midpoints between consecutive map entries (last entry unused), built once per map tensor and version,
    not 4 small kernels per parameter tensor per step."""
    cached = _MIDPOINTS.get(id(qmap))
    if cached is None or cached[0]() is not qmap or cached[1] != qmap._version:
        if len(_MIDPOINTS) > 64:  # maps are a few per optimizer; drop entries whose map is gone
            for key in [k for k, v in _MIDPOINTS.items() if v[0]() is None]:
                del _MIDPOINTS[key]
        cached = _MIDPOINTS[id(qmap)] = (weakref.ref(qmap), qmap._version, torch.cat([(qmap[:-1] + qmap[1:]) / 2, qmap[-1:]]))
    return cached[2]


def _config(blocksize: int) -> dict:
    """One program per quantization block; 8 warps past 512 elements."""
    return {"num_warps": 4 if blocksize <= 512 else 8}


def adamw8bit(param: torch.Tensor, grad: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor,
              absmax1: torch.Tensor, absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor, step: int,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, blocksize: int = 256,
              backend: str | None = None) -> None:
    """One in-place AdamW step of `param` with blockwise 8-bit first/second moments.

    Args:
        param: (...) bf16, fp16 or fp32, contiguous; updated in place.
        grad: same shape as param, any float dtype.
        state1, state2: uint8, param.numel() elements: codes of m into qmap1, of v into qmap2.
        absmax1, absmax2: (ceil(n / blocksize),) fp32 per-block scales.
        qmap1, qmap2: (256,) fp32 sorted maps: signed dynamic for m, unsigned dynamic for v.
        step: 1-based step count t (bias correction). lr, beta1, beta2, eps, weight_decay: AdamW hyperparameters.
        blocksize: elements per quantization block, a power of two (bitsandbytes uses 256).
        backend: None/"auto", "torch" or "triton" (kernels/_dispatch.py).

    Raises:
        ValueError on a wrong dtype, size, device or non-contiguous tensor.
    """
    if not use_triton(param, backend):
        return adamw8bit_ref(param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, step, lr, beta1, beta2, eps,
                             weight_decay, blocksize)
    n = param.numel()
    blocks = _check(param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, blocksize)
    mid1, mid2 = _midpoints(qmap1), _midpoints(qmap2)
    _adamw8bit_kernel[(blocks,)](
        param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, mid1, mid2, n,
        beta1, beta2, eps, 1.0 - lr * weight_decay, lr / (1.0 - beta1**step), 1.0 / math.sqrt(1.0 - beta2**step),
        BLOCKSIZE=blocksize, enable_fp_fusion=False, **_config(blocksize),
    )


def adamw8bit_multi(params: list[torch.Tensor], grads: list[torch.Tensor], states1: list[torch.Tensor],
                    states2: list[torch.Tensor], absmax1: list[torch.Tensor], absmax2: list[torch.Tensor],
                    qmap1: torch.Tensor, qmap2: torch.Tensor, step: int, lr: float, beta1: float, beta2: float,
                    eps: float, weight_decay: float, blocksize: int = 256, backend: str | None = None) -> None:
    """`adamw8bit` over many tensors sharing one step count and hyperparameters: one launch per (param dtype,
    grad dtype) group instead of one per tensor (a QLoRA model has hundreds of small LoRA matrices).

    Args:
        params, grads, states1, states2, absmax1, absmax2: equal-length lists, element i as in `adamw8bit`.
        The rest: as in `adamw8bit`.

    Raises:
        ValueError on mismatched list lengths, or any element `adamw8bit` would reject.
    """
    lists = (params, grads, states1, states2, absmax1, absmax2)
    if len({len(x) for x in lists}) != 1:
        raise ValueError(f"adamw8bit_multi: list lengths {[len(x) for x in lists]} differ")
    if not params:
        return
    if not use_triton(params[0], backend):
        for one in zip(*lists):
            adamw8bit_ref(*one, qmap1, qmap2, step, lr, beta1, beta2, eps, weight_decay, blocksize)
        return
    groups: dict = {}
    for one in zip(*lists):
        _check(*one, qmap1, qmap2, blocksize)
        if one[1].dtype not in _PARAM_DTYPES or one[4].dtype != torch.float32 or one[5].dtype != torch.float32:
            raise ValueError(f"adamw8bit_multi: grad {one[1].dtype} must be bf16/fp16/fp32 and absmax fp32")
        if one[0].device != params[0].device:
            raise ValueError("adamw8bit_multi: every tensor must be on one device")
        groups.setdefault((one[0].dtype, one[1].dtype), []).append(one)
    mid1, mid2 = _midpoints(qmap1), _midpoints(qmap2)
    for (p_dtype, g_dtype), members in groups.items():
        addr, numel, owner, first, blocks = _tables(members, blocksize)
        _adamw8bit_multi_kernel[(blocks,)](
            addr, numel, owner, first, qmap1, qmap2, mid1, mid2,
            beta1, beta2, eps, 1.0 - lr * weight_decay, lr / (1.0 - beta1**step), 1.0 / math.sqrt(1.0 - beta2**step),
            P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], BLOCKSIZE=blocksize, enable_fp_fusion=False,
            **_config(blocksize),
        )


_TABLES: dict = {}  # (addresses, sizes, blocksize) -> device tables: built once, since parameters and states stay put


def _tables(members: list, blocksize: int) -> tuple:
    """Address, size and block-owner tables for one launch, cached by the tensors' addresses (no copy per step)."""
    addrs = tuple(t.data_ptr() for one in members for t in one)
    sizes = tuple(one[0].numel() for one in members)
    key = (addrs, sizes, blocksize, members[0][0].device)
    if key not in _TABLES:
        device = members[0][0].device
        counts = [-(-n // blocksize) for n in sizes]
        firsts = [sum(counts[:i]) for i in range(len(counts))]
        owner = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32), torch.tensor(counts))
        if len(_TABLES) > 256:
            _TABLES.clear()
        _TABLES[key] = (torch.tensor(addrs, dtype=torch.int64).view(-1, 6).to(device),
                        torch.tensor(sizes, dtype=torch.int64).to(device), owner.to(device),
                        torch.tensor(firsts, dtype=torch.int32).to(device), sum(counts))
    return _TABLES[key]


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _check(param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, blocksize) -> int:
    """Validate one tensor's step inputs; returns its block count."""
    n = param.numel()
    blocks = -(-n // blocksize)
    if param.dtype not in _PARAM_DTYPES or state1.dtype != torch.uint8 or state2.dtype != torch.uint8:
        raise ValueError(f"adamw8bit: param {param.dtype} must be bf16/fp16/fp32 and states uint8 ({state1.dtype}, {state2.dtype})")
    if grad.numel() != n or state1.numel() != n or state2.numel() != n or absmax1.numel() != blocks or absmax2.numel() != blocks:
        raise ValueError(f"adamw8bit: grad/state/absmax sizes do not fit {n} elements in {blocks} blocks of {blocksize}")
    if blocksize & (blocksize - 1) or qmap1.numel() != 256 or qmap2.numel() != 256:
        raise ValueError(f"adamw8bit: blocksize={blocksize} must be a power of two and both maps 256 entries")
    tensors = (param, grad, state1, state2, absmax1, absmax2)
    if not all(t.is_contiguous() for t in tensors) or len({t.device for t in tensors + (qmap1, qmap2)}) != 1:
        raise ValueError("adamw8bit: param, grad, states and maps must be contiguous and on one device")
    return blocks
