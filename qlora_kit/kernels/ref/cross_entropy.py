"""Torch twin of kernels/cross_entropy.py.

FLOPs for T tokens, hidden H, vocab V: 2*T*V*H for the logits, 2*T*V*H for grad_hidden and
2*T*V*H more for grad_weight (computed during the forward pass). bench counts TFLOP/s as
(4 or 6) * T * V * H / t. Peak extra memory is chunk_size * V fp32 logits, never T * V.
"""
import torch

from .._checks import check_cross_entropy


def _needs_grad(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[bool, bool]:
    # decided outside autograd.Function.forward, where grad mode is always off
    on = torch.is_grad_enabled()
    return on and hidden.requires_grad, on and weight.requires_grad


class _ChunkedCrossEntropyRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, reduction, need_h, need_w):
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        valid = y != ignore_index
        denom = valid.sum().clamp(min=1).float() if reduction == "mean" else torch.ones((), device=h.device)
        w32 = weight.float()  # no-op for fp32 heads; the twin is the readable oracle, not the memory-lean path
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc = h[start:start + chunk_size].float()
            yc, vc = y[start:start + chunk_size], valid[start:start + chunk_size]
            logits = hc @ w32.t()
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, yc.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(vc, lse - target, 0.0).sum()
            if need_h or need_w:
                # d loss / d logits = (softmax - onehot) / denom on valid rows, 0 on ignored ones
                d = torch.exp(logits - lse.unsqueeze(1))
                d[torch.arange(d.shape[0], device=d.device), yc.clamp(min=0)] -= 1.0
                d *= (vc.float() / denom).unsqueeze(1)
                if need_h:
                    grad_h[start:start + chunk_size] = (d @ w32).to(h.dtype)
                if need_w:
                    grad_w += d.t() @ hc
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = (grad_h * grad_out).reshape(ctx.hidden_shape) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None, None


def chunked_cross_entropy_ref(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                              ignore_index: int = -100, chunk_size: int = 1024,
                              reduction: str = "mean") -> torch.Tensor:
    """loss = reduce_t [logsumexp_v(h_t . W_v) - h_t . W_{y_t}] over tokens with y_t != ignore_index.

    Logits are made chunk_size tokens at a time in fp32; gradients for hidden and the head weight
    are computed in the same pass and scaled by the incoming gradient in backward. "mean" divides
    by the number of non-ignored tokens (0 tokens -> loss 0); "sum" does not divide.
    """
    check_cross_entropy(hidden, lm_head_weight, labels, ignore_index, chunk_size, reduction)
    return _ChunkedCrossEntropyRef.apply(
        hidden, lm_head_weight, labels, ignore_index, chunk_size, reduction, *_needs_grad(hidden, lm_head_weight)
    )
