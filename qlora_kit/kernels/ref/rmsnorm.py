"""Torch twin of kernels/rmsnorm.py.

Traffic for x of M rows by N: forward reads M*N*s + N*s_w and writes M*N*s (+ 4M bytes of rstd);
backward reads x, w, dy and writes dx, dw (about 3*M*N*s + M*N*s). bench counts GB/s as
2 * M * N * sizeof(dtype) / t forward and 4 * M * N * sizeof(dtype) / t backward.
"""
import torch


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * w (Zhang & Sennrich 2019), in fp32, cast to x.dtype; autograd gives grads."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (x32 * rstd * weight.float()).to(x.dtype)
