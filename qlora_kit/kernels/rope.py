"""Triton rotary position embedding (Su et al. 2021), HF Llama "rotate_half" convention.

With x = [x1, x2] split at D/2, rotate_half(x) = [-x2, x1] and c, s = cos, sin of the position:
    forward:   y1 = x1 c1 - x2 s1,          y2 = x2 c2 + x1 s2
    backward:  dx1 = dy1 c1 + dy2 s2,       dx2 = dy2 c2 - dy1 s1     (the transpose of the rotation)
"""
import torch

from ._dispatch import use_triton
from ._triton import tl, triton
from .ref.rope import rope_ref

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _rope_kernel(
    x_ptr,  # (B, H, S, D) contiguous input (dy when BACKWARD)
    cos_ptr,  # (B or 1, S, D) contiguous
    sin_ptr,  # (B or 1, S, D) contiguous
    y_ptr,  # (B, H, S, D) output (dx when BACKWARD)
    rows,  # B * H * S
    H,
    S,
    cos_batch_stride,  # S * D, or 0 when cos/sin are shared across the batch
    HALF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # Program p rotates rows [p * BLOCK_R, (p + 1) * BLOCK_R) of the (B*H*S, D) view; row r is
    # (b, h, s) = (r // (H S), r // S % H, r % S).
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.arange(0, BLOCK_H)
    mask = (row < rows)[:, None] & (col < HALF)[None, :]
    b = row // (H * S)
    s = row % S
    x_off = row.to(tl.int64)[:, None] * (2 * HALF) + col[None, :]
    cs_off = (b.to(tl.int64) * cos_batch_stride + s * (2 * HALF))[:, None] + col[None, :]
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + cs_off, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs_off + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs_off, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs_off + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y_ptr + x_off, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + x_off + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


def _config(d: int) -> dict:
    """Rows per program so a program holds ~2048 half-row elements (6 such tiles live at once: more spills on sm_80);
    one half-row spans HALF contiguous elements."""
    block_h = triton.next_power_of_2(d // 2)
    return {"BLOCK_R": max(1, min(64, 2048 // block_h)), "BLOCK_H": block_h, "num_warps": 4}


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    b, h, s, d = x.shape
    y = torch.empty_like(x)
    rows = b * h * s
    cfg = _config(d)
    batch_stride = s * d if cos.shape[0] > 1 else 0
    grid = (triton.cdiv(rows, cfg["BLOCK_R"]),)
    _rope_kernel[grid](x, cos, sin, y, rows, h, s, batch_stride, HALF=d // 2, BACKWARD=backward, **cfg)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x.contiguous(), cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy.contiguous(), cos, sin, backward=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Apply rotary embedding to queries or keys: x * cos + rotate_half(x) * sin, differentiable in x.

    Args:
        x: (batch, num_heads, seq, head_dim) bf16, fp16 or fp32; head_dim even.
        cos, sin: (seq, head_dim) or (batch, seq, head_dim), as HF's rotary embedding returns them.
        backend: None/"auto", "torch" or "triton" (kernels/_dispatch.py).

    Returns:
        (batch, num_heads, seq, head_dim) in x.dtype.

    Raises:
        ValueError on mismatched shapes, an odd head_dim, a wrong dtype or device (checked before dispatch).
    """
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope: x {tuple(x.shape)} must be (batch, num_heads, seq, head_dim) with an even head_dim")
    if x.dtype not in _DTYPES:
        raise ValueError(f"rope: x dtype {x.dtype} is not one of bf16, fp16, fp32")
    b, _, s, d = x.shape
    if cos.shape != sin.shape or cos.shape[-2:] != (s, d) or cos.dim() not in (2, 3) or (cos.dim() == 3 and cos.shape[0] not in (1, b)):
        raise ValueError(f"rope: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} do not fit x {tuple(x.shape)}")
    if cos.device != x.device or sin.device != x.device:
        raise ValueError("rope: x, cos and sin must be on one device")
    if not use_triton(x, backend):
        return rope_ref(x, cos, sin)
    cos3 = cos.reshape(-1, s, d).contiguous()
    sin3 = sin.reshape(-1, s, d).contiguous()
    return _Rope.apply(x, cos3, sin3)
