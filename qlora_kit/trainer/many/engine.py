"""The step loop of every training run (`qtrain train` is a one-job run): every round, each running job
takes one optimizer step, and their micro-batches go through the frozen base together.

A round gathers each job's grad_accum micro-batches (job.next_step), orders them micro-batch index
first and groups them into mixed forward passes (mix.group_passes); each pass's loss is
sum_job summed_loss_job / loss_tokens_job, so one backward leaves every adapter exactly its own
gradient. A job whose loss is not finite is left out of the backward and failed (job.finish_step);
the others go on. With a DataParallel helper (trainer/distributed.py) the one job's micro-batches are
shared across ranks, and its LoRA gradients are summed over them after the round's last pass.
Ctrl-C (SIGINT) lets the round finish, then every running job writes a resumable checkpoint
(job.stop); a second Ctrl-C raises KeyboardInterrupt at once.
"""
import math
import signal
import threading
import time
from collections.abc import Callable

import torch

from ..metrics import peak_memory_mb
from ..progress import StepProgress
from .job import RUNNING, JobRun
from .mix import Part, group_passes, mix, part_losses


class _StopFlag:
    """First SIGINT asks the loop to stop at the next step boundary; a second one raises KeyboardInterrupt."""

    def __init__(self):
        self.set, self._old = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def run_jobs(model, jobs: list[JobRun], device, *, pad_id: int, checkpointing: bool, chunk_size: int,
             rows_per_pass: int = 0, dp=None, progress: bool = True, console=None,
             on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train every RUNNING job to its end (or failure / early stop / interruption).

    `on_step(round, {job name: step loss})` runs after each round in which some job took a step.
    Returns {"interrupted": bool, "tokens_per_s": float, "peak_memory_mb": float}.
    """
    running = [j for j in jobs if j.status == RUNNING]
    total = max((j.total for j in running), default=0)
    bar = StepProgress(total, min((j.pos.step for j in running), default=0), progress, console)
    for j in running:
        if j.resume_from is not None:
            bar.note(f"job {j.spec.name}: resumed from {j.resume_from} at step {j.pos.step}")
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
                    mine = dp.share(steps) if dp is not None else steps
                    parts += [Part(j, s, i) for i, s in enumerate(mine)]
                if not stepping:
                    continue
                parts.sort(key=lambda p: p.micro)
                bad: set[int] = set()
                for group in group_passes(parts, rows_per_pass):
                    step, rows = mix(group, pad_id)
                    terms = []
                    for p, loss in zip(group, part_losses(model, step.to(device), rows, checkpointing, chunk_size)):
                        term = loss / p.job.denom
                        value = term.detach().item()
                        p.job.loss_sum += value
                        if not math.isfinite(value):
                            bad.add(id(p.job))  # keep NaN/inf out of the shared backward
                            continue
                        terms.append(term)
                    if terms:
                        torch.stack(terms).sum().backward()
                if dp is not None:
                    dp.reduce_grads([p for j in stepping for p in j.params])
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
                           stepping[0].lr, tokens / max(dt, 1e-9), peak_memory_mb(device))
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
