"""qconvert: turn Hugging Face checkpoints into NF4 double-quantized checkpoints (FORMAT.md)."""
import json
import math
import sys

import click
from rich.console import Console
from rich.table import Table

from formats import spec
from formats._cli import cli_errors

from .report import as_json, quantization_report

console = Console()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qlora-kit")
def main():
    """Convert, inspect, verify, dequantize and publish 4-bit NF4 checkpoints."""


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--quant-type", type=click.Choice(spec.QUANT_TYPES), default="nf4", show_default=True)
@click.option("--blocksize", type=click.Choice([str(b) for b in spec.BLOCKSIZES]), default="64", show_default=True)
@click.option("--double-quant/--no-double-quant", default=True, show_default=True)
@click.option("--json", "as_json_", is_flag=True, help="Print the per-tensor rows as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor, not only the worst 10.")
@cli_errors
def report(src, quant_type, blocksize, double_quant, as_json_, show_all):
    """Quantize SRC's linear weights in memory; print sizes and per-tensor error (SQNR, dB).

    SRC is a local Hugging Face checkpoint folder (model.safetensors or a sharded index).
    Nothing is written.
    """
    rows = quantization_report(src, quant_type, int(blocksize), double_quant, show_progress=not as_json_)
    if as_json_:
        click.echo(as_json(rows))
        return
    quant = [r for r in rows if r.quantized]
    shown = quant if show_all else sorted(quant, key=lambda r: r.sqnr_db)[:10]
    table = Table(title=f"{quant_type} blocksize {blocksize} double-quant {double_quant}: "
                        f"{'all' if show_all else 'worst 10 of'} {len(quant)} quantized tensors")
    for col in ("tensor", "shape", "MiB in", "MiB out", "bits/param", "SQNR dB"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for r in shown:
        n = math.prod(r.shape)
        table.add_row(r.name, "x".join(map(str, r.shape)), f"{r.bytes_in / 2**20:.2f}", f"{r.bytes_out / 2**20:.2f}",
                      f"{8 * r.bytes_out / n:.3f}", f"{r.sqnr_db:.2f}")
    console.print(table)
    total_in, total_out = sum(r.bytes_in for r in rows), sum(r.bytes_out for r in rows)
    lin_in, lin_out = sum(r.bytes_in for r in quant), sum(r.bytes_out for r in quant)
    params = sum(math.prod(r.shape) for r in quant)
    mean_sqnr = sum(r.sqnr_db for r in quant) / max(len(quant), 1)
    console.print(f"linear weights: {lin_in / 2**20:.1f} MiB -> {lin_out / 2**20:.1f} MiB "
                  f"({8 * lin_out / params:.3f} bits/param), mean SQNR {mean_sqnr:.2f} dB, "
                  f"min {min(r.sqnr_db for r in quant):.2f} dB")
    console.print(f"whole model:    {total_in / 2**20:.1f} MiB -> {total_out / 2**20:.1f} MiB "
                  f"({total_in / total_out:.2f}x smaller; embeddings, head and norms stay {rows[0].dtype})")


for _name in ("convert", "inspect", "verify", "dequantize", "publish"):
    def _stub(_name=_name):
        click.echo(f"qconvert {_name}: not implemented yet", err=True)
        sys.exit(1)
    main.command(_name, help=f"{_name.capitalize()} (not implemented yet).")(_stub)
