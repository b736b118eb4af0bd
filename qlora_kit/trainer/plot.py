"""The loss-curve PNG (OUT/loss_curve.png), drawn with matplotlib (the `plot` extra, headless Agg backend):
train loss per logged optimizer step as a line, eval loss as markers, on labelled axes with a legend and a
title giving the last values. Without matplotlib no PNG is written and the CLIs say so in one line
(SKIPPED); training is unaffected and the figures are in metrics.jsonl either way.
"""
from pathlib import Path

from qlora_kit.formats import atomic_file

try:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False

SKIPPED = "loss_curve.png skipped: matplotlib is not installed (pip install 'qlora-kit[plot]'); see metrics.jsonl"
SIZE_IN, DPI = (6.4, 4.0), 100  # a 640x400 PNG


def write_loss_curve(path: Path, train: tuple[list, list], evals: tuple[list, list]) -> bool:
    """Write the PNG atomically; False (nothing written) when matplotlib is not installed.

    Args:
        train: (steps, losses) of the logged optimizer steps.
        evals: (steps, eval losses).
    """
    if not HAS_MATPLOTLIB:
        return False
    fig = Figure(figsize=SIZE_IN, dpi=DPI)  # no pyplot: no global figure state, safe in any thread
    ax = fig.add_subplot()
    if train[0]:
        ax.plot(train[0], train[1], color="tab:blue", linewidth=1.2, label="train loss")
    if evals[0]:
        ax.plot(evals[0], evals[1], "o--", color="tab:red", markersize=4, label="eval loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean cross-entropy per target token)")
    last = [f"{name} {ys[-1]:.4f}" for name, ys in (("train", train[1]), ("eval", evals[1])) if ys]
    ax.set_title("loss" + (f" (last: {', '.join(last)})" if last else ""))
    ax.grid(True, alpha=0.3)
    if train[0] or evals[0]:
        ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return True
