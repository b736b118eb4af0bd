"""Resumable checkpoints: adapter, optimizer, RNG and data position in one atomic folder, no pickle.

    <out>/checkpoints/step-000050/
        adapter_config.json, adapter_model.safetensors   the adapter (PEFT layout; loadable on its own)
        optimizer.safetensors                             every optimizer state tensor, key "<param>.<name>"
        trainer_state.json                                step, data position, optimizer scalars, Python RNG,
                                                          the run's config
        rng.safetensors                                   torch CPU (and CUDA) generator states

The LR schedule is a pure function of the step (trainer/schedule.py), so the step is its whole state.
"""
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit.formats import atomic_dir, load_safetensors, save_safetensors, write_json
from qlora_kit.formats.peft import CONFIG_NAME, WEIGHTS_NAME, LoraConfig, load_adapter, lora_pairs
from qlora_kit.models import Llama, adapter_state

from .errors import ResumeError

STATE_NAME = "trainer_state.json"
OPTIM_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
PREFIX = "step-"


@dataclass(frozen=True, slots=True)
class Position:
    """Where training stands: optimizer steps done, and the next micro-batch (epoch, index in epoch)."""

    step: int
    epoch: int
    micro: int


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"{PREFIX}{step:06d}"


def save_checkpoint(out: Path, model: Llama, adapter_id: int, lora: LoraConfig, optimizer, pos: Position,
                    config: dict) -> Path:
    """Write checkpoints/step-N atomically (replacing an older copy of the same step) and return its path."""
    path = checkpoint_dir(out, pos.step)
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"step": pos.step, "epoch": pos.epoch, "micro": pos.micro, "optimizer_scalars": scalars,
            "param_groups": state["param_groups"], "python_random": _py_state(), "config": config}
    with atomic_dir(path, overwrite=True) as tmp:
        write_json(tmp / CONFIG_NAME, lora.to_json())
        save_safetensors(adapter_state(model, adapter_id), tmp / WEIGHTS_NAME)
        save_safetensors(tensors or {"_empty": torch.zeros(0)}, tmp / OPTIM_NAME)
        save_safetensors(rng, tmp / RNG_NAME)
        write_json(tmp / STATE_NAME, meta)
    return path


def _py_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder as given, or the latest checkpoints/step-N inside a run folder."""
    path = Path(path)
    if (path / STATE_NAME).is_file():
        return path
    steps = sorted((path / "checkpoints").glob(f"{PREFIX}*")) if path.is_dir() else []
    steps = [s for s in steps if (s / STATE_NAME).is_file()]
    if not steps:
        raise ResumeError(f"{path}: no resumable checkpoint here (expected {STATE_NAME} or checkpoints/{PREFIX}N/)")
    return steps[-1]


def load_checkpoint(path: Path, model: Llama, adapter_id: int, optimizer) -> tuple[Position, dict]:
    """Restore adapter weights, optimizer and RNG in place; return the position and the saved config."""
    try:
        meta = json.loads((path / STATE_NAME).read_text())
        _, tensors = load_adapter(path)
        optim_tensors = load_safetensors(path / OPTIM_NAME)
        rng = load_safetensors(path / RNG_NAME)
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeError(f"{path}: incomplete checkpoint ({e})") from None
    layers = model.lora_layers()
    with torch.no_grad():
        for module, (a, b) in lora_pairs(tensors, str(path / WEIGHTS_NAME)).items():
            if module not in layers or str(adapter_id) not in layers[module].lora_a:
                raise ResumeError(f"{path}: module {module} is not adapted in this run (different target_modules?)")
            for mine, saved in ((layers[module].lora_a[str(adapter_id)], a), (layers[module].lora_b[str(adapter_id)], b)):
                if mine.shape != saved.shape:
                    raise ResumeError(f"{path}: {module}: saved {tuple(saved.shape)} != {tuple(mine.shape)} "
                                      "(different r?)")
                mine.copy_(saved)
    state: dict = {}
    for key, t in optim_tensors.items():
        if key != "_empty":
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = t
    for key, v in meta["optimizer_scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise ResumeError(f"{path}: optimizer state does not fit this run: {e}") from None
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return Position(meta["step"], meta["epoch"], meta["micro"]), meta["config"]


def non_finite(loss: float, grad_norm: float) -> str | None:
    """The one non-finite policy's test: what is wrong with a step, or None when its loss and norm are finite."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    return None


def aborted(out: Path, fresh: bool) -> KeyboardInterrupt:
    """A run aborted at once (second Ctrl-C): leave OUT rerunnable or resumable and say which.

    A fresh run (OUT made by it) with no checkpoint yet could be neither rerun (OUT exists) nor resumed,
    so it is removed; otherwise OUT stays and the message names --resume.
    """
    out = Path(out)
    kept = any(out.rglob(f"checkpoints/{PREFIX}*/{STATE_NAME}")) if out.is_dir() else False
    if fresh and not kept:
        shutil.rmtree(out, ignore_errors=True)
        return KeyboardInterrupt(f"aborted: no output was left behind ({out} removed: it held no checkpoint yet)")
    return KeyboardInterrupt(f"aborted: {out} kept; continue from its latest checkpoint with --resume {out}")
