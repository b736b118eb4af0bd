"""`qtrain train`: one adapter, trained as a one-job run of the train-many engine (many/engine.py, many/job.py),
so both commands share one step loop, evaluate, non-finite policy, checkpoint format and metrics writer.

Under torchrun the job's micro-batches are shared over the ranks and its LoRA gradients summed over
them (trainer/distributed.py); rank 0 alone writes. Ctrl-C (SIGINT) finishes the current step, writes a
resumable checkpoint and returns; a second Ctrl-C aborts at once (checkpoint.aborted: a fresh OUT without
a checkpoint is removed, otherwise it stays resumable). A step with a non-finite loss or gradient norm is
not applied: its last good state is saved and NonFiniteTraining raised.
"""
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora_kit.models import Tokenizer

from . import distributed as D
from . import setup
from .checkpoint import aborted
from .config import TrainConfig
from .errors import NonFiniteTraining
from .many.engine import run_jobs
from .many.job import FAILED, JobRun
from .many.jobs import JobSpec

NAME, SLOT = "adapter", 0  # the one job's name (progress notes) and LoRA slot


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step run in this call
    eval_loss: float | None = None
    interrupted: bool = False
    checkpoint: Path | None = None
    tokens_per_s: float = 0.0
    peak_memory_mb: float = 0.0


def train(cfg: TrainConfig, on_step: Callable[[int, float], None] | None = None, console=None) -> TrainResult:
    """Run (or resume) one training run as configured; see `qtrain train --help`.

    `on_step(step, loss)` runs after every optimizer step.

    Raises:
        ConfigError, DataError, OutputExists, ResumeError, and models/formats errors, all before step 1;
        NonFiniteTraining when a step's loss or gradient norm is not finite.
    """
    env = D.from_env()
    setup.pin_threads(cfg.threads)
    device = D.device_for(env, cfg.device)
    with D.process_group(env, device):
        resume_from = setup.check_output(cfg)
        D.barrier(env)  # every rank has checked OUT before rank 0 creates it
        job = JobRun(JobSpec(NAME, cfg), SLOT, writer=env.is_main)
        base = setup.base_folder(cfg.base)
        job.setup(Tokenizer(base), resume=False)
        job.attach(setup.load_base(base, cfg.compute_dtype, device))
        job.resume_from = resume_from
        torch.manual_seed(cfg.seed + env.rank)  # ranks draw different dropout masks; a checkpoint overrides it
        job.restore()
        hook = None if on_step is None else lambda rnd, losses: on_step(job.pos.step, losses[NAME])
        dp = D.DataParallel(env, device) if env.world_size > 1 else None
        try:
            stats = run_jobs(job.model, [job], device, pad_id=job.data.pad_id, checkpointing=cfg.gradient_checkpointing,
                             chunk_size=cfg.loss_chunk_size, dp=dp, progress=cfg.progress and env.is_main,
                             console=console, on_step=hook)
        except KeyboardInterrupt:  # the second Ctrl-C: OUT is left rerunnable or resumable, and the message says which
            raise aborted(Path(cfg.out), fresh=resume_from is None) from None
        D.barrier(env)
    if job.status == FAILED:
        raise NonFiniteTraining(f"{job.error}: lower --learning-rate and continue with --resume {cfg.out}")
    return TrainResult(Path(cfg.out), job.pos.step, job.losses, job.eval_loss, stats["interrupted"], job.checkpoint,
                       stats["tokens_per_s"], stats["peak_memory_mb"])
