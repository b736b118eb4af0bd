"""Torch twin of kernels/rmsnorm.py.

Traffic for x of M rows by N: forward reads M*N*s + N*s_w and writes M*N*s (+ 4M bytes of rstd);
backward reads x, w, dy and writes dx, dw (about 3*M*N*s + M*N*s). bench counts GB/s as
2 * M * N * sizeof(dtype) / t forward and 4 * M * N * sizeof(dtype) / t backward.
"""
import torch


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = w * round(x / sqrt(mean(x^2) + eps)) (Zhang & Sennrich 2019); autograd gives grads.

    The statistics and the normalization are fp32; the normalized x is rounded to x.dtype, then multiplied by
    w (cast to x.dtype) in x.dtype: two roundings, in the order of Hugging Face's LlamaRMSNorm and models/llama.py,
    which calls this through kernels.rmsnorm (bit for bit the same logits as before the switch).
    """
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight.to(x.dtype) * (x32 * rstd).to(x.dtype)
