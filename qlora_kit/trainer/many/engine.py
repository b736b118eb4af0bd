"""The shared step loop: every round, each running job takes one optimizer step, and their micro-batches
go through the frozen base together.

A round gathers each job's grad_accum micro-batches (job.next_step), orders them micro-batch index
first and groups them into mixed forward passes (mix.group_passes); each pass's loss is
sum_job summed_loss_job / loss_tokens_job, so one backward leaves every adapter exactly its own
gradient. A job whose loss is not finite is left out of the backward and failed; the others go on.
With a DataParallel helper (trainer/distributed.py) the one job's micro-batches are shared across
ranks and DDP all-reduces the LoRA gradients on the round's last pass.
"""
import math
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from ..batching import StepBatch
from ..loop import _StopFlag
from ..metrics import peak_memory_mb
from ..progress import StepProgress
from .job import RUNNING, JobRun
from .mix import Part, PassLoss, group_passes, mix


def _to(mixed, device):
    moved = StepBatch(mixed.batch, mixed.labels, 0, 0).to(device)
    mixed.batch, mixed.labels = moved.batch, moved.labels
    return mixed


def run_jobs(model, jobs: list[JobRun], device, *, pad_id: int, checkpointing: bool, chunk_size: int,
             rows_per_pass: int = 0, dp=None, progress: bool = True, console=None,
             on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train every RUNNING job to its end (or failure / early stop / interruption).

    Returns {"interrupted": bool, "tokens_per_s": float, "peak_memory_mb": float}.
    """
    forward = PassLoss(model, checkpointing, chunk_size)
    if dp is not None:
        forward = dp.wrap(forward, [p for j in jobs if j.status == RUNNING for p in j.params])
    scale = dp.world_size if dp is not None else 1
    running = [j for j in jobs if j.status == RUNNING]
    total = max((j.total for j in running), default=0)
    bar = StepProgress(total, min((j.pos.step for j in running), default=0), progress, console)
    model.train()
    interrupted, tokens, t0, rnd = False, 0, time.perf_counter(), 0
    try:
        with _StopFlag() as stop:
            while True:
                running = [j for j in jobs if j.status == RUNNING]
                for j in running:
                    if stop.set or (j.cfg.stop_after and j.pos.step - j.start_step >= j.cfg.stop_after):
                        j.stop()
                        interrupted = True
                running = [j for j in running if j.status == RUNNING]
                if not running:
                    break
                parts, stepping, t_round = [], [], time.perf_counter()
                for j in running:
                    steps = j.next_step()
                    if steps is None:
                        j.complete()
                        continue
                    stepping.append(j)
                    mine = dp.share(steps) if dp is not None else [(s, 1.0) for s in steps]
                    parts += [Part(j, j.slot, s, i, w) for i, (s, w) in enumerate(mine)]
                parts.sort(key=lambda p: p.micro)
                passes = group_passes(parts, rows_per_pass)
                bad: set[int] = set()
                for n, group in enumerate(passes):
                    mixed = _to(mix(group, pad_id), device)
                    sync = dp.no_sync(forward) if dp is not None and n < len(passes) - 1 else nullcontext()
                    with sync:
                        terms = []
                        for p, loss in zip(group, forward(mixed)):
                            term = loss / p.job.denom
                            value = term.detach().item()
                            p.job.loss_sum += value * p.weight
                            if not math.isfinite(value) and dp is None:
                                bad.add(id(p.job))  # keep NaN/inf out of the shared backward
                                continue
                            terms.append(term * (p.weight * scale))
                        if terms:
                            torch.stack(terms).sum().backward()
                rnd += 1
                seconds = time.perf_counter() - t_round
                losses = {}
                for j in stepping:
                    loss = j.loss_sum if dp is None else dp.all_reduce_sum(j.loss_sum)
                    if id(j) in bad:
                        loss = float("nan") if math.isfinite(loss) else loss
                    tokens += j.step_tokens
                    j.finish_step(loss, device, seconds)
                    losses[j.spec.name] = loss
                finite = [v for v in losses.values() if math.isfinite(v)]
                dt = time.perf_counter() - t0
                bar.update(max((j.pos.step for j in jobs), default=0), sum(finite) / max(len(finite), 1),
                           stepping[0].lr if stepping else 0.0, tokens / max(dt, 1e-9), peak_memory_mb(device))
                for j in stepping:
                    if j.status != RUNNING:
                        why = f" ({j.error})" if j.error else ""
                        bar.note(f"job {j.spec.name}: {j.status} at step {j.pos.step}{why}")
                if on_step is not None:
                    on_step(rnd, losses)
    finally:
        bar.close()
    return {"interrupted": interrupted, "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9),
            "peak_memory_mb": peak_memory_mb(device)}
