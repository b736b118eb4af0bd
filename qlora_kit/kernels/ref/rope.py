"""Torch twin of kernels/rope.py.

Traffic for x of B*H*S rows by D: reads x (B*H*S*D*s) and cos/sin (2*S*D*s, cached across heads),
writes the same size as x; bench counts GB/s as 2 * x.numel() * sizeof(dtype) / t.
"""
import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x' = x * cos + rotate_half(x) * sin (Su et al. 2021, HF Llama convention), in x.dtype.

    x is (batch, num_heads, seq, head_dim); cos/sin are (seq, head_dim) or (batch, seq, head_dim), cast to x.dtype.
    Each product and the sum are rounded to x.dtype (torch computes each elementwise op in fp32 and rounds), the
    order of Hugging Face's apply_rotary_pos_emb and of models/rope.py, which calls this through kernels.rope.
    """
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)
