"""The 8-bit dynamic quantization maps of the optimizer states (Dettmers et al. 2022, sec. 2.2 / appendix).

Signed map (for the first moment m): formats.spec.dynamic_map(), shared with double quantization.
Unsigned map (for the second moment v >= 0): the sign bit becomes one more fraction bit, so exponent e = 0..6
carries 2^(e+1) linear fractions: level = 10^(e-6) * mid, mid over the midpoints of linspace(0.1, 1, 2^(e+1) + 1);
254 levels plus 0 and 1 make 256.
"""
import functools

import torch

from qlora_kit.formats import spec


@functools.lru_cache(maxsize=None)
def _signed() -> torch.Tensor:
    return spec.dynamic_map()


@functools.lru_cache(maxsize=None)
def _unsigned(max_exponent_bits: int = 7) -> torch.Tensor:
    values: list[float] = []
    for e in range(max_exponent_bits):
        edges = torch.linspace(0.1, 1, 2 ** (e + 1) + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (-(max_exponent_bits - 1) + e)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def signed_dynamic_map(device=None) -> torch.Tensor:
    """(256,) sorted fp32 signed dynamic map in [-1, 1] for m."""
    return _signed().to(device)


def unsigned_dynamic_map(device=None) -> torch.Tensor:
    """(256,) sorted fp32 unsigned dynamic map in [0, 1] for v."""
    return _unsigned().to(device)
