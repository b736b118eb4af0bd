"""Fused NF4 dequant + matmul, forward and backward (QLoRA, Dettmers et al. 2023, eq. 5 without the LoRA term).

    forward:   Y = X W'^T (+ b)        backward:  dX = dY W'
with W' (N, K) decoded inside the kernel tile by tile, never stored: W'_i = Q[code_i] * absmax_k,
k = i // B, i = n K + k_col (FORMAT.md §2.3), and absmax_k = D[q_k] s_{k // 256} + c under double quant.
One kernel serves both directions: it computes C (M, O) = A (M, R) . T (R, O) where T is W'^T
(forward: O = N, R = K) or W' (backward: O = K, R = N).

Routing (`_fused`): the fused kernel serves decode-sized 16-bit batches (M <= 64, the memory-bound GEMV regime);
fp32 activations, larger batches and rows not made of whole blocks go to `dequant` + torch.matmul (cuBLAS),
which decodes W' once per call instead of once per M tile and keeps fp32 products IEEE.
"""
import torch

from qlora_kit.formats import Packed4bit

from ._checks import check_packed
from ._device import Target, device_target
from ._dispatch import use_cpu_kernels, use_triton
from ._triton import tl, triton
from .cpu import nf4_matmul_cpu, supports
from .dequant import _load_absmax, dequant
from .ref.nf4_matmul import nf4_matmul_ref

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _decode_tile(
    data_ptr,  # uint8 [N K / 2]: row n of W' is bytes [n K / 2, (n + 1) K / 2), high nibble first
    absmax_ptr,  # fp32 [N K / B], or uint8 codes into nested_code when NESTED
    code_ptr,  # fp32 [16]: the codebook Q
    nested_absmax_ptr,  # fp32 [ceil(blocks / NESTED_BLOCKSIZE)]: s_m
    nested_code_ptr,  # fp32 [256]: the dynamic map D
    offset_ptr,  # fp32 0-d: c (a pointer, so no host read and CUDA graphs can capture the launch)
    rn,  # (BN,) rows of W'
    k0,  # first column of the tile, a multiple of BK
    N,
    K,  # a multiple of BLOCKSIZE, so no quantization block straddles two rows
    K_BYTES,  # K // 2, passed so Triton sees its divisibility by 16 and copies packed bytes 16 at a time
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """W'[rn, k0 : k0 + BK] as a (BN, BK) fp32 tile: each thread loads contiguous packed bytes along a row
    and each quantization block's absmax is loaded once per tile, not per element (FORMAT.md §2.3)."""
    rb = k0 // 2 + tl.arange(0, BK // 2)
    rows = rn.to(tl.int64)
    nmask = rn < N
    byte = tl.load(data_ptr + rows[:, None] * K_BYTES + rb[None, :], mask=nmask[:, None] & (rb < K_BYTES)[None, :],
                   other=0).to(tl.int32)
    G: tl.constexpr = BK // BLOCKSIZE if BK >= BLOCKSIZE else 1
    kb = k0 // BLOCKSIZE + tl.arange(0, G)
    blk = rows[:, None] * (K // BLOCKSIZE) + kb[None, :]  # (BN, G) block ids
    bmask = nmask[:, None] & (kb < K // BLOCKSIZE)[None, :]
    am = _load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, bmask, NESTED_BLOCKSIZE, NESTED)
    if BK >= BLOCKSIZE:
        am = tl.reshape(tl.broadcast_to(am[:, :, None], (BN, G, BLOCKSIZE // 2)), (BN, BK // 2))
    hi = tl.load(code_ptr + (byte >> 4)) * am
    lo = tl.load(code_ptr + (byte & 0xF)) * am
    return tl.interleave(hi, lo)


@triton.jit
def _nf4_matmul_kernel(
    a_ptr,  # (M, R) contiguous: x (forward) or dY (backward)
    data_ptr,  # uint8 [N K / 2]: byte j holds element 2j (high nibble) and 2j + 1 (low nibble)
    absmax_ptr,  # fp32 [N K / B], or uint8 codes into nested_code when NESTED
    code_ptr,  # fp32 [16]: the codebook Q
    nested_absmax_ptr,  # fp32 [ceil(blocks / NESTED_BLOCKSIZE)]: s_m (read only when NESTED)
    nested_code_ptr,  # fp32 [256]: the dynamic map D (read only when NESTED)
    offset_ptr,  # fp32 0-d: c (read only when NESTED)
    c_ptr,  # (M, O) contiguous output
    M,
    O,
    R,
    N,  # out_features: rows of W'
    K,  # in_features: the row length of W'
    K_BYTES,  # K // 2: bytes per row of W'
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    BACKWARD: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Program (i, j) owns output tile rows [i BLOCK_M, ...) x cols [j BLOCK_O, ...) and walks R in BLOCK_R steps,
    # decoding the (BLOCK_R, BLOCK_O) tile of T from 4-bit codes each step. The wrapper sends only M <= BLOCK_M
    # batches here (one row of programs), so each weight tile is decoded once.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o0 = tl.program_id(1) * BLOCK_O
    ro = o0 + tl.arange(0, BLOCK_O)
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], mask=(rm < M)[:, None] & (rr < R)[None, :], other=0.0)
        if BACKWARD:  # T[r, o] = W'[n=r, k=o]
            w = _decode_tile(data_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, rr, o0, N, K, K_BYTES,
                             BLOCKSIZE, NESTED_BLOCKSIZE, NESTED, BLOCK_R, BLOCK_O)
        else:  # T[r, o] = W'[n=o, k=r]
            w = tl.trans(_decode_tile(data_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, ro, r0,
                                      N, K, K_BYTES, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED, BLOCK_O, BLOCK_R))
        w = w.to(a.dtype)  # W' rounded to the activation dtype, as a 16-bit tensor-core dot sees it
        if FP32_DOT:
            # the CPU interpreter mis-multiplies bf16 tiles made by a cast, so it takes the same values in fp32
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)  # bf16/fp16 operands only: fp32 never reaches this kernel
    out = c_ptr + rm.to(tl.int64)[:, None] * O + ro[None, :]
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (ro < O)[None, :])


FUSED_MAX_M = 64  # larger batches are compute-bound: decode W' once (dequant) and let cuBLAS run the GEMM


def _fused(m: int, dtype: torch.dtype, k: int, blocksize: int) -> bool:
    """Whether the fused kernel runs: 16-bit activations (fp32 wants an IEEE GEMM), a decode-sized batch, and
    rows of W' made of whole quantization blocks. Everything else is dequant + torch.matmul (cuBLAS on CUDA)."""
    return dtype != torch.float32 and m <= FUSED_MAX_M and k % blocksize == 0


def _config(m: int, target: Target | None) -> dict:
    """The fused kernel's tiles for `target` (None: the CPU interpreter).

    One row of programs covers the batch (BLOCK_M >= M), so each weight tile is decoded once. Decode batches
    (M <= 16, the GEMV case) take 16-wide output tiles so that even N = 4096 launches 256 programs and fills
    H100's 132 SMs (64-wide tiles gave 64); batches of 17..64 take 32. Pipeline stages follow the device's shared
    memory (tests/unit/kernels/test_compile_cuda.py checks every config against sm_90 and sm_80).
    """
    block_m, block_o = (16, 16) if m <= 16 else (FUSED_MAX_M, 32)
    if target is None:
        return {"BLOCK_M": block_m, "BLOCK_O": block_o, "BLOCK_R": 128}  # as on CUDA: 2 quantization blocks per tile at B = 64
    return {"BLOCK_M": block_m, "BLOCK_O": block_o, "BLOCK_R": 128, "num_warps": 4,
            "num_stages": 4 if target.shared_bytes >= 200_000 else 3}


def _launch(a: torch.Tensor, packed: Packed4bit, bias: torch.Tensor | None, backward: bool) -> torch.Tensor:
    s = packed.state
    n, k = s.shape
    m, r = a.shape
    o = k if backward else n
    c = torch.empty(m, o, dtype=a.dtype, device=a.device)
    cfg = _config(m, device_target(a) if a.is_cuda else None)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(o, cfg["BLOCK_O"]))
    nest = s.nested
    _nf4_matmul_kernel[grid](
        a, packed.data.reshape(-1), s.absmax, s.code,
        nest.absmax if nest else s.absmax, nest.code if nest else s.code, nest.offset if nest else s.code,
        c, m, o, r, n, k, k // 2,
        BLOCKSIZE=s.blocksize, NESTED_BLOCKSIZE=nest.blocksize if nest else 1, NESTED=nest is not None,
        BACKWARD=backward, FP32_DOT=not a.is_cuda, enable_fp_fusion=False, **cfg,
    )
    # the bias is added outside the kernel: an (M, N) add at M <= 64, and one compiled variant fewer per config
    return c.add_(bias) if bias is not None else c


def _dense(a: torch.Tensor, packed: Packed4bit, bias: torch.Tensor | None, backward: bool) -> torch.Tensor:
    """The large-batch / fp32 route: W' decoded once by `dequant`, then one torch.matmul (cuBLAS, IEEE fp32)."""
    w = dequant(packed, a.dtype, backend="triton")
    c = a @ w if backward else a @ w.t()
    return c + bias if bias is not None else c


class _NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, bias):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.packed, ctx.has_bias = packed, bias is not None
        ctx.fused = _fused(x2.shape[0], x2.dtype, packed.state.shape[1], packed.state.blocksize)
        return (_launch if ctx.fused else _dense)(x2, packed, bias, backward=False).view(*x.shape[:-1], packed.state.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        g = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()
        grad_x = (_launch if ctx.fused else _dense)(g, ctx.packed, None, backward=True) if ctx.needs_input_grad[0] else None
        grad_b = g.float().sum(0).to(g.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if grad_x is not None:
            grad_x = grad_x.view(*grad_y.shape[:-1], ctx.packed.state.shape[1])
        return grad_x, None, grad_b


def nf4_matmul(x: torch.Tensor, packed: Packed4bit, bias: torch.Tensor | None = None, backend: str | None = None,
               save_decoded: bool = False) -> torch.Tensor:
    """y = x @ W'^T (+ bias) with the frozen 4-bit weight decoded inside the kernel; differentiable in x (and bias).

    Args:
        x: (..., K) bf16, fp16 or fp32.
        packed: the (N, K) weight's 4-bit codes and QuantState (NF4 or FP4, optional double quant), on x's device.
        bias: optional (N,) on x's device.
        backend: None/"auto" (CUDA -> Triton, CPU -> kernels/cpu's fused GEMV or decode + fp32 GEMM), "torch"
            (the twin) or "triton" (kernels/_dispatch.py).
        save_decoded: keep the decoded W' for backward instead of decoding again (CPU path; for a layer that
            gradient checkpointing recomputes just before its backward, so recompute and backward share one
            decode). The Triton kernel never materializes W' and ignores it.

    Returns:
        (..., N) in x.dtype.

    Raises:
        ValueError on a wrong dtype, device mix or shape.
    """
    s = packed.state
    if x.dtype not in _DTYPES:
        raise ValueError(f"nf4_matmul: x dtype {x.dtype} is not one of bf16, fp16, fp32")
    if len(s.shape) != 2 or x.shape[-1] != s.shape[1]:
        raise ValueError(f"nf4_matmul: x {tuple(x.shape)} does not fit the 2-d weight {s.shape}")
    check_packed(packed, "nf4_matmul")
    if packed.data.device != x.device:
        raise ValueError("nf4_matmul: x, codes, absmax and codebook must be on one device")
    if bias is not None and (bias.shape != (s.shape[0],) or bias.device != x.device):
        raise ValueError(f"nf4_matmul: bias {tuple(bias.shape)} does not fit {s.shape[0]} outputs on {x.device}")
    if use_cpu_kernels(x, backend) and supports(packed):
        return nf4_matmul_cpu(x, packed, bias, save_decoded)
    if not use_triton(x, backend):
        return nf4_matmul_ref(x, packed, bias)
    return _NF4Matmul.apply(x, packed, bias)
