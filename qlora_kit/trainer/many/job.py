"""One adapter's life inside a training run: setup, one optimizer step at a time, eval, early stop, outputs.

Every run trains its adapters as JobRuns (`qtrain train` is a one-job run, trainer/loop.py). One optimizer
step = grad_accum micro-batches of the job's seeded stream (micro_batches); its loss is the mean over all
of its loss tokens (each micro-batch's summed loss is divided by the step's token count before backward),
so the result does not depend on how tokens fall into micro-batches or passes. The engine
(many/engine.py) runs the forward and backward of many jobs together; the job clips, updates, logs
(metrics.MetricsLog), evaluates, checkpoints (checkpoint.save/load_checkpoint) and writes its outputs.
A step with a non-finite loss or gradient norm is not applied: the last good state is saved as a
checkpoint and the job fails (checkpoint.non_finite).
"""
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from qlora_kit.formats import save_safetensors, write_json
from qlora_kit.formats.peft import CONFIG_NAME, WEIGHTS_NAME
from qlora_kit.models import Tokenizer, adapter_state, remove_adapter

from .. import setup
from ..batching import StepBatch, collate, plan_epoch
from ..checkpoint import Position, find_checkpoint, load_checkpoint, non_finite, save_checkpoint
from ..config import TrainConfig
from ..errors import ResumeError
from ..metrics import METRICS_NAME, MetricsLog, peak_memory_mb
from ..plot import write_loss_curve
from ..schedule import lr_at, warmup_steps
from .jobs import JobSpec
from .mix import part_losses

RUNNING, DONE, EARLY, STOPPED, FAILED = "running", "done", "early_stopped", "stopped", "failed"
CONFIG_USED = "train_config.json"
LOSS_CURVE = "loss_curve.png"


def micro_batches(cfg: TrainConfig, data: setup.Data, pos: Position, slot: int) -> Iterator[tuple[Position, StepBatch]]:
    """Micro-batches (rows tagged `slot`) from `pos` on, each with the position that follows it; epochs repeat
    with max_steps."""
    lengths = [len(e) for e in data.train]
    epoch, micro = pos.epoch, pos.micro
    while cfg.max_steps or epoch < cfg.epochs:
        plan = plan_epoch(lengths, epoch, cfg.seed, cfg.batch_size, cfg.max_seq_len, cfg.packing, cfg.group_by_length)
        for i in range(micro, len(plan)):
            nxt = (epoch, i + 1) if i + 1 < len(plan) else (epoch + 1, 0)
            yield Position(0, *nxt), collate(plan[i], data.train, data.pad_id, cfg.packing, slot)
        epoch, micro = epoch + 1, 0


class JobRun:
    """Training state of one job (adapter slot `slot`); `writer` is False on ranks that only help compute it."""

    def __init__(self, spec: JobSpec, slot: int, writer: bool = True):
        self.spec, self.cfg, self.slot, self.writer = spec, spec.cfg, slot, writer
        self.out = Path(spec.cfg.out)
        self.status, self.error = RUNNING, ""
        self.losses: list[float] = []
        self.eval_loss: float | None = None
        self.best_eval, self.bad_evals = math.inf, 0
        self.tokens = 0
        self.total = 0
        self.pos = Position(0, 0, 0)
        self.start_step = 0
        self.checkpoint: Path | None = None
        self.resume_from: Path | None = None
        self.model = self.optimizer = self.log = None

    # ---- setup -----------------------------------------------------------------------------------------
    def setup(self, tok: Tokenizer, resume: bool) -> None:
        """Read the job's data (every line, before the model is touched); a finished job (adapter written) is
        only summarized. With `resume`, the job continues from its latest checkpoint if it has one.

        Raises TrainError/QloraKitError subclasses for bad data or settings.
        """
        if resume and (self.out / WEIGHTS_NAME).is_file():
            self._load_finished()
            return
        if resume:
            try:
                self.resume_from = find_checkpoint(self.out)
            except ResumeError:
                self.resume_from = None
        self.data = setup.load_data(self.cfg, tok)
        self.total = setup.total_steps(self.cfg, self.data)
        self.warmup = warmup_steps(self.total, self.cfg.warmup_ratio, self.cfg.warmup_steps)

    def attach(self, model) -> None:
        """Attach the job's fresh adapter to `model` in its slot, and its optimizer (a finished job: nothing)."""
        if self.status != RUNNING:
            return
        setup.check_context(model, self.cfg)
        self.model = model
        self.lora, self.params = setup.attach_adapter(model, self.cfg, self.slot)
        self.optimizer = setup.build_optimizer(self.params, self.cfg)

    def restore(self) -> None:
        """Load the job's checkpoint (if resuming), open its metrics log and data stream. Call after seeding."""
        if self.status != RUNNING:
            return
        if self.resume_from is not None:
            self.pos, saved = load_checkpoint(self.resume_from, self.model, self.slot, self.optimizer)
            setup.check_resume_config(saved, self.cfg, self.resume_from)
        self.start_step = self.pos.step
        if self.writer:
            self.out.mkdir(parents=True, exist_ok=True)
            if not (self.out / CONFIG_USED).exists():
                write_json(self.out / CONFIG_USED, self.cfg.to_json())
            self.log = MetricsLog(self.out, self.pos.step, tensorboard=self.cfg.report_to == "tensorboard")
        self.stream = micro_batches(self.cfg, self.data, self.pos, self.slot)
        if self.pos.step >= self.total:
            self.complete()

    def _load_finished(self) -> None:
        self.status = DONE
        path = self.out / METRICS_NAME
        rows = [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.is_file() else []
        self.losses = [r["loss"] for r in rows if "loss" in r]
        evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
        self.eval_loss = evals[-1] if evals else None
        self.pos = Position(len(self.losses), 0, 0)
        self.total = self.start_step = self.pos.step

    # ---- one optimizer step ----------------------------------------------------------------------------
    def next_step(self) -> list | None:
        """This step's micro-batches (lr set, loss token count known), or None when the data ran out."""
        if self.pos.step >= self.total:
            return None
        pulled = [b for _, b in zip(range(self.cfg.grad_accum), self.stream)]
        if not pulled:
            return None
        self._next = pulled[-1][0]
        steps = [b for _, b in pulled]
        self.denom = sum(s.num_loss_tokens for s in steps)
        self.step_tokens = sum(s.num_tokens for s in steps)
        self.lr = lr_at(self.pos.step, self.cfg.learning_rate, self.total, self.warmup, self.cfg.lr_scheduler)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.loss_sum = 0.0
        return steps

    def finish_step(self, loss: float, device, seconds: float = 0.0) -> None:
        """Clip, update, log, eval / early-stop, checkpoint; a non-finite loss or gradient fails the job.

        `seconds` is the round's wall time (shared by every job in it), so tokens_per_s is this job's share.
        """
        n = self.pos.step + 1
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm)) if math.isfinite(loss) else math.nan
        bad = non_finite(loss, norm)
        if bad is not None:  # not applied: the last good state is kept, this job stops
            self.optimizer.zero_grad(set_to_none=True)
            self.save()
            kept = f", the last good state (step {self.pos.step}) is kept at {self.checkpoint}" if self.checkpoint else ""
            return self.fail(f"step {n}: {bad}; training stopped{kept}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pos = Position(n, self._next.epoch, self._next.micro)
        self.losses.append(loss)
        self.tokens += self.step_tokens
        if self.log is not None and (n % self.cfg.log_every == 0 or n == self.total):
            self.log.write({"step": n, "loss": loss, "lr": self.lr, "grad_norm": norm, "tokens": self.step_tokens,
                            "tokens_per_s": self.step_tokens / max(seconds, 1e-9),
                            "peak_memory_mb": peak_memory_mb(device)})
        if self.data.eval and self.cfg.eval_every and n % self.cfg.eval_every == 0 and n < self.total:
            self._eval(device)
            if self.status == EARLY:
                return self.complete(evaluated=True)
        if self.cfg.save_every and n % self.cfg.save_every == 0 and n < self.total:
            self.save()
        if n >= self.total:
            self.complete()

    def _eval(self, device) -> None:
        self.eval_loss = evaluate(self.model, self.cfg, self.data, self.slot, device)
        if self.log is not None:
            self.log.write({"step": self.pos.step, "eval_loss": self.eval_loss})
        if self.eval_loss < self.best_eval - self.spec.early_stop_min_delta:
            self.best_eval, self.bad_evals = self.eval_loss, 0
        else:
            self.bad_evals += 1
            if self.spec.early_stop_patience and self.bad_evals >= self.spec.early_stop_patience:
                self.status = EARLY

    # ---- endings ---------------------------------------------------------------------------------------
    def save(self) -> None:
        if self.writer:
            self.checkpoint = save_checkpoint(self.out, self.model, self.slot, self.lora, self.optimizer, self.pos,
                                              self.cfg.to_json())

    def stop(self) -> None:
        """Interrupted (Ctrl-C or stop_after): write a resumable checkpoint; the adapter stays loaded."""
        self.save()
        self.status = STOPPED

    def complete(self, evaluated: bool = False) -> None:
        """Final eval, PEFT adapter, loss curve; then free the slot."""
        if self.data.eval and not evaluated:
            self._eval(self.model.model.embed_tokens.weight.device)
        if self.status == RUNNING:
            self.status = DONE
        if self.writer:
            write_json(self.out / CONFIG_NAME, self.lora.to_json())
            save_safetensors(adapter_state(self.model, self.slot), self.out / WEIGHTS_NAME)
            write_loss_curve(self.out / LOSS_CURVE, self.log.series("loss"), self.log.series("eval_loss"))
        self._release()

    def fail(self, message: str) -> None:
        self.status, self.error = FAILED, message
        self._release()

    def _release(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.model is not None:
            remove_adapter(self.model, self.slot)
        self.optimizer = self.params = None

    def summary(self) -> dict:
        return {"job": self.spec.name, "status": self.status, "steps": self.pos.step, "total_steps": self.total,
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None, "eval_loss": self.eval_loss,
                "tokens": self.tokens, "error": self.error, "out": str(self.out)}


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, data: setup.Data, slot: int, device) -> float:
    """Mean token loss of adapter `slot` over the job's eval examples (dropout off)."""
    was_training = model.training
    model.eval()
    plan = plan_epoch([len(e) for e in data.eval], 0, cfg.seed, cfg.batch_size, cfg.max_seq_len, cfg.packing, False)
    total, count = 0.0, 0
    for rows in plan:
        mb = collate(rows, data.eval, data.pad_id, cfg.packing, slot).to(device)
        total += float(part_losses(model, mb, [slice(None)], False, cfg.loss_chunk_size)[0])
        count += mb.num_loss_tokens
    model.train(was_training)
    return total / max(count, 1)
