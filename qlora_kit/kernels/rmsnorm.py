"""Triton RMSNorm, forward and backward.

Forward (Zhang & Sennrich 2019):  r = 1 / sqrt(mean_j x_j^2 + eps),  y = x * r * w  (fp32, one cast).
Backward, with x^ = x * r and u = w * dy:
    dx = r * (u - x^ * mean_j(x^_j * u_j)),     dw = sum_rows dy * x^.
"""
import torch

from ._dispatch import use_triton
from ._triton import tl, triton
from .ref.rmsnorm import rmsnorm_ref

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_N = 65536


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr,  # (M, N) contiguous input
    w_ptr,  # (N,) weight
    y_ptr,  # (M, N) output, x's dtype
    rstd_ptr,  # (M,) fp32: r per row, saved for backward
    N,
    eps,
    BLOCK_N: tl.constexpr,
):
    # Program p normalizes row p; BLOCK_N >= N covers the whole row.
    row = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK_N)
    mask = col < N
    x = tl.load(x_ptr + row * N + col, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * N + col, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd_kernel(
    x_ptr,  # (M, N) forward input
    w_ptr,  # (N,) weight
    dy_ptr,  # (M, N) incoming gradient, contiguous
    rstd_ptr,  # (M,) fp32 from the forward
    dx_ptr,  # (M, N) output gradient for x
    dw_part_ptr,  # (G, N) fp32: program g's partial sum of dy * x^ over its rows
    M,
    N,
    BLOCK_N: tl.constexpr,
):
    # Program g handles rows g, g + G, g + 2G, ... and keeps its dw partial in registers.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    col = tl.arange(0, BLOCK_N)
    mask = col < N
    w = tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row in range(pid, M, num_programs):
        base = (tl.zeros((), dtype=tl.int64) + row) * N  # int64 offsets whether row is a Python int (interpreter) or a tensor
        x = tl.load(x_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        u = w * dy
        dx = rstd * (u - xhat * (tl.sum(xhat * u, axis=0) / N))
        tl.store(dx_ptr + base + col, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(dw_part_ptr + pid * N + col, dw, mask=mask)


def _launch_config(n: int) -> dict:
    """Warps grow with the row length so each thread holds a few elements."""
    block = triton.next_power_of_2(n)
    return {"BLOCK_N": block, "num_warps": min(max(block // 256, 1), 16)}


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        _rmsnorm_fwd_kernel[(x2.shape[0],)](x2, weight, y, rstd, n, eps, **_launch_config(n))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.reshape(m, n).contiguous()
        dx = torch.empty_like(x2)
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 4
        groups = max(min(m, 2 * sms), 1)
        dw_part = torch.empty(groups, n, dtype=torch.float32, device=x2.device)
        _rmsnorm_bwd_kernel[(groups,)](x2, weight, dy2, rstd, dx, dw_part, m, n, **_launch_config(n))
        return dx.view(dy.shape), dw_part.sum(0).to(weight.dtype), None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension, differentiable in x and weight.

    Args:
        x: (..., N) bf16, fp16 or fp32.
        weight: (N,) any float dtype on x's device.
        eps: added to the mean square.
        backend: None/"auto", "torch" or "triton" (kernels/_dispatch.py).

    Returns:
        (..., N) tensor in x.dtype.

    Raises:
        ValueError on a wrong dtype, device or shape (checked before dispatch, so every backend raises alike), or
        N > 65536 on the Triton path.
    """
    if x.dtype not in _DTYPES:
        raise ValueError(f"rmsnorm: x dtype {x.dtype} is not one of bf16, fp16, fp32")
    if weight.shape != (x.shape[-1],) or weight.device != x.device:
        raise ValueError(f"rmsnorm: weight {tuple(weight.shape)} on {weight.device} does not match x {tuple(x.shape)} on {x.device}")
    if not use_triton(x, backend):
        return rmsnorm_ref(x, weight, eps)
    if x.shape[-1] > _MAX_N:
        raise ValueError(f"rmsnorm: row length {x.shape[-1]} exceeds {_MAX_N}; one program holds a whole row")
    return _RMSNorm.apply(x, weight.contiguous(), eps)
