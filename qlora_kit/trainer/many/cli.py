"""`qtrain train-many`: options generated from ManyConfig's fields; the body parses, runs, and reports."""
import sys

import click
from rich.console import Console

from qlora_kit._cli import cli_errors, dataclass_options

from .. import plot
from ..distributed import from_env
from .jobs import ManyConfig
from .run import train_many as run_train_many

HELP = """Train one LoRA adapter per job of --jobs against --base, loading the base once.

\b
jobs.toml: [defaults] (any `qtrain train` key) and one [[jobs]] table per adapter with a unique
`name`, its `data`, and any keys of its own (r, target_modules, learning_rate, max_steps, seed, ...),
plus early_stop_patience / early_stop_min_delta (evals without eval-loss improvement before stopping).
Each pass through the base mixes rows of every job (per-row adapter index); each job keeps its own
optimizer, schedule, step count, early stop and checkpoints (save_every).
\b
Writes OUT/<job>/ (the `qtrain train` layout: PEFT adapter, train_config.json, metrics.jsonl,
loss_curve.png, checkpoints/) and OUT/summary.json. A job with bad data or a non-finite loss is
reported and skipped, the others finish; the exit code is then 1. After a crash or Ctrl-C, rerun
with --resume: finished jobs are kept, the others continue from their latest checkpoint.
Under torchrun (torchrun --nproc-per-node N -m qlora_kit.trainer train-many ...) jobs are spread over the ranks."""


@cli_errors
def _train_many(**flags):
    run = ManyConfig(**{k: v for k, v in flags.items() if v is not None})
    res = run_train_many(run, console=Console(stderr=True))
    if not from_env().is_main:
        return
    if res.interrupted:
        Console(stderr=True).print(f"stopped: continue with  qtrain train-many ... --out {res.out} --resume")
        sys.exit(130)
    failed = [r["job"] for r in res.jobs if r["status"] == "failed"]
    Console().print(f"wrote {res.out}: {len(res.jobs) - len(failed)}/{len(res.jobs)} jobs trained, "
                    f"{res.tokens_per_s:,.0f} tok/s, peak memory {res.peak_memory_mb:,.0f} MiB; summary.json")
    if not plot.HAS_MATPLOTLIB:
        Console(stderr=True).print(plot.SKIPPED, markup=False, highlight=False, soft_wrap=True)
    if failed:
        Console(stderr=True).print(f"[red]failed jobs:[/red] {', '.join(failed)} (see summary.json)")
        sys.exit(1)


train_many = click.Command("train-many", callback=_train_many, help=HELP,
                           params=dataclass_options(ManyConfig, plain_flags=("resume",)),
                           context_settings={"max_content_width": 110})
