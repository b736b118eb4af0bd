"""Dequantization throughput: our kernels.dequant (torch path; Triton on CUDA) vs bitsandbytes' dequantize_4bit.

    python -m bench.dequant [--device cpu|cuda] [--reps 30] [--threads N] [--json]

GB/s counts bytes read and written (kernels/ref/dequant.py): n/2 code bytes + the absmax bytes + n output
elements in bf16. Each shape times the same Packed4bit tensors on both sides. On CPU one sample is the mean of
enough back-to-back calls to last about 2 ms (so timer resolution does not matter), and ours and bitsandbytes
alternate sample by sample (bench._timing.interleave) after 3 warm-up samples each; figures are the median
[min-max] of --reps samples, so a single slow call (e.g. a page fault of bitsandbytes' output) moves neither
the median nor the verdict. On CUDA each side is timed by Triton's do_bench (median, q20-q80).
The ratio column is ours' speed / bitsandbytes' (> 1: ours faster). Each row also checks bit-exactness.
"""
import json
import math
import time

import bitsandbytes.functional as bnbf
import click
import torch

from bench._timing import Stats, begin, compare, end, interleave, measure
from qlora_kit.formats import quantize_4bit, to_entries
from qlora_kit.kernels import dequant

SHAPES = {"cpu": [(576, 576), (1536, 576), (4096, 4096)], "cuda": [(4096, 4096), (14336, 4096), (4096, 14336)]}
SAMPLE_S = 2e-3


def _bytes_moved(packed, out_dtype) -> int:
    n = packed.state.numel
    return packed.nbytes + n * torch.empty(0, dtype=out_dtype).element_size()


def _bnb_state(packed, name="w"):
    entries = to_entries(name, packed)
    qs = {k[len(name) + 1:]: v for k, v in entries.items() if k != name}
    return entries[name], bnbf.QuantState.from_dict(qs, packed.data.device)


def _sampler(fn):
    """A side for interleave(): mean seconds per call over enough calls to last ~SAMPLE_S."""
    t = time.perf_counter()
    fn()
    calls = max(1, int(SAMPLE_S / max(time.perf_counter() - t, 1e-7)))

    def sample() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls
    return sample


def run(device: str, reps: int) -> list[dict]:
    rows = []
    for shape in SHAPES[device]:
        w = (torch.randn(shape) * 0.02).to(torch.bfloat16).to(device)
        packed = quantize_4bit(w, "nf4", 64, double_quant=True)
        data, state = _bnb_state(packed)
        moved = _bytes_moved(packed, torch.bfloat16)
        ours_fn = lambda: dequant(packed, torch.bfloat16)  # noqa: E731
        bnb_fn = lambda: bnbf.dequantize_4bit(data, state)  # noqa: E731
        row = {"shape": list(shape), "device": device, "bytes": moved,
               "bit_exact": bool(torch.equal(ours_fn(), bnb_fn().to(torch.bfloat16)))}
        if device == "cuda":
            for k, fn in (("ours", ours_fn), ("bitsandbytes", bnb_fn)):
                med, q20, q80 = measure(fn)
                row[k] = {"median_s": med, "lo_s": q20, "hi_s": q80, "samples": []}
        else:
            runs = interleave({"ours": _sampler(ours_fn), "bitsandbytes": _sampler(bnb_fn)}, reps, warmup=3)
            for k, xs in runs.samples.items():
                st = Stats.of(xs)
                row[k] = {"median_s": st.median, "lo_s": st.lo, "hi_s": st.hi, "outliers": st.outliers,
                          "samples": xs}
            v = compare(runs.samples["ours"], runs.samples["bitsandbytes"])
            row["verdict"] = v.line(f"{'x'.join(map(str, shape))}", "ours", "bitsandbytes")
        row["ours_vs_bnb"] = row["bitsandbytes"]["median_s"] / row["ours"]["median_s"]
        rows.append(row)
    return rows


@click.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cuda" if torch.cuda.is_available() else "cpu")
@click.option("--reps", default=30, show_default=True, help="interleaved samples per side (CPU)")
@click.option("--threads", type=int, default=None, help="intra-op threads for both sides (default: cores)")
@click.option("--json", "as_json", is_flag=True)
def main(device, reps, threads, as_json):
    """Time NF4+DQ -> bf16 dequantization, ours vs bitsandbytes, on the same tensors."""
    begin(threads, reps)
    rows = run(device, reps)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        end()
        return
    for r in rows:
        o, b = r["ours"], r["bitsandbytes"]
        fmt = lambda d: (f"{d['median_s'] * 1e6:9.1f} us [{d['lo_s'] * 1e6:.1f}-{d['hi_s'] * 1e6:.1f}]"  # noqa: E731
                         f"{' (%d outliers)' % d['outliers'] if d.get('outliers') else ''} "
                         f"{r['bytes'] / d['median_s'] / 1e9:6.1f} GB/s")
        click.echo(f"{'x'.join(map(str, r['shape'])):>11s}  bnb {fmt(b)} | ours {fmt(o)}  x{r['ours_vs_bnb']:.2f} vs bnb"
                   f"  bit-exact {'yes' if r['bit_exact'] else 'NO'}")
    for r in rows:
        if "verdict" in r:
            click.echo(r["verdict"])
    gm = math.exp(sum(math.log(r["ours_vs_bnb"]) for r in rows) / len(rows))
    click.echo(f"geometric mean of medians, ours vs bitsandbytes: x{gm:.2f}")
    end()


if __name__ == "__main__":
    main()
