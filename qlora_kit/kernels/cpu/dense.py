"""Y = X W^T for a 16-bit weight W (bf16/fp16, e.g. the LM head or tied embedding) on a CPU without 16-bit
matrix instructions: nf4.c qk_gemm16 widens W a few rows at a time to fp32 (exact) and multiplies with fp32
accumulation, the products of a 16-bit GEMM; torch would emulate that GEMM (several times slower) or need a
whole fp32 copy of W. Twin: F.linear(x.float(), w.float()); results differ only in the order of each sum.
"""
import torch
import torch.nn.functional as F

from ._build import library
from .nf4 import _KIND, _TILE_ROWS, FUSED_MAX_ROWS, _p, _run, _split

SLICE = 8192  # rows of W widened to fp32 at a time for the BLAS path


def linear16_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The twin: (..., K) @ (N, K)^T in fp32."""
    return F.linear(x.float(), w.float())


def linear16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(..., K) x (N, K) bf16/fp16 W -> (..., N) fp32, without autograd. Up to FUSED_MAX_ROWS rows the fused kernel
    (batch invariant, as nf4.c qk_gemm); above, slices of W widened to fp32 and the BLAS GEMM (faster for the
    training loss's 1000-row chunks). Runs the twin where the compiled kernels are unavailable, W is not a
    contiguous 16-bit CPU matrix, or K % 8 != 0."""
    if x.shape[-1] != w.shape[1] or w.dim() != 2:
        raise ValueError(f"linear16: x {tuple(x.shape)} and W {tuple(w.shape)} do not fit")
    lib = library()
    if (lib is None or w.dtype not in (torch.bfloat16, torch.float16) or not w.is_contiguous() or w.device.type != "cpu"
            or w.shape[1] % 8 or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return linear16_ref(x, w)
    n, k = w.shape
    x2 = x.reshape(-1, k).float().contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m > FUSED_MAX_ROWS:
        for v0 in range(0, n, SLICE):
            torch.mm(x2, w[v0:v0 + SLICE].float().t(), out=y[:, v0:v0 + SLICE])
        return y.view(*x.shape[:-1], n)

    def call(b, e):
        scratch = torch.empty(_TILE_ROWS * k, dtype=torch.float32)
        lib.qk_gemm16(_p(x2), m, _p(w), k, _p(y), n, _KIND[w.dtype], b, e, _p(scratch))

    _run(_split(n, _TILE_ROWS, m * n * k // 8), call)
    return y.view(*x.shape[:-1], n)
