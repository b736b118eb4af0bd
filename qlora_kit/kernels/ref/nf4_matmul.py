"""Torch twin of kernels/nf4_matmul.py.

FLOPs for x (M, K) and W (N, K): 2*M*N*K forward, 2*M*N*K for grad_x. Traffic: N*K/2 bytes of codes
(+ absmax) instead of N*K*sizeof(dtype), plus x and y. bench counts TFLOP/s as 2 * M * N * K / t.
"""
import torch

from qlora_kit.formats import Packed4bit

from .dequant import dequant_ref


class _NF4MatmulRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, bias):
        # W' is rounded to x's dtype first, as the GPU kernel feeds it to a bf16/fp16 tensor-core dot
        w = dequant_ref(packed, x.dtype).float()
        y = x.reshape(-1, x.shape[-1]).float() @ w.t()
        if bias is not None:
            y += bias.float()
        ctx.packed, ctx.has_bias = packed, bias is not None
        return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        # W' is decoded again rather than saved: the point of a 4-bit base is not to hold it in 16 bits
        w = dequant_ref(ctx.packed, grad_y.dtype).float()
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = (g.float() @ w).to(grad_y.dtype).reshape(*grad_y.shape[:-1], w.shape[1])
        grad_b = g.float().sum(0).to(grad_y.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b


def nf4_matmul_ref(x: torch.Tensor, packed: Packed4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W'^T (+ bias), W' = Q[code] * absmax decoded from `packed` (FORMAT.md §2.3), fp32 accumulation."""
    return _NF4MatmulRef.apply(x, packed, bias)
