"""One merged weight and what storing it cost.

For a projection with base weight W (out, in) and adapter A (r, in), B (out, r), scale s (models/adapters.py
`read_peft_adapter`: alpha / r, or alpha / sqrt(r) with rsLoRA, per-module patterns applied):

    W_deq = dequant(codes, absmax)          FORMAT.md §2.3, decoded in bf16: what NF4Linear multiplies by
                                            in bf16 compute, so what the adapter was trained against
    R     = W_deq + s · (B A)               fp32 (B A first, then s, as PEFT's delta weight)
    M     = bf16(R)                         rounded once ("bf16")
    M     = dequant(quantize_4bit(bf16(R)))  re-quantized with the base weight's own settings ("nf4")

The cost of storing M instead of R, per tensor (Frobenius norms, fp64 accumulation):

    rel_error    = ||M − R|| / ||R||         relative to the weight
    update_error = ||M − R|| / ||s · B A||   relative to the adapter's update: near 1 the update is lost in
                                             the rounding (small updates on large weights, PEFT #2105)
"""
from dataclasses import dataclass

import torch

from qlora_kit.formats import Packed4bit, quantize_4bit, to_entries
from qlora_kit.kernels import dequant

FORMATS = ("bf16", "nf4")
DECODE_DTYPE = torch.bfloat16  # the runtime's compute dtype: W_deq as the adapter saw it


@dataclass(frozen=True, slots=True)
class TensorCost:
    """What merging one weight cost (see the module docstring)."""

    name: str
    shape: tuple[int, ...]
    rank: int
    scale: float
    rel_error: float
    update_error: float | None  # None when the update is zero (B = 0)


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))


def merged_reference(w_deq: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, delta): R = W_deq + delta, delta = s · (B A), both fp32 (out, in)."""
    delta = (b.float() @ a.float()) * scale
    return w_deq.float() + delta, delta


def merge_weight(name: str, w_deq: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, fmt: str,
                 like: Packed4bit | None = None) -> tuple[dict[str, torch.Tensor], TensorCost]:
    """Merge one adapter pair into its base weight.

    Args:
        name: the weight's key (`<module path>.weight`).
        w_deq: (out, in) the base weight as the runtime uses it (bf16 decode of the 4-bit weight, or a plain weight).
        a, b: lora_A (r, in) and lora_B (out, r).
        scale: the adapter's s for this module.
        fmt: "bf16" (one bf16 tensor) or "nf4" (re-quantized with `like`'s quant type, blocksize and double quant).
        like: the base's packed weight (its settings are reused); required for "nf4".

    Returns:
        The checkpoint entries of the merged weight and its TensorCost.
    """
    ref, delta = merged_reference(w_deq, a, b, scale)
    merged = ref.to(torch.bfloat16)
    if fmt == "nf4":
        s = like.state
        packed = quantize_4bit(merged, s.quant_type, s.blocksize, s.nested is not None, name)
        entries = to_entries(name, packed)
        stored = dequant(packed, DECODE_DTYPE)
    else:
        entries, stored = {name: merged}, merged
    err = _norm(stored.float() - ref)
    update = _norm(delta)
    cost = TensorCost(name, tuple(ref.shape), a.shape[0], scale, err / max(_norm(ref), 1e-30),
                      err / update if update > 0 else None)
    return entries, cost
