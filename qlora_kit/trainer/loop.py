"""The training loop: grad accumulation over token-weighted micro-batches, clipping, schedule, eval,
checkpoints, resume and Ctrl-C.

One optimizer step = grad_accum micro-batches; its loss is the mean over all of its loss tokens
(each micro-batch's summed loss is divided by the step's token count before backward), so the
result does not depend on how tokens fall into micro-batches. Ctrl-C (SIGINT) finishes the current
step, writes a resumable checkpoint and returns; a second Ctrl-C aborts at once (checkpoint.aborted: a fresh
OUT without a checkpoint is removed, otherwise it stays resumable). A step with a non-finite loss or gradient
norm is not applied: its last good state is saved and NonFiniteTraining raised (checkpoint.non_finite).
"""
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora_kit.formats import save_safetensors, write_json
from qlora_kit.formats.peft import CONFIG_NAME, WEIGHTS_NAME
from qlora_kit.models import Tokenizer, adapter_state

from . import setup
from .batching import StepBatch, collate, plan_epoch
from .checkpoint import Position, aborted, load_checkpoint, non_finite, save_checkpoint
from .config import TrainConfig
from .errors import NonFiniteTraining
from .forward import summed_loss
from .metrics import MetricsLog, peak_memory_mb
from .plot import write_loss_curve
from .progress import StepProgress
from .schedule import lr_at, warmup_steps

CONFIG_USED = "train_config.json"
LOSS_CURVE = "loss_curve.png"


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


def micro_batches(cfg: TrainConfig, data: setup.Data, pos: Position) -> Iterator[tuple[Position, StepBatch]]:
    """Micro-batches from `pos` on, each with the position that follows it; epochs repeat with max_steps."""
    lengths = [len(e) for e in data.train]
    epoch, micro = pos.epoch, pos.micro
    while cfg.max_steps or epoch < cfg.epochs:
        plan = plan_epoch(lengths, epoch, cfg.seed, cfg.batch_size, cfg.max_seq_len, cfg.packing, cfg.group_by_length)
        for i in range(micro, len(plan)):
            nxt = (epoch, i + 1) if i + 1 < len(plan) else (epoch + 1, 0)
            yield Position(0, *nxt), collate(plan[i], data.train, data.pad_id, cfg.packing)
        epoch, micro = epoch + 1, 0


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, data: setup.Data, device) -> float:
    """Mean token loss over the eval examples (dropout off)."""
    was_training = model.training
    model.eval()
    plan = plan_epoch([len(e) for e in data.eval], 0, cfg.seed, cfg.batch_size, cfg.max_seq_len, cfg.packing, False)
    total, count = 0.0, 0
    for rows in plan:
        mb = collate(rows, data.eval, data.pad_id, cfg.packing).to(device)
        total += float(summed_loss(model, mb, False, cfg.loss_chunk_size))
        count += mb.num_loss_tokens
    model.train(was_training)
    return total / max(count, 1)


def train(cfg: TrainConfig, on_step: Callable[[int, float], None] | None = None, console=None) -> TrainResult:
    """Run (or resume) one training run as configured; see trainer/README in `qtrain train --help`.

    Raises:
        ConfigError, DataError, OutputExists, ResumeError, and models/formats errors, all before step 1.
    """
    resume_from = setup.check_output(cfg)
    setup.pin_threads(cfg.threads)
    device = setup.resolve_device(cfg)
    data = setup.load_data(cfg, Tokenizer(cfg.base))
    model = setup.load_base(cfg, device)
    lora, params = setup.attach_adapter(model, cfg)
    optimizer = setup.build_optimizer(params, cfg)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    pos = Position(0, 0, 0)
    if resume_from is not None:
        pos, saved = load_checkpoint(resume_from, model, setup.ADAPTER_ID, optimizer)
        setup.check_resume_config(saved, cfg, resume_from)
    if not (out / CONFIG_USED).exists():
        out.mkdir(parents=True, exist_ok=resume_from is not None)
        write_json(out / CONFIG_USED, cfg.to_json())
    total = setup.total_steps(cfg, data)
    warmup = warmup_steps(total, cfg.warmup_ratio, cfg.warmup_steps)
    log = MetricsLog(out, pos.step if resume_from is not None else None)
    bar = StepProgress(total, pos.step, cfg.progress, console)
    if resume_from is not None:
        bar.note(f"resumed from {resume_from} at step {pos.step}")
    result = TrainResult(out, pos.step)
    stream = micro_batches(cfg, data, pos)
    model.train()
    t_run, tok_run, start = time.perf_counter(), 0, pos.step
    try:
        with _StopFlag() as stop:
            for step in range(pos.step, total):
                if stop.set or (cfg.stop_after and step - start >= cfg.stop_after):
                    result.interrupted = True
                    break
                t0 = time.perf_counter()
                batch = [b for _, b in zip(range(cfg.grad_accum), stream)]
                if not batch:
                    break
                nxt = batch[-1][0]
                steps = [b for _, b in batch]
                denom = sum(s.num_loss_tokens for s in steps)
                lr = lr_at(step, cfg.learning_rate, total, warmup, cfg.lr_scheduler)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for s in steps:
                    loss = summed_loss(model, s.to(device), cfg.gradient_checkpointing, cfg.loss_chunk_size) / denom
                    loss.backward()
                    loss_sum += loss.detach().item()
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
                bad = non_finite(loss_sum, float(norm))
                if bad is not None:  # not applied: keep the last good state and stop (as a train-many job does)
                    optimizer.zero_grad(set_to_none=True)
                    kept = save_checkpoint(out, model, setup.ADAPTER_ID, lora, optimizer, pos, cfg.to_json())
                    raise NonFiniteTraining(f"step {step + 1}: {bad}; training stopped, the last good state "
                                            f"(step {pos.step}) is kept at {kept}: lower --learning-rate and "
                                            f"continue with --resume {out}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                pos = Position(step + 1, nxt.epoch, nxt.micro)
                dt = time.perf_counter() - t0
                ntok = sum(s.num_tokens for s in steps)
                tok_run += ntok
                mem = peak_memory_mb(device)
                result.losses.append(loss_sum)
                result.steps = step + 1
                if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                    log.write({"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": float(norm),
                               "tokens": ntok, "tokens_per_s": ntok / dt, "peak_memory_mb": mem})
                bar.update(step + 1, loss_sum, lr, ntok / dt, mem)
                if on_step is not None:
                    on_step(step + 1, loss_sum)
                if data.eval and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
                    log.write({"step": step + 1, "eval_loss": evaluate(model, cfg, data, device)})
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                    save_checkpoint(out, model, setup.ADAPTER_ID, lora, optimizer, pos, cfg.to_json())
    except KeyboardInterrupt:  # the second Ctrl-C: OUT is left rerunnable or resumable, and the message says which
        raise aborted(out, fresh=resume_from is None) from None
    finally:
        bar.close()
    result.tokens_per_s = tok_run / max(time.perf_counter() - t_run, 1e-9)
    result.peak_memory_mb = peak_memory_mb(device)
    if result.interrupted:
        result.checkpoint = save_checkpoint(out, model, setup.ADAPTER_ID, lora, optimizer, pos, cfg.to_json())
        bar.note(f"stopped at step {pos.step}/{total}; resume with --resume {out}")
        return result
    if data.eval:
        result.eval_loss = evaluate(model, cfg, data, device)
        log.write({"step": result.steps, "eval_loss": result.eval_loss})
    write_json(out / CONFIG_NAME, lora.to_json())
    save_safetensors(adapter_state(model, setup.ADAPTER_ID), out / WEIGHTS_NAME)
    write_loss_curve(out / LOSS_CURVE, log.series("loss"), log.series("eval_loss"))
    return result
