"""Conversion cost: `qconvert convert` vs transformers + bitsandbytes (from_pretrained with
BitsAndBytesConfig, then save_pretrained) on the same checkpoint; each run in a fresh subprocess.

    python -m bench.convert [--model DIR] [--repeat 3]       # SmolLM2 by default, ratios peer / ours
    python -m bench.convert --synthetic [--params 1.5e9]     # peak RSS of ours on a large random checkpoint

Wall time is the subprocess's whole life (interpreter start and imports included, as a user sees it);
CPU time is its user + system time and peak RSS its ru_maxrss, both from os.wait4. The best of --repeat
runs is reported per tool (the machine may be shared; CPU time is the steadier figure there).
--threads N sets OMP_NUM_THREADS for both tools alike. --synthetic writes a Llama-shaped bf16 checkpoint of random weights to a
temporary folder (streamed, never held in memory) and converts it, to show that peak memory follows the
largest tensor rather than the model size.

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

OURS = "import sys; from qlora_kit.qconvert.cli import main; sys.argv[0] = 'qconvert'; main()"
PEER = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=qc, dtype=torch.bfloat16, device_map="cpu")
m.save_pretrained(sys.argv[2])
"""


THREADS: dict[str, str] = {}


def run(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS bytes) of one fresh subprocess; raises if it fails."""
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error") | THREADS
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:3]} failed:\n{err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def best(fn, repeat: int) -> tuple[float, float, int, list[float]]:
    """Best wall, best CPU and lowest peak RSS over `repeat` runs, plus every wall time."""
    runs = [fn(i) for i in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs), min(r[2] for r in runs), [r[0] for r in runs]


def synthetic(folder: Path, params: float) -> tuple[int, int]:
    """Write a Llama-shaped random bf16 checkpoint of about `params` parameters; return (params, largest tensor)."""
    import torch

    from qlora_kit.qconvert.shards import ShardWriter

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
@click.option("--repeat", default=3, show_default=True)
@click.option("--synthetic", "synth", is_flag=True, help="Convert a large random Llama-shaped checkpoint instead.")
@click.option("--params", default=1.5e9, show_default=True, help="Parameters of the --synthetic checkpoint.")
@click.option("--threads", type=int, default=None, help="OMP_NUM_THREADS for both tools (default: inherit).")
@click.option("--write-synthetic", type=click.Path(), default=None, hidden=True)
def main(model, repeat, synth, params, threads, write_synthetic):
    gib = 2**30
    if write_synthetic:  # the child that writes the synthetic checkpoint
        print(json.dumps(synthetic(Path(write_synthetic), params)))
        return
    if threads:
        THREADS["OMP_NUM_THREADS"] = str(threads)
    print(f"threads: {threads or 'inherited'} (qconvert convert uses --threads, default 1), "
          f"load average before: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        ours = lambda src, i: run([sys.executable, "-c", OURS, "convert", str(src), str(tmp / f"ours{i}"), "--quiet"])
        if synth:
            made = subprocess.run([sys.executable, "-m", "bench.convert", "--params", str(params),
                                   "--write-synthetic", str(tmp / "src")], check=True, capture_output=True, text=True)
            n, largest = json.loads(made.stdout.strip().splitlines()[-1])
            size = sum(f.stat().st_size for f in (tmp / "src").glob("*.safetensors"))
            wall, cpu, rss, walls = best(lambda i: ours(tmp / "src", i), repeat)
            print(f"synthetic Llama: {n / 1e9:.2f}B params, {size / gib:.2f} GiB bf16 on disk, largest tensor "
                  f"{2 * largest / 2**20:.0f} MiB")
            print(f"qconvert convert: {wall:.1f} s wall, {cpu:.1f} s CPU (runs {', '.join(f'{w:.1f}' for w in walls)}), "
                  f"peak RSS {rss / 2**20:.0f} MiB = {rss / size:.3f}x the checkpoint size")
            return
        peer = lambda i: run([sys.executable, "-c", PEER, model, str(tmp / f"peer{i}")])
        wall_o, cpu_o, rss_o, walls_o = best(lambda i: ours(model, i), repeat)
        wall_p, cpu_p, rss_p, walls_p = best(peer, repeat)
        size = sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))
        print(f"model: {model} ({size / 2**20:.0f} MiB bf16), best of {repeat} fresh subprocesses each")
        print(f"{'':28}{'wall s':>9}{'CPU s':>8}{'peak RSS MiB':>14}")
        for label, w, c, r, ws in (("qconvert convert", wall_o, cpu_o, rss_o, walls_o),
                                   ("transformers + bitsandbytes", wall_p, cpu_p, rss_p, walls_p)):
            print(f"{label:28}{w:9.2f}{c:8.2f}{r / 2**20:14.0f}   wall runs {', '.join(f'{x:.2f}' for x in ws)}")
        print(f"speed-up (wall) {wall_p / wall_o:.2f}x, speed-up (CPU) {cpu_p / cpu_o:.2f}x, "
              f"peak RSS ours / theirs {rss_o / rss_p:.2f}")


if __name__ == "__main__":
    main()
