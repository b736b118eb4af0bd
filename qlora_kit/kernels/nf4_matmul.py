"""Fused NF4 dequant + matmul, forward and backward (QLoRA, Dettmers et al. 2023, eq. 5 without the LoRA term).

    forward:   Y = X W'^T (+ b)        backward:  dX = dY W'
with W' (N, K) decoded inside the kernel tile by tile, never stored: W'_i = Q[code_i] * absmax_k,
k = i // B, i = n K + k_col (FORMAT.md §2.3), and absmax_k = D[q_k] s_{k // 256} + c under double quant.
One kernel serves both directions: it computes C (M, O) = A (M, R) . T (R, O) where T is W'^T
(forward: O = N, R = K) or W' (backward: O = K, R = N).
"""
import torch

from qlora_kit.formats import Packed4bit

from ._checks import check_packed
from ._dispatch import use_cpu_kernels, use_triton
from ._triton import tl, triton
from .cpu import nf4_matmul_cpu, supports
from .ref.nf4_matmul import nf4_matmul_ref

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _nf4_matmul_kernel(
    a_ptr,  # (M, R) contiguous: x (forward) or dY (backward)
    data_ptr,  # uint8 [(N K + 1) // 2]: byte j holds element 2j (high nibble) and 2j + 1 (low nibble)
    absmax_ptr,  # fp32 [blocks], or uint8 codes into nested_code when NESTED
    code_ptr,  # fp32 [16]: the codebook Q
    nested_absmax_ptr,  # fp32 [ceil(blocks / NESTED_BLOCKSIZE)]: s_m (read only when NESTED)
    nested_code_ptr,  # fp32 [256]: the dynamic map D (read only when NESTED)
    offset,  # fp32: c (used only when NESTED)
    bias_ptr,  # (O,) bias, read only when HAS_BIAS
    c_ptr,  # (M, O) contiguous output
    M,
    O,
    R,
    K,  # in_features: the row length of W', for the flat element index
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BACKWARD: tl.constexpr,
    PRECISION: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Program (i, j) owns output tile rows [i BLOCK_M, ...) x cols [j BLOCK_O, ...) and walks R in BLOCK_R steps,
    # decoding the (BLOCK_R, BLOCK_O) tile of T from 4-bit codes each step.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ro = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], mask=(rm < M)[:, None] & (rr < R)[None, :], other=0.0)
        if BACKWARD:
            idx = rr.to(tl.int64)[:, None] * K + ro[None, :]  # T[r, o] = W'[n=r, k=o]
        else:
            idx = ro.to(tl.int64)[None, :] * K + rr[:, None]  # T[r, o] = W'[n=o, k=r]
        wmask = (rr < R)[:, None] & (ro < O)[None, :]
        byte = tl.load(data_ptr + idx // 2, mask=wmask, other=0).to(tl.int32)
        nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 0xF)
        block = idx // BLOCKSIZE
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=wmask, other=0).to(tl.int32)
            scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=wmask, other=0.0)
            absmax = tl.load(nested_code_ptr + q) * scale + offset
        else:
            absmax = tl.load(absmax_ptr + block, mask=wmask, other=0.0)
        w = tl.where(wmask, tl.load(code_ptr + nibble) * absmax, 0.0)
        w = w.to(a.dtype)  # W' rounded to the activation dtype, as a 16-bit tensor-core dot sees it
        if FP32_DOT:
            # the CPU interpreter mis-multiplies bf16 tiles made by a cast, so it takes the same values in fp32
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ro, mask=ro < O, other=0.0).to(tl.float32)[None, :]
    out = c_ptr + rm.to(tl.int64)[:, None] * O + ro[None, :]
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (ro < O)[None, :])


def _cuda_configs(m: int) -> dict:
    """Tiles for CUDA: narrow M for decode-sized batches, square tiles for training batches."""
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_O": 64, "BLOCK_R": 128, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_O": 128, "BLOCK_R": 64, "num_warps": 8, "num_stages": 3}


def _interpreter_configs(m: int) -> dict:
    """Tiles for TRITON_INTERPRET on CPU: few, large programs (the interpreter pays per program)."""
    return {"BLOCK_M": max(16, min(64, triton.next_power_of_2(m))), "BLOCK_O": 64, "BLOCK_R": 64}


def _launch(a: torch.Tensor, packed: Packed4bit, bias: torch.Tensor | None, backward: bool) -> torch.Tensor:
    s = packed.state
    n, k = s.shape
    m, r = a.shape
    o = k if backward else n
    c = torch.empty(m, o, dtype=a.dtype, device=a.device)
    cfg = _cuda_configs(m) if a.is_cuda else _interpreter_configs(m)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(o, cfg["BLOCK_O"]))
    nest = s.nested
    _nf4_matmul_kernel[grid](
        a, packed.data.reshape(-1), s.absmax, s.code,
        nest.absmax if nest else s.absmax, nest.code if nest else s.code, float(nest.offset) if nest else 0.0,
        bias if bias is not None else a, c, m, o, r, k,
        BLOCKSIZE=s.blocksize, NESTED_BLOCKSIZE=nest.blocksize if nest else 1, NESTED=nest is not None,
        HAS_BIAS=bias is not None, BACKWARD=backward,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32", FP32_DOT=not a.is_cuda, **cfg,
    )
    return c


class _NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, bias):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.packed, ctx.has_bias = packed, bias is not None
        return _launch(x2, packed, bias, backward=False).view(*x.shape[:-1], packed.state.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        g = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()
        grad_x = _launch(g, ctx.packed, None, backward=True) if ctx.needs_input_grad[0] else None
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
