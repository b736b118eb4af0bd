"""The CPU path of kernels.chunked_cross_entropy: the twin's math (kernels/ref/cross_entropy.py), lean in memory.

Per chunk of c tokens, one (c, V) fp32 buffer holds the logits z = h W^T and then, in place, the softmax and
d loss / d z:
    lse_t = m_t + log sum_v exp(z_tv - m_t),   m_t = max_v z_tv
    d_tv  = (softmax(z_t)_v - [v = y_t]) * valid_t / denom
    grad_h = d W,   grad_W = d^T h
A 16-bit head is never copied whole to fp32: the logits come from kernels/cpu/dense.py linear16 (W read as it is)
and grad_h runs over vocab slices of W widened to fp32, SLICE rows at a time. Peak extra memory: c * V * 4 bytes
plus one slice, where the twin holds a whole fp32 W and three (c, V) temporaries. Sums differ from the twin's only
in order (the vocab-sliced grad_h, the kernel's dot products).
"""
import torch

from ..ref.cross_entropy import _ChunkedCrossEntropyRef
from .dense import SLICE, linear16


def _logits(hc: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return hc @ weight.t() if weight.dtype == torch.float32 else linear16(hc, weight)


def _d_times_w(d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype == torch.float32:
        return d @ weight
    out = torch.zeros(d.shape[0], weight.shape[1], dtype=torch.float32)
    for v0 in range(0, weight.shape[0], SLICE):
        out.addmm_(d[:, v0:v0 + SLICE], weight[v0:v0 + SLICE].float())
    return out


class ChunkedCrossEntropyCPU(_ChunkedCrossEntropyRef):
    """Loss in forward, both gradients made in the same pass; backward (the twin's) scales them by the incoming
    gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, reduction, need_h, need_w):
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        valid = y != ignore_index
        denom = valid.sum().clamp(min=1).float() if reduction == "mean" else torch.ones(())
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], chunk_size):
            hc = h[start:start + chunk_size].float()
            yc, vc = y[start:start + chunk_size].clamp(min=0), valid[start:start + chunk_size]
            z = _logits(hc, weight)
            target = z.gather(1, yc.unsqueeze(1)).squeeze(1)
            m = z.amax(dim=1, keepdim=True)
            p = z.sub_(m).exp_()  # exp(z - m), in place of the logits
            s = p.sum(dim=1, keepdim=True)
            lse = (m + s.log()).squeeze(1)
            total += torch.where(vc, lse - target, 0.0).sum()
            if need_h or need_w:
                d = p.div_(s)  # softmax, in place
                d[torch.arange(d.shape[0]), yc] -= 1.0
                d.mul_((vc.float() / denom).unsqueeze(1))
                if need_h:
                    grad_h[start:start + chunk_size] = _d_times_w(d, weight).to(h.dtype)
                if need_w:
                    grad_w.addmm_(d.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return total / denom
