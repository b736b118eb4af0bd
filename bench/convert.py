"""Conversion cost: `qconvert convert` vs transformers + bitsandbytes (from_pretrained with
BitsAndBytesConfig, then save_pretrained) on the same checkpoint; each run in a fresh subprocess.

    python -m bench.convert [--model DIR] [--reps 3] [--threads N]   # SmolLM2 by default, ratios ours vs peer
    python -m bench.convert --synthetic [--params 1.5e9]               # peak RSS of ours on a large random checkpoint

Wall time is the subprocess's whole life (interpreter start and imports included, as a user sees it);
CPU time is its user + system time and peak RSS its ru_maxrss, all three from the same os.wait4 of the
same run. Ours and the peer alternate run by run (A B A B, bench._timing.interleave) and every run is
printed; the summary is the median [min-max] of each figure, and the ratios are medians of per-pair ratios'
spread (never one metric's best run against another's).
Threads are pinned alike: both children get OMP_NUM_THREADS/MKL_NUM_THREADS = N and qconvert gets
`--threads N` (N = --threads, default qconvert's own default, 1: what a qconvert user gets, and the peer
is given the same). --each-default is an explicit shortcut that
leaves each tool at its own default (qconvert 1 thread, the peer torch's default) and says so.
--synthetic writes a Llama-shaped bf16 checkpoint of random weights to a temporary folder (streamed, never
held in memory) and converts it, to show that peak memory follows the largest tensor rather than the model size.

This parent process imports neither torch nor qlora-kit, and the synthetic checkpoint is written by a
child of its own: Linux folds the pre-exec memory of a forked child into its ru_maxrss, so a fat parent
would inflate every figure.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from bench._timing import Stats, begin, compare, end, interleave

OURS = "import sys; from qlora_kit.qconvert.cli import main; sys.argv[0] = 'qconvert'; main()"
PEER = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=qc, dtype=torch.bfloat16, device_map="cpu")
m.save_pretrained(sys.argv[2])
"""


THREADS: dict[str, str] = {}  # --each-default: the thread variables removed from the children's environment


def run(argv: list[str]) -> dict:
    """{"wall", "cpu", "rss"} (seconds, seconds, bytes) of one fresh subprocess; raises if it fails."""
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    for key in THREADS:
        env.pop(key, None)
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:3]} failed:\n{err[-2000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024}


def _qconvert_default_threads() -> int:
    """ConvertConfig.threads' default, read in a child (importing qlora_kit here would load torch, see above)."""
    code = ("from qlora_kit.qconvert.options import ConvertConfig; "
            "print(ConvertConfig.__dataclass_fields__['threads'].default)")
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def counter():
    """0, 1, 2, ... on successive calls (a fresh output folder per run)."""
    n = [-1]

    def nxt() -> int:
        n[0] += 1
        return n[0]
    return nxt


def synthetic(folder: Path, params: float) -> tuple[int, int]:
    """Write a Llama-shaped random bf16 checkpoint of about `params` parameters; return (params, largest tensor)."""
    import torch

    from qlora_kit.formats import ShardWriter

    hidden, inter, heads, kv, vocab = 2048, 5632, 32, 4, 32000
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv,
              "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "dtype": "bfloat16", "max_position_embeddings": 4096}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    writer = ShardWriter(folder, 2 * 10**9)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
                   p + "self_attn.v_proj.weight": (kv * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    for name, shape in shapes.items():
        writer.add_group({name: (torch.randn(shape, generator=g) * 0.02).bfloat16()})
    writer.close()
    return sum(math.prod(s) for s in shapes.values()), max(math.prod(s) for s in shapes.values())


@click.command()
@click.option("--model", default=".cache/smollm2-135m-instruct", show_default=True, help="bf16 HF folder.")
@click.option("--reps", "--repeat", "reps", default=3, show_default=True, help="runs per tool, interleaved")
@click.option("--synthetic", "synth", is_flag=True, help="Convert a large random Llama-shaped checkpoint instead.")
@click.option("--params", default=1.5e9, show_default=True, help="Parameters of the --synthetic checkpoint.")
@click.option("--threads", type=int, default=None, help="threads for both tools (default: qconvert's default, 1)")
@click.option("--each-default", is_flag=True, help="shortcut: each tool at its own default thread count")
@click.option("--write-synthetic", type=click.Path(), default=None, hidden=True)
def main(model, reps, synth, params, threads, each_default, write_synthetic):
    gib = 2**30
    if write_synthetic:  # the child that writes the synthetic checkpoint
        print(json.dumps(synthetic(Path(write_synthetic), params)))
        return
    shortcuts = ["--each-default: qconvert at its default 1 thread, the peer at torch's default"] * each_default
    n = begin(threads, reps, shortcuts, default=_qconvert_default_threads(),
              why="default: qconvert's own default thread count, given to both tools")
    qthreads = [] if each_default else ["--threads", str(n)]
    if each_default:
        THREADS.update(OMP_NUM_THREADS="", MKL_NUM_THREADS="")
    else:
        print(f"qconvert convert gets --threads {n}; both children OMP_NUM_THREADS={n}")
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        k = counter()
        ours = lambda src: run([sys.executable, "-c", OURS, "convert", str(src), str(tmp / f"ours{k()}"), "--quiet",
                                *qthreads])
        if synth:
            made = subprocess.run([sys.executable, "-m", "bench.convert", "--params", str(params),
                                   "--write-synthetic", str(tmp / "src")], check=True, capture_output=True, text=True)
            n_params, largest = json.loads(made.stdout.strip().splitlines()[-1])
            size = sum(f.stat().st_size for f in (tmp / "src").glob("*.safetensors"))
            runs = interleave({"ours": lambda: ours(tmp / "src")}, reps).samples["ours"]
            print(f"synthetic Llama: {n_params / 1e9:.2f}B params, {size / gib:.2f} GiB bf16 on disk, largest tensor "
                  f"{2 * largest / 2**20:.0f} MiB")
            for i, r in enumerate(runs):
                print(f"  run {i}: {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU, peak RSS {r['rss'] / 2**20:.0f} MiB")
            rss = Stats.of([r["rss"] for r in runs])
            print(f"qconvert convert: wall {Stats.of([r['wall'] for r in runs]).fmt(unit=' s', digits=1)}, "
                  f"CPU {Stats.of([r['cpu'] for r in runs]).fmt(unit=' s', digits=1)}, peak RSS "
                  f"{rss.fmt(1 / 2**20, ' MiB', 0)} = {rss.median / size:.3f}x the checkpoint size")
            end()
            return
        peer = lambda: run([sys.executable, "-c", PEER, model, str(tmp / f"peer{k()}")])
        runs = interleave({"ours": lambda: ours(model), "peer": peer}, reps).samples
    size = sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))
    print(f"model: {model} ({size / 2**20:.0f} MiB bf16), {reps} fresh subprocesses per tool, interleaved")
    print(f"{'run':>4} {'tool':<28}{'wall s':>9}{'CPU s':>8}{'peak RSS MiB':>14}")
    for i in range(reps):
        for key, label in (("ours", "qconvert convert"), ("peer", "transformers + bitsandbytes")):
            r = runs[key][i]
            print(f"{i:>4} {label:<28}{r['wall']:9.2f}{r['cpu']:8.2f}{r['rss'] / 2**20:14.0f}")
    for key, label in (("ours", "qconvert convert"), ("peer", "transformers + bitsandbytes")):
        xs = runs[key]
        print(f"median {label:<28} wall {Stats.of([r['wall'] for r in xs]).fmt(unit=' s')}, "
              f"CPU {Stats.of([r['cpu'] for r in xs]).fmt(unit=' s')}, "
              f"peak RSS {Stats.of([r['rss'] for r in xs]).fmt(1 / 2**20, ' MiB', 0)}")
    for metric in ("wall", "cpu"):
        print(compare([r[metric] for r in runs["ours"]], [r[metric] for r in runs["peer"]]).line(
            f"{metric} time", "qconvert", "transformers+bnb"))
    rss_o, rss_p = (Stats.of([r["rss"] for r in runs[k_]]).median for k_ in ("ours", "peer"))
    print(f"peak RSS ours / theirs (medians): {rss_o / rss_p:.2f}")
    end()


if __name__ == "__main__":
    main()
