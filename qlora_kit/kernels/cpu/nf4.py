"""The fast exact CPU path of the 4-bit kernels: kernels/cpu/nf4.c through ctypes.

    dequant:     W'_i = Q[code_i] * absmax_{i // B}              (FORMAT.md §2.3), bit-exact with the twin
    nf4_matmul:  Y = X W'^T (+ b),  dX = dY W'                    W' rounded to X's dtype, fp32 accumulation

The matmul multiplies W' rounded to the activation dtype (the twin's arithmetic) with fp32 accumulation: in
the CPU's own bf16/fp16 GEMM where it has one (AMX, AVX-512 BF16), else in fp32 over the same values, which on
CPUs without 16-bit matrix units is many times faster than torch's emulated 16-bit GEMM. Inference and
small batches run the fused kernel (nf4.c qk_gemm), which decodes a few rows of W' at a time into a scratch
tile and never stores W'; training-sized batches decode W' once (fp32, rounded) and call the BLAS GEMM. Large calls are split over torch's intra-op thread count;
the C calls release the GIL.
"""
import ctypes
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
import torch.nn.functional as F

from qlora_kit.formats import Packed4bit

from ._build import library
from .capability import native_16bit_matmul

# activation dtype -> the C kernels' output kind (nf4.c: OUT_*)
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_VIA = {torch.float32: 0, torch.bfloat16: 3, torch.float16: 4}  # fp32 output holding values of that dtype
# Rows of X up to which a forward that autograd records runs the fused kernel; above, decode W' once and call the
# BLAS GEMM (faster for training-sized batches). Without autograd (inference) the fused kernel runs at every
# size, so a row's output never depends on the batch it shares (nf4.c qk_gemm: batch invariance), except on
# CPUs with native 16-bit GEMMs (AMX), whose GEMM wins above this size.
FUSED_MAX_ROWS = 64
_TILE_ROWS = 8  # nf4.c QK_NB: rows of W' decoded at a time
_GRAIN = 1 << 18  # elements of work per thread below which one thread is faster


def available() -> bool:
    """True when the compiled CPU kernels are loaded (else one line on stderr has said why not)."""
    return library() is not None


def supports(packed: Packed4bit) -> bool:
    """The layouts the C kernels read: contiguous uint8 codes, fp32 (or nested uint8) absmax, 16-entry codebook."""
    s = packed.state
    nest = s.nested
    return (packed.data.is_contiguous() and s.absmax.is_contiguous() and s.code.numel() == 16
            and s.code.dtype == torch.float32 and s.code.is_contiguous()
            and (s.absmax.dtype == torch.uint8 if nest else s.absmax.dtype == torch.float32)
            and (nest is None or (nest.absmax.dtype == torch.float32 and nest.code.numel() == 256
                                  and nest.code.dtype == torch.float32 and nest.absmax.is_contiguous())))


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="qlora-kit-cpu")


def _split(total: int, step: int, work: int) -> list[tuple[int, int]]:
    """[begin, end) ranges over `total` items, cut on multiples of `step`, one per usable thread."""
    threads = max(1, min(torch.get_num_threads(), work // _GRAIN))
    per = -(-total // threads)
    per = -(-per // step) * step
    return [(b, min(b + per, total)) for b in range(0, total, per)]


def _run(ranges, call) -> None:
    if len(ranges) == 1:
        call(*ranges[0])
        return
    futures = [_pool(len(ranges) - 1).submit(call, b, e) for b, e in ranges[1:]]
    call(*ranges[0])
    for f in futures:
        f.result()


def _p(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _state_args(packed: Packed4bit) -> list:
    s, nest = packed.state, packed.state.nested
    return [_p(packed.data), _p(s.absmax), _p(s.code), _p(nest.absmax if nest else None),
            _p(nest.code if nest else None), _p(nest.offset.float().reshape(1) if nest else None),
            nest.blocksize if nest else 1, s.blocksize]


def dequant_cpu(packed: Packed4bit, dtype: torch.dtype, fp32_via: bool = False) -> torch.Tensor:
    """W' in `dtype` (bit-exact with dequant_ref); with fp32_via, an fp32 tensor holding W' rounded to `dtype`."""
    s = packed.state
    out = torch.empty(s.shape, dtype=torch.float32 if fp32_via else dtype)
    kind = (_VIA if fp32_via else _KIND)[dtype]
    args = _state_args(packed)  # keeps the offset tensor alive during the calls
    lib = library()
    _run(_split(s.numel, max(16, s.blocksize), s.numel),
         lambda b, e: lib.qk_dequant(*args[:6], args[6], args[7], s.numel, _p(out), kind, b, e))
    return out


def _gemm(x2: torch.Tensor, packed: Packed4bit, w_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) fp32 @ W'^T -> (M, N) fp32, W' decoded row by row (rounded to w_dtype), never stored."""
    n, k = packed.state.shape
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    args = _state_args(packed)
    lib = library()

    def call(b, e):
        scratch = torch.empty(_TILE_ROWS * k, dtype=torch.float32)
        lib.qk_gemm(_p(x2), m, *args[:6], args[6], args[7], k, _p(y), n, _KIND[w_dtype], b, e, _p(scratch))

    _run(_split(n, 1, n * k), call)
    return y


def _fused_ok(packed: Packed4bit, m: int, recorded: bool, dtype: torch.dtype) -> bool:
    fits = packed.state.shape[1] % 16 == 0 and packed.state.blocksize % 16 == 0
    # a CPU with native 16-bit GEMMs (AMX) runs large batches faster there, even without autograd
    return fits and (m <= FUSED_MAX_ROWS or not (recorded or native_16bit_matmul(dtype)))


class NF4MatmulCPU(torch.autograd.Function):
    """Y = X W'^T (+ b) and dX = dY W' on CPU. With `save_decoded` the decoded W' (fp32) is saved for backward,
    so a checkpointed layer's recompute and backward share one decode; otherwise backward decodes again."""

    @staticmethod
    def forward(ctx, x, packed: Packed4bit, bias, save_decoded: bool, fused: bool):
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
        w = None
        if fused:
            y = _gemm(x2, packed, x.dtype)
            if bias is not None:
                y += bias.float()
        elif native_16bit_matmul(x.dtype):  # the CPU's own bf16/fp16 GEMM (AMX, AVX-512 BF16)
            w = dequant_cpu(packed, x.dtype)
            y = F.linear(x.reshape(-1, x.shape[-1]), w, None if bias is None else bias.to(x.dtype))
        else:  # no native 16-bit GEMM: fp32 over the same values is many times faster
            w = dequant_cpu(packed, x.dtype, fp32_via=True)
            y = F.linear(x2, w, None if bias is None else bias.float())
        ctx.packed, ctx.has_bias, ctx.dtype = packed, bias is not None, x.dtype
        ctx.save_for_backward(w if save_decoded else None)
        return y.to(x.dtype).view(*x.shape[:-1], packed.state.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        (w,) = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            if w is None:
                native = native_16bit_matmul(grad_y.dtype)
                w = dequant_cpu(ctx.packed, grad_y.dtype, fp32_via=not native)
            grad_x = (g.to(w.dtype) @ w).to(grad_y.dtype).view(*grad_y.shape[:-1], w.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.float().sum(0).to(grad_y.dtype)
        return grad_x, None, grad_b, None, None


def nf4_matmul_cpu(x: torch.Tensor, packed: Packed4bit, bias: torch.Tensor | None, save_decoded: bool) -> torch.Tensor:
    # decided out here: inside Function.forward grad mode is always off
    fused = not save_decoded and _fused_ok(packed, x.numel() // x.shape[-1], torch.is_grad_enabled(), x.dtype)
    return NF4MatmulCPU.apply(x, packed, bias, save_decoded, fused)
