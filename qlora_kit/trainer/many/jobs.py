"""jobs.toml for `qtrain train-many`: run-wide settings (ManyConfig) and one TrainConfig per job (JobSpec).

    # qtrain train-many --base CKPT --jobs jobs.toml --out runs/
    [defaults]                 # any qtrain train key, shared by every job (a job's own keys win)
    r = 8
    max_steps = 100

    [[jobs]]
    name = "acme"              # required, unique; the adapter goes to OUT/acme/
    data = "acme.jsonl"        # relative paths are relative to this file
    target_modules = ["q_proj", "v_proj"]
    learning_rate = 1e-4
    early_stop_patience = 2    # stop after 2 evals without improving eval loss by early_stop_min_delta

Settings that fix the one shared forward pass (base, compute_dtype, device, gradient_checkpointing,
loss_chunk_size, progress) are run-wide: flags of train-many, never job keys.
"""
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import tomllib

from ..config import TrainConfig, _f, _normalise, defaults
from ..errors import ConfigError

RUN_KEYS = ("base", "out", "resume", "compute_dtype", "device", "gradient_checkpointing", "loss_chunk_size",
            "progress", "threads")
JOB_ONLY = ("name", "early_stop_patience", "early_stop_min_delta")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TD = defaults()


@dataclass(frozen=True, slots=True)
class ManyConfig:
    """Run-wide settings of one train-many run. Raises ConfigError naming the field."""

    base: str = _f("", "4-bit checkpoint folder (qconvert convert), a bf16 HF folder or a Hub id of either, loaded "
                   "once for all jobs")
    jobs: str = _f("", "jobs file (.toml): [defaults] plus one [[jobs]] table per adapter")
    out: str = _f("", "output folder: OUT/<job>/ per adapter, summary.json (must not exist unless --resume)")
    resume: bool = _f(False, "continue a crashed or stopped run in OUT: finished jobs are kept, the others resume")
    rows_per_pass: int = _f(0, "most rows in one mixed forward pass; 0 (default) = every job's micro-batch together "
                            "(one batched LoRA call for all adapters); a cap only bounds activation memory")
    compute_dtype: str = _f(_TD["compute_dtype"], "activation dtype", choices=("bfloat16", "float16", "float32"))
    device: str = _f(_TD["device"], "cuda if available, else cpu", choices=("auto", "cpu", "cuda"))
    gradient_checkpointing: bool = _f(_TD["gradient_checkpointing"], "recompute each decoder layer in backward")
    loss_chunk_size: int = _f(_TD["loss_chunk_size"], "tokens per chunk of the LM-head cross-entropy")
    progress: bool = _f(True, "live progress display")
    threads: int = _f(_TD["threads"], "CPU intra-op threads (0 = torch's default); 1 beside a server on a small CPU")

    def __post_init__(self):
        for name in ("base", "jobs", "out"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required (--{name})")
        if self.rows_per_pass < 0 or self.loss_chunk_size < 1 or self.threads < 0:
            raise ConfigError(f"rows_per_pass={self.rows_per_pass} and threads={self.threads} must be >= 0 and "
                              f"loss_chunk_size={self.loss_chunk_size} >= 1 (--rows-per-pass, --threads, "
                              "--loss-chunk-size)")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}={getattr(self, f.name)!r}: choose one of {', '.join(choices)}")

    def run_values(self) -> dict:
        """The TrainConfig fields every job inherits from the run."""
        return {k: getattr(self, k) for k in ("base", "compute_dtype", "device", "gradient_checkpointing",
                                              "loss_chunk_size", "threads")}


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One adapter to train: its name, its full TrainConfig (out = OUT/<name>) and early stopping."""

    name: str
    cfg: TrainConfig
    early_stop_patience: int = 0  # evals without improvement before stopping (0 = never)
    early_stop_min_delta: float = 0.0

    def __post_init__(self):
        if not NAME.fullmatch(self.name):
            raise ConfigError(f"job name {self.name!r}: use letters, digits, '_', '.', '-' (it names OUT/<name>/)")
        if self.early_stop_patience < 0 or self.early_stop_min_delta < 0:
            raise ConfigError(f"job {self.name}: early_stop_patience and early_stop_min_delta must be >= 0")
        if self.early_stop_patience and not (self.cfg.eval_data or self.cfg.eval_fraction > 0):
            raise ConfigError(f"job {self.name}: early_stop_patience needs an eval set (eval_data or eval_fraction)")
        if self.early_stop_patience and not self.cfg.eval_every:
            raise ConfigError(f"job {self.name}: early_stop_patience needs eval_every > 0")


def _job_values(raw: dict, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table of settings")
    bad = sorted(k for k in raw if str(k).replace("-", "_") in RUN_KEYS)
    if bad:
        raise ConfigError(f"{where}: {', '.join(bad)} is run-wide; pass it as a train-many flag, not a job key")
    return raw


def load_jobs(run: ManyConfig) -> list[JobSpec]:
    """Parse run.jobs into JobSpecs (out = run.out/<name>); every error names the file and job.

    Raises:
        ConfigError: unreadable TOML, unknown keys, bad values, duplicate or missing names, no jobs.
    """
    path = Path(run.jobs)
    if not path.is_file():
        raise ConfigError(f"{path}: jobs file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    extra = sorted(set(raw) - {"defaults", "jobs"})
    if extra:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(extra)}; use [defaults] and [[jobs]]")
    shared = _job_values(raw.get("defaults", {}), f"{path} [defaults]")
    jobs = raw.get("jobs", [])
    if not isinstance(jobs, list) or not jobs:
        raise ConfigError(f"{path}: no jobs; add one [[jobs]] table per adapter")
    specs, seen = [], set()
    for i, job in enumerate(jobs):
        name = job.get("name") if isinstance(job, dict) else None
        if not isinstance(name, str):
            raise ConfigError(f"{path} jobs[{i}]: name is required (a string)")
        where = f"{path} job {name!r}"
        values = {**shared, **_job_values(job, where)}
        values.pop("name")
        if name in seen:
            raise ConfigError(f"{where}: duplicate job name")
        seen.add(name)
        stop = {k: values.pop(k) for k in JOB_ONLY[1:] if k in values}
        for key in ("data", "eval_data"):
            if isinstance(values.get(key), str) and values[key] and not os.path.isabs(values[key]):
                values[key] = str(path.parent / values[key])
        values = _normalise(values, where)
        try:
            cfg = TrainConfig(**{**values, **run.run_values(), "out": str(Path(run.out) / name), "progress": False})
            specs.append(JobSpec(name, cfg, int(stop.get("early_stop_patience", 0)),
                                 float(stop.get("early_stop_min_delta", 0.0))))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    return specs
