"""Learning-rate schedules as a pure function of the optimizer step, so resuming needs only the step.

    warmup (steps s < W):  lr = peak * (s + 1) / W
    after warmup, with p = (s - W) / max(1, S - W) for S total steps:
        constant  lr = peak
        linear    lr = peak * (1 - p)
        cosine    lr = peak * 0.5 * (1 + cos(pi p))          (Loshchilov & Hutter 2017, no restarts)
"""
import math

from .config import SCHEDULES


def warmup_steps(total_steps: int, warmup_ratio: float, warmup_steps: int = 0) -> int:
    """Explicit warmup steps when > 0, else ceil(ratio * total)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)


def lr_at(step: int, peak: float, total_steps: int, warmup: int, kind: str = "constant") -> float:
    """Learning rate for 0-based optimizer step `step` of `total_steps`."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler={kind!r}: choose one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    p = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if kind == "linear":
        return peak * (1.0 - p)
    return peak * 0.5 * (1.0 + math.cos(math.pi * p))
