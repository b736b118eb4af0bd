"""train_many: N adapters against one base in one run, optionally sharded over torchrun ranks (many/engine.py)."""
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from qlora_kit.formats.errors import QloraKitError
from qlora_kit.models import Tokenizer

from .. import distributed as D
from .. import setup
from ..checkpoint import aborted
from ..errors import OutputExists, ResumeError
from .engine import run_jobs
from .job import RUNNING, JobRun
from .jobs import ManyConfig, load_jobs
from .summary import render, write_summary


@dataclass
class ManyResult:
    out: Path
    jobs: list[dict] = field(default_factory=list)  # summary rows, in jobs-file order
    interrupted: bool = False
    tokens_per_s: float = 0.0
    peak_memory_mb: float = 0.0


def _start(jobs: list[JobRun], model, tok, resume: bool, seed: int) -> None:
    """Set every job up (a job with bad data or settings is failed, not fatal), seed, then restore checkpoints."""
    for j in jobs:
        try:
            j.setup(tok, resume)
            j.attach(model)
        except QloraKitError as e:
            j.fail(str(e))
    torch.manual_seed(seed)  # as trainer.train: dropout RNG starts from the seed, a checkpoint overrides it
    for j in jobs:
        try:
            j.restore()
        except ResumeError as e:
            j.fail(str(e))


def train_many(run: ManyConfig, on_step: Callable[[int, dict], None] | None = None, console=None) -> ManyResult:
    """Train every job of run.jobs against run.base in one process (or sharded over torchrun ranks).

    Raises:
        ConfigError (jobs file), OutputExists, ResumeError, models errors for the base. Per-job data or
        NaN failures are not raised: they are rows with status "failed".
    """
    specs = load_jobs(run)
    out = Path(run.out)
    if not run.resume and out.exists():
        raise OutputExists(f"{out}: output folder already exists; choose another --out, or continue that run with "
                           f"--resume")
    if run.resume and not out.is_dir():
        raise ResumeError(f"{out}: nothing to resume (folder not found)")
    env = D.from_env()
    setup.pin_threads(run.threads)
    device = D.device_for(env, run.device)
    with D.process_group(env, device):
        D.barrier(env)  # every rank has checked OUT before rank 0 creates it
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
        D.barrier(env)
        base = setup.base_folder(run.base)
        tok = Tokenizer(base)
        model = setup.load_base(base, run.compute_dtype, device)
        jobs = [JobRun(s, slot) for slot, s in D.shard(list(enumerate(specs)), env)]
        _start(jobs, model, tok, run.resume, specs[0].cfg.seed)
        pad = next((j.data.pad_id for j in jobs if j.status == RUNNING), tok.pad_token_id)
        try:
            stats = run_jobs(model, jobs, device, pad_id=pad, checkpointing=run.gradient_checkpointing,
                             chunk_size=run.loss_chunk_size, rows_per_pass=run.rows_per_pass,
                             progress=run.progress and env.is_main, console=console, on_step=on_step)
        except KeyboardInterrupt:  # second Ctrl-C: as trainer.train, OUT left rerunnable or resumable
            raise aborted(out, fresh=not run.resume) from None
        order = {s.name: i for i, s in enumerate(specs)}
        rows = sorted(D.gather_rows([j.summary() for j in jobs], env), key=lambda r: order[r["job"]])
        stopped = D.gather_rows([stats["interrupted"]], env)
        result = ManyResult(out, rows, any(stopped), stats["tokens_per_s"], stats["peak_memory_mb"])
        if env.is_main:
            write_summary(out, rows, {"base": run.base, "jobs": run.jobs, "world_size": env.world_size,
                                      "tokens_per_s": result.tokens_per_s, "peak_memory_mb": result.peak_memory_mb})
            if run.progress:
                render(rows, console or Console(stderr=True))
        D.barrier(env)
    return result

