"""Triton SwiGLU (Shazeer 2020), forward and backward.

    y = silu(g) * u = g * sigmoid(g) * u
    du = dy * silu(g),    dg = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
"""
import torch

from ._dispatch import use_triton
from ._triton import tl, triton
from .ref.swiglu import swiglu_ref

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _swiglu_fwd_kernel(
    g_ptr,  # (n,) gate, contiguous
    u_ptr,  # (n,) up, contiguous
    y_ptr,  # (n,) output
    n,
    BLOCK: tl.constexpr,
):
    # Program p handles elements [p * BLOCK, (p + 1) * BLOCK).
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < n
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    g_ptr,  # (n,) gate from the forward
    u_ptr,  # (n,) up from the forward
    dy_ptr,  # (n,) incoming gradient
    dg_ptr,  # (n,) gradient for gate
    du_ptr,  # (n,) gradient for up
    n,
    BLOCK: tl.constexpr,
):
    # Program p handles elements [p * BLOCK, (p + 1) * BLOCK); silu is recomputed, not stored.
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < n
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(du_ptr + off, (dy * g * sig).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + off, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)


def _config() -> dict:
    """1024 elements per program at 4 warps: 8 per thread, i.e. 128-bit loads/stores for 16-bit dtypes."""
    return {"BLOCK": 1024, "num_warps": 4}


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty_like(g)
        cfg = _config()
        _swiglu_fwd_kernel[(triton.cdiv(g.numel(), cfg["BLOCK"]),)](g, u, y, g.numel(), **cfg)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        cfg = _config()
        _swiglu_bwd_kernel[(triton.cdiv(g.numel(), cfg["BLOCK"]),)](g, u, dy.contiguous(), dg, du, g.numel(), **cfg)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, differentiable in both.

    Args:
        gate, up: (..., N) of one shape, dtype (bf16, fp16 or fp32) and device.
        backend: None/"auto", "torch" or "triton" (kernels/_dispatch.py).

    Returns:
        (..., N) in gate.dtype.

    Raises:
        ValueError on mismatched shapes, dtypes or devices (checked before dispatch).
    """
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    if gate.dtype not in _DTYPES:
        raise ValueError(f"swiglu: dtype {gate.dtype} is not one of bf16, fp16, fp32")
    if not use_triton(gate, backend):
        return swiglu_ref(gate, up)
    return _SwiGLU.apply(gate, up)
