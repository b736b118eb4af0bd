"""metrics.jsonl (one JSON object per logged step or eval), optional TensorBoard event files, and the
memory figure shown in progress.

On resume the file is cut back to the checkpoint's step, so it reads as one uninterrupted run; the
TensorBoard writer likewise purges events after that step (SummaryWriter's purge_step). With
`--report-to tensorboard`, every record's scalars go to OUT/runs/ as train/loss, train/lr,
train/grad_norm and eval/loss (torch.utils.tensorboard.SummaryWriter; the `tensorboard` extra).
"""
import json
import resource
import sys
from pathlib import Path

import torch

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "runs"
# metrics.jsonl key -> TensorBoard tag
TB_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "eval_loss": "eval/loss"}


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on CUDA; else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class MetricsLog:
    """Appends records to <out>/metrics.jsonl and keeps them for the loss curve."""

    def __init__(self, out: Path, resume_step: int | None = None, tensorboard: bool = False):
        self.path = Path(out) / METRICS_NAME
        self.records: list[dict] = []
        if resume_step is not None and self.path.is_file():
            lines = [json.loads(s) for s in self.path.read_text().splitlines() if s.strip()]
            self.records = [r for r in lines if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.tb = None
        if tensorboard:  # TrainConfig checked that the package is installed
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step else None  # drop events a resumed run will log again
            self.tb = SummaryWriter(str(Path(out) / TENSORBOARD_DIR), purge_step=purge)

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, tag in TB_TAGS.items():
                if isinstance(record.get(key), (int, float)):
                    self.tb.add_scalar(tag, record[key], record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.records if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]
