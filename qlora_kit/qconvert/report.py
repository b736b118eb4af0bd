"""Quantize a checkpoint's linear weights in memory and measure size and error per tensor.

SQNR_dB = 10 log10(sum W^2 / sum (W - W')^2), W' the 4-bit round trip (formats/codec.py).
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from qlora_kit.formats import open_safetensors, safetensors_files, quantize_4bit, should_quantize, sqnr_db
from qlora_kit.kernels import dequant


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]
    dtype: str
    quantized: bool
    bytes_in: int
    bytes_out: int
    sqnr_db: float | None


def quantization_report(folder: str | Path, quant_type: str = "nf4", blocksize: int = 64,
                        double_quant: bool = True, show_progress: bool = True) -> list[TensorReport]:
    """One TensorReport per tensor of the checkpoint; tensors are read and quantized one at a time."""
    folder = Path(folder)
    files = safetensors_files(folder)
    rows: list[TensorReport] = []
    total = sum(f.stat().st_size for f in files)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress, transient=True) as progress:
        task = progress.add_task("quantizing", total=total)
        for file in files:
            with open_safetensors(file) as f:
                for name in f.keys():
                    w = f.get_tensor(name)
                    nbytes = w.numel() * w.element_size()
                    if should_quantize(name, w):
                        packed = quantize_4bit(w, quant_type, blocksize, double_quant, name=name)
                        err = sqnr_db(w, dequant(packed, torch.float32))
                        rows.append(TensorReport(name, tuple(w.shape), str(w.dtype).removeprefix("torch."), True,
                                                 nbytes, packed.nbytes, err))
                    else:
                        rows.append(TensorReport(name, tuple(w.shape), str(w.dtype).removeprefix("torch."), False,
                                                 nbytes, nbytes, None))
                    progress.advance(task, nbytes)
    return rows


def as_json(rows: list[TensorReport]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=1)
