"""metrics.jsonl (one JSON object per logged step or eval) and the memory figure shown in progress.

On resume the file is cut back to the checkpoint's step, so it reads as one uninterrupted run.
"""
import json
import resource
import sys
from pathlib import Path

import torch

METRICS_NAME = "metrics.jsonl"


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on CUDA; else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class MetricsLog:
    """Appends records to <out>/metrics.jsonl and keeps them for the loss curve."""

    def __init__(self, out: Path, resume_step: int | None = None):
        self.path = Path(out) / METRICS_NAME
        self.records: list[dict] = []
        if resume_step is not None and self.path.is_file():
            lines = [json.loads(s) for s in self.path.read_text().splitlines() if s.strip()]
            self.records = [r for r in lines if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.records if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]
