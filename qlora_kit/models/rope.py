"""Rotary position embeddings (Su et al. 2021, RoFormer) with linear and llama3 frequency scaling.

Base frequencies for channel pair i of a head of size d:   f_i = theta^(-2i / d),  i = 0 .. d/2 - 1.

  linear  (Chen et al. 2023, position interpolation):  f_i / factor.
  llama3  (Meta, Llama 3.1 release): with wavelength w_i = 2 pi / f_i, L = original context,
          w_i < L / high_freq_factor             -> f_i            (high frequencies kept)
          w_i > L / low_freq_factor              -> f_i / factor   (low frequencies interpolated)
          otherwise, with a = (L / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor):
                                                 -> (1 - a) f_i / factor + a f_i

A token at position p rotates pair (x_j, x_{j + d/2}) by angle p f_j (the "rotate half" pairing
Hugging Face checkpoints are trained with):  x' = x cos(p f) + rotate_half(x) sin(p f).
cos/sin are computed in fp32 and cast to the activation dtype before the rotation.
"""
import math

import torch

from qlora_kit import kernels

from .config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int, device=None) -> torch.Tensor:
    """The (head_dim / 2,) fp32 frequencies f_i after scaling (see the module docstring)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    freqs = 1.0 / (rope.theta ** exponent)
    if rope.rope_type == "linear":
        return freqs / rope.factor
    if rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        wavelen = 2 * math.pi / freqs
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, freqs / rope.factor, freqs)
        a = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - a) * scaled / rope.factor + a * scaled
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(mid, smoothed, scaled)
    return freqs


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of p f for positions (B, T): each (B, T, head_dim), in `dtype`."""
    angles = positions.float().unsqueeze(-1) * inv_freq.float()
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by cos/sin (B, T, head_dim): kernels.rope (each product and the sum
    rounded to x's dtype, as Hugging Face)."""
    return kernels.rope(x, cos, sin)
