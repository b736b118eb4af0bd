"""Dequantization throughput: our torch twin and Triton kernel vs bitsandbytes' dequantize_4bit.

    python -m bench.dequant [--device cpu|cuda] [--json]

GB/s counts bytes read and written (kernels/ref/dequant.py): n/2 code bytes + the absmax bytes + n output
elements in bf16. Each row times the same Packed4bit tensors; the ratio column is ours / bitsandbytes.
"""
import json
import math

import bitsandbytes.functional as bnbf
import click
import torch

from bench._timing import measure
from qlora_kit.formats import quantize_4bit, to_entries
from qlora_kit.kernels import dequant

SHAPES = {"cpu": [(576, 576), (1536, 576), (4096, 4096)], "cuda": [(4096, 4096), (14336, 4096), (4096, 14336)]}


def _bytes_moved(packed, out_dtype) -> int:
    n = packed.state.numel
    return packed.nbytes + n * torch.empty(0, dtype=out_dtype).element_size()


def _bnb_state(packed, name="w"):
    entries = to_entries(name, packed)
    qs = {k[len(name) + 1:]: v for k, v in entries.items() if k != name}
    return entries[name], bnbf.QuantState.from_dict(qs, packed.data.device)


def run(device: str) -> list[dict]:
    rows = []
    providers = ["torch"] + (["triton"] if device == "cuda" else [])
    for shape in SHAPES[device]:
        w = (torch.randn(shape) * 0.02).to(torch.bfloat16).to(device)
        packed = quantize_4bit(w, "nf4", 64, double_quant=True)
        data, state = _bnb_state(packed)
        moved = _bytes_moved(packed, torch.bfloat16)
        t_bnb = measure(lambda: bnbf.dequantize_4bit(data, state))
        row = {"shape": list(shape), "device": device, "bytes": moved,
               "bitsandbytes_us": t_bnb[0] * 1e6, "bitsandbytes_GBps": moved / t_bnb[0] / 1e9}
        for p in providers:
            t = measure(lambda: dequant(packed, torch.bfloat16, backend=p))
            row[f"{p}_us"] = t[0] * 1e6
            row[f"{p}_us_q20_q80"] = [t[1] * 1e6, t[2] * 1e6]
            row[f"{p}_GBps"] = moved / t[0] / 1e9
            row[f"{p}_vs_bnb"] = t_bnb[0] / t[0]
        rows.append(row)
    return rows


@click.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cuda" if torch.cuda.is_available() else "cpu")
@click.option("--json", "as_json", is_flag=True)
def main(device, as_json):
    """Time NF4+DQ -> bf16 dequantization, ours vs bitsandbytes, on the same tensors."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run(device)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if device == "cpu":
        click.echo("Triton runs only on CUDA (the CPU interpreter is a test tool, not a benchmark): torch path only.")
    for r in rows:
        line = f"{'x'.join(map(str, r['shape'])):>11s}  bnb {r['bitsandbytes_us']:9.1f} us {r['bitsandbytes_GBps']:7.1f} GB/s"
        for p in ("torch", "triton"):
            if f"{p}_us" in r:
                line += f" | {p} {r[p + '_us']:9.1f} us {r[p + '_GBps']:7.1f} GB/s  x{r[p + '_vs_bnb']:.2f} vs bnb"
        click.echo(line)
    gm = math.exp(sum(math.log(r["torch_vs_bnb"]) for r in rows) / len(rows))
    click.echo(f"geometric mean, torch path vs bitsandbytes: x{gm:.2f}")


if __name__ == "__main__":
    main()
