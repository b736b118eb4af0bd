"""Rich tables and summary lines printed by the qconvert commands (no computation here)."""
import math

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qlora_kit.formats import spec

from .inspection import Inspection
from .report import TensorReport
from .verify import VerifyResult

MIB = 2**20


def inspection(console: Console, ins: Inspection) -> None:
    table = Table(title=f"{ins.folder}: {len(ins.rows)} tensors in {len(ins.files)} file(s)")
    for col in ("tensor", "shape", "stored", "bits/param", "MiB", "blocksize", "double quant", "dtype"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for r in ins.rows:
        table.add_row(r.name, "x".join(map(str, r.shape)), r.stored, f"{r.bits_per_param:.3f}", f"{r.nbytes / MIB:.2f}",
                      str(r.blocksize or ""), "" if r.double_quant is None else str(r.double_quant), r.dtype or "")
    console.print(table)
    qc = ins.quantization_config or {}
    settings = ", ".join(f"{k}={v}" for k, v in qc.items() if k.startswith("bnb_4bit") or k == "llm_int8_skip_modules")
    console.print(f"quantization_config: {settings or 'none'}")
    console.print(f"total: {ins.params:,} params, {ins.nbytes / MIB:.1f} MiB "
                  f"({8 * ins.nbytes / max(ins.params, 1):.3f} bits/param) vs {ins.bf16_bytes / MIB:.1f} MiB in bf16 "
                  f"({ins.bf16_bytes / max(ins.nbytes, 1):.2f}x smaller)")
    merged = {k[len(spec.MERGE_PREFIX):]: v for k, v in ins.metadata.items() if k.startswith(spec.MERGE_PREFIX)}
    if merged:  # provenance written by `qtrain merge` (FORMAT.md §1)
        console.print("merged: " + escape(", ".join(f"{k}={v}" for k, v in merged.items())), highlight=False)


def verification(console: Console, result: VerifyResult, show: int = 10) -> None:
    quant = [e for e in result.errors if e.quantized]
    if quant:
        table = Table(title=f"worst {min(show, len(quant))} of {len(quant)} quantized tensors vs the source")
        table.add_column("tensor")
        table.add_column("SQNR dB", justify="right")
        for e in sorted(quant, key=lambda e: e.sqnr_db)[:show]:
            table.add_row(e.name, f"{e.sqnr_db:.2f}")
        console.print(table)
        values = [e.sqnr_db for e in quant]
        console.print(f"SQNR: min {min(values):.2f} dB, mean {sum(values) / len(values):.2f} dB")
    for p in result.problems:
        console.print(f"[red]problem:[/red] {p}", soft_wrap=True)
    if result.ok:
        console.print(f"[green]ok[/green]: {result.folder}: {result.checked} tensors checked")


def report(console: Console, rows: list[TensorReport], title: str, show_all: bool) -> None:
    quant = [r for r in rows if r.quantized]
    shown = quant if show_all else sorted(quant, key=lambda r: r.sqnr_db)[:10]
    table = Table(title=f"{title}: {'all' if show_all else 'worst 10 of'} {len(quant)} quantized tensors")
    for col in ("tensor", "shape", "MiB in", "MiB out", "bits/param", "SQNR dB"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for r in shown:
        n = math.prod(r.shape)
        table.add_row(r.name, "x".join(map(str, r.shape)), f"{r.bytes_in / MIB:.2f}", f"{r.bytes_out / MIB:.2f}",
                      f"{8 * r.bytes_out / n:.3f}", f"{r.sqnr_db:.2f}")
    console.print(table)
    total_in, total_out = sum(r.bytes_in for r in rows), sum(r.bytes_out for r in rows)
    lin_in, lin_out = sum(r.bytes_in for r in quant), sum(r.bytes_out for r in quant)
    params = sum(math.prod(r.shape) for r in quant)
    mean_sqnr = sum(r.sqnr_db for r in quant) / max(len(quant), 1)
    console.print(f"linear weights: {lin_in / MIB:.1f} MiB -> {lin_out / MIB:.1f} MiB "
                  f"({8 * lin_out / params:.3f} bits/param), mean SQNR {mean_sqnr:.2f} dB, "
                  f"min {min(r.sqnr_db for r in quant):.2f} dB")
    console.print(f"whole model:    {total_in / MIB:.1f} MiB -> {total_out / MIB:.1f} MiB "
                  f"({total_in / total_out:.2f}x smaller; embeddings, head and norms stay {rows[0].dtype})")
