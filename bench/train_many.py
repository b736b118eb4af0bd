"""Many adapters in one run vs one run per adapter: wall time and peak memory, and throughput vs number of jobs.

    python -m bench.train_many [--base MODEL_DIR] [--tiny] [--jobs 8] [--steps 4] [--seq 128] [--batch 2] [--rank 8]
                               [--scaling 4,64] [--reps 3] [--threads N] [--json]

Model: the bundled SmolLM2-135M-Instruct by default (--base for another folder). --tiny is an explicit, printed
shortcut: a small random Llama (SmolLM2's tokenizer, hidden 128, 4 layers) written to a temp dir, so the
figures are about the trainer's overheads (process start, loading) rather than a model's FLOPs.
Data: the shipped Quillfeather chats, dealt into one shard per job (job k gets every n-th line), so each adapter
has its own customer data and both sides train exactly the same jobs (same seeds, steps, rank, batch).
  sequential  one `python -m qlora_kit.trainer train` process per job, one after the other (load the base N times)
  train-many  one `train-many` process for all N jobs (load the base once, rows of all jobs in each pass)
The two sides alternate --reps times (A B A B, bench._timing.interleave); figures are median [min-max].
Wall time is the whole process (start, load, train, write adapters); peak memory is each process's peak RSS
(os.wait4): for the sequential side the largest of its processes (one at a time) and their sum (N separate
runs side by side, each with its own base). Ratios are sequential / train-many.
Scaling: one train-many run per job count in --scaling (default 4 and 64, printed together); tok/s = trained
tokens / training-loop seconds (ManyResult), with the rows per pass used (--rows-per-pass; 0 = every job's
micro-batch in one pass).
Children get --threads intra-op threads (OMP_NUM_THREADS/MKL_NUM_THREADS; default this machine's cores), both
sides alike. --mmap-threshold sets MALLOC_MMAP_THRESHOLD_ (bytes) in every child, both sides alike (0 = glibc's
default): with glibc's dynamic threshold, per-adapter activation copies fragment the heap and peak RSS grows
with the number of adapters far past the live tensors.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import click

from bench._timing import Stats, begin, compare, end, interleave

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = Path(os.environ.get("QLORA_KIT_SMOLLM2", REPO / ".cache" / "smollm2-135m-instruct"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def _small_model(out: Path) -> Path:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (SMOLLM2 / name).exists():
            shutil.copy(SMOLLM2 / name, out / name)
    return out


def _shards(root: Path, n: int) -> list[Path]:
    lines = (resources.files("qlora_kit.trainer") / "datasets" / "quillfeather.jsonl").read_text().splitlines()
    paths = []
    for k in range(n):
        path = root / f"customer{k:03d}.jsonl"
        path.write_text("\n".join(lines[k % 8::8]) + "\n")
        paths.append(path)
    return paths


def _settings(steps: int, seq: int, batch: int, rank: int) -> dict:
    return {"max_steps": steps, "max_seq_len": seq, "batch_size": batch, "grad_accum": 1, "r": rank,
            "lora_alpha": 2.0 * rank,
                "lora_dropout": 0.0, "warmup_steps": 1}


MMAP_THRESHOLD = [0]  # set once from --mmap-threshold


def _run_measured(cmd: list[str], threads: int) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one child process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if MMAP_THRESHOLD[0]:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD[0])
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise click.ClickException(f"{' '.join(cmd[:5])} ... failed:\n{err.read()[-2000:]}")
        return wall, usage.ru_maxrss / 1024, out.read()


def _jobs_file(path: Path, shards: list[Path], settings: dict) -> Path:
    lines = ["[defaults]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    for k, shard in enumerate(shards):
        lines += ["", "[[jobs]]", f'name = "customer{k:03d}"', f'data = "{shard}"', f"seed = {k}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _many(base: Path, jobs: Path, out: Path, threads: int, rows_per_pass: int = 0) -> dict:
    cmd = [sys.executable, "-m", "bench.train_many", "--child-many", str(base), str(jobs), str(out), str(rows_per_pass)]
    wall, rss, stdout = _run_measured(cmd, threads)
    return {"wall_s": wall, "peak_rss_mb": rss, **json.loads(stdout.strip().splitlines()[-1])}


def _sequential(base: Path, shards: list[Path], settings: dict, out: Path, threads: int) -> dict:
    wall, peak, total = 0.0, 0.0, 0.0
    for k, shard in enumerate(shards):
        flags = [a for key, v in settings.items() for a in (f"--{key.replace('_', '-')}", str(v))]
        cmd = [sys.executable, "-m", "qlora_kit.trainer", "train", "--base", str(base), "--data", str(shard), "--out",
               str(out / f"customer{k:03d}"), "--seed", str(k), "--no-progress", *flags]
        w, rss, _ = _run_measured(cmd, threads)
        wall, peak, total = wall + w, max(peak, rss), total + rss
    return {"wall_s": wall, "peak_rss_mb": peak, "sum_peak_rss_mb": total}


def run_child_many(base: str, jobs: str, out: str, rows_per_pass: str) -> None:
    """Run train-many in this process and print one JSON line (used by the parent for its figures)."""
    from qlora_kit.trainer.many import ManyConfig, train_many

    t = time.perf_counter()
    res = train_many(ManyConfig(base=base, jobs=jobs, out=out, progress=False, rows_per_pass=int(rows_per_pass)))
    done = sum(r["status"] == "done" for r in res.jobs)
    print(json.dumps({"train_s": time.perf_counter() - t, "tokens_per_s": res.tokens_per_s, "jobs_done": done,
                      "tokens": sum(r["tokens"] for r in res.jobs)}))


@click.command()
@click.option("--base", type=click.Path(exists=True, file_okay=False), default=None,
              help="model folder (bf16 or NF4); default the bundled SmolLM2")
@click.option("--tiny", is_flag=True, help="shortcut: a small random Llama (hidden 128, 4 layers) instead")
@click.option("--jobs", "n_jobs", default=8, show_default=True, help="jobs in the head-to-head comparison")
@click.option("--steps", default=4, show_default=True)
@click.option("--seq", default=128, show_default=True)
@click.option("--batch", default=2, show_default=True)
@click.option("--rank", default=8, show_default=True)
@click.option("--scaling", default="4,64", show_default=True, help="job counts for the throughput sweep")
@click.option("--reps", default=3, show_default=True, help="interleaved head-to-head rounds")
@click.option("--threads", type=int, default=None, help="intra-op threads of every child (default: cores)")
@click.option("--mmap-threshold", default=131072, show_default=True,
              help="MALLOC_MMAP_THRESHOLD_ for children (0 = off)")
@click.option("--json", "as_json", is_flag=True)
@click.option("--rows-per-pass", default=None, type=int, help="train-many --rows-per-pass for every train-many run "
              "(default: ManyConfig's; 0 = all jobs in one pass)")
@click.option("--child-many", nargs=4, default=None, hidden=True)
def main(base, tiny, n_jobs, steps, seq, batch, rank, scaling, reps, threads, mmap_threshold, rows_per_pass, as_json,
         child_many):
    if child_many:
        return run_child_many(*child_many)
    if tiny and base:
        raise click.UsageError("--tiny and --base exclude each other")
    shortcuts = ["--tiny: a small random model, mostly process start-up and loading"] * tiny
    threads = begin(threads, reps, shortcuts)
    MMAP_THRESHOLD[0] = mmap_threshold
    if rows_per_pass is None:
        from qlora_kit.trainer.many import ManyConfig

        rows_per_pass = ManyConfig.__dataclass_fields__["rows_per_pass"].default
    with tempfile.TemporaryDirectory(prefix="bench_train_many_") as tmp:
        root = Path(tmp)
        if tiny:
            base_name, base = "small random Llama (hidden 128, 4 layers, SmolLM2 tokenizer)", _small_model(root / "m")
        else:
            base = Path(base) if base else SMOLLM2
            base_name = str(base)
        settings = _settings(steps, seq, batch, rank)
        shards = _shards(root, n_jobs)
        jobs = _jobs_file(root / "jobs.toml", shards, settings)
        k = [0]

        def fresh(name):
            k[0] += 1
            return root / f"{name}{k[0]}"
        runs = interleave({"train-many": lambda: _many(base, jobs, fresh("many"), threads, rows_per_pass),
                           "sequential": lambda: _sequential(base, shards, settings, fresh("seq"), threads)},
                          reps).samples
        sweep = []
        for n in [int(s) for s in scaling.split(",") if s]:
            r = _many(base, _jobs_file(root / f"jobs{n}.toml", _shards(root, n), settings), fresh(f"many{n}_"),
                      threads, rows_per_pass)
            sweep.append({"jobs": n, **r})
    many, seq_ = runs["train-many"], runs["sequential"]
    med = lambda xs, key: Stats.of([x[key] for x in xs]).median  # noqa: E731
    report = {"base": base_name, "jobs": n_jobs, "settings": settings,
              "threads": threads, "mmap_threshold": mmap_threshold, "rows_per_pass": rows_per_pass,
              "train_many": many, "sequential": seq_,
              "speedup": med(seq_, "wall_s") / med(many, "wall_s"),
              "memory_ratio": med(seq_, "peak_rss_mb") / med(many, "peak_rss_mb"),
              "memory_ratio_concurrent": med(seq_, "sum_peak_rss_mb") / med(many, "peak_rss_mb"),
              "scaling": sweep}
    if as_json:
        click.echo(json.dumps(report))
        end()
        return
    click.echo(f"model: {base_name}")
    click.echo(f"{n_jobs} jobs, {steps} steps each (seq {seq}, batch {batch}, r {rank}), {threads} thread(s), "
               f"MALLOC_MMAP_THRESHOLD_={mmap_threshold or 'default'}, rows per pass {rows_per_pass or 'all'}")
    for i in range(reps):
        click.echo(f"  run {i}: sequential {seq_[i]['wall_s']:.1f} s, train-many {many[i]['wall_s']:.1f} s")
    w = lambda xs, key, d=1: Stats.of([x[key] for x in xs]).fmt(digits=d)  # noqa: E731
    click.echo(f"  sequential qtrain train: {w(seq_, 'wall_s'):>22} s  peak RSS {w(seq_, 'peak_rss_mb', 0)} MiB "
               "(largest run)")
    click.echo(f"  one train-many run:      {w(many, 'wall_s'):>22} s  peak RSS {w(many, 'peak_rss_mb', 0)} MiB")
    click.echo("  " + compare([x["wall_s"] for x in many], [x["wall_s"] for x in seq_]).line(
        "wall time", "train-many", "sequential"))
    click.echo(f"  memory sequential/many {report['memory_ratio']:.2f}x (one at a time), "
               f"{report['memory_ratio_concurrent']:.2f}x if the {n_jobs} runs were side by side (sum of peaks)")
    click.echo("  jobs  wall s  train s   tok/s  peak RSS MiB  s/job")
    for r in sweep:
        click.echo(f"  {r['jobs']:4d}  {r['wall_s']:6.1f}  {r['train_s']:7.1f}  {r['tokens_per_s']:6.0f}  "
                   f"{r['peak_rss_mb']:12.0f}  {r['wall_s'] / r['jobs']:5.2f}")
    if len(sweep) >= 2:
        click.echo(f"  tok/s at {sweep[-1]['jobs']} jobs / at {sweep[0]['jobs']} jobs: "
                   f"{sweep[-1]['tokens_per_s'] / sweep[0]['tokens_per_s']:.2f} (one run each: no spread)")
    end()


if __name__ == "__main__":
    main()
