"""Torch twin of kernels/adamw8bit.py.

Traffic per parameter element: reads p and g (2*s), two uint8 states (2 B) and 8/256 B of absmax,
writes p (s), two states (2 B) and absmax. bench counts GB/s as n * (4 * sizeof(dtype) + 4) / t.
"""
import math

import torch


def _dequant_states(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, blocksize: int) -> torch.Tensor:
    return qmap[codes.long()] * absmax.repeat_interleave(blocksize)[: codes.numel()]


def _requant_states(x: torch.Tensor, qmap: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of x / absmax_k per block of `blocksize` (ties to the lower code); qmap is sorted."""
    n = x.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = torch.where(absmax[:, None] > 0, padded / absmax[:, None], 0.0).reshape(-1)[:n]
    bounds = (qmap[:-1] + qmap[1:]) / 2
    return torch.bucketize(scaled, bounds).to(torch.uint8), absmax


def adamw8bit_ref(param: torch.Tensor, grad: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor,
                  absmax1: torch.Tensor, absmax2: torch.Tensor, qmap1: torch.Tensor, qmap2: torch.Tensor, step: int,
                  lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, blocksize: int = 256) -> None:
    """One AdamW step (Loshchilov & Hutter 2019) on blockwise 8-bit states (Dettmers et al. 2022), in place.

        m = D1[q1] * a1;  v = D2[q2] * a2                   (dequantize, blocks of `blocksize`)
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        a = max_block |m|;  q = nearest code of m / a       (and the same for v)
    """
    g = grad.reshape(-1).float()
    m = _dequant_states(state1.reshape(-1), absmax1, qmap1, blocksize)
    v = _dequant_states(state2.reshape(-1), absmax2, qmap2, blocksize)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * (g * g)
    denom = torch.sqrt(v) * (1.0 / math.sqrt(1 - beta2**step)) + eps
    p = param.reshape(-1).float() * (1.0 - lr * weight_decay)
    p = p - (lr / (1 - beta1**step)) * (m / denom)
    param.copy_(p.view_as(param))
    q1, a1 = _requant_states(m, qmap1, blocksize)
    q2, a2 = _requant_states(v, qmap2, blocksize)
    state1.copy_(q1.view_as(state1))
    state2.copy_(q2.view_as(state2))
    absmax1.copy_(a1)
    absmax2.copy_(a2)
