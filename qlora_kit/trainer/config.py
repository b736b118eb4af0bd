"""TrainConfig: every knob of one training run, with its default set once, here.

Defaults are the QLoRA paper's recipe (Dettmers et al. 2023, section 4 and appendix B: r 64, alpha 16,
dropout 0.1, LoRA on all linear layers, lr 2e-4, constant schedule, 3% warmup, max grad norm 0.3,
paged AdamW, effective batch 16). A TOML/YAML file (`--config`) overrides them, and CLI flags, generated
from these fields (trainer/cli.py), override the file. Keys are the field names (dashes allowed).
"""
import importlib.util
import json
import math
import os
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from qlora_kit.formats._pattern import FullMatch, PatternError
from qlora_kit.formats.peft import UNTRAINABLE_PEFT_FIELDS, unsupported_peft_field

from .errors import ConfigError

try:
    import yaml

    HAS_YAML = True
except ImportError:
    HAS_YAML = False

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
REPORT_TO = ("none", "tensorboard")


def _f(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """One qtrain run. Raises ConfigError (a ValueError) naming the field on an out-of-range value."""

    # what to train on and where to write
    base: str = _f("", "4-bit checkpoint folder (qconvert convert), a bf16 HF folder (quantized while loading) "
                   "or a Hub id of either (HF cache; HF_HUB_OFFLINE honoured)")
    data: str = _f("", "training data: a JSONL file (rows {\"text\"}, {\"prompt\",\"completion\"}, {\"messages\"} or "
                   "{\"conversations\"}), or with the data extra a .parquet/.json/.csv file, a dataset folder or a "
                   "Hub dataset id (README: Data formats)")
    out: str = _f("", "output folder (must not exist unless --resume): PEFT adapter, config, metrics, checkpoints")
    data_split: str = _f("train", "split of --data when it is a dataset folder or Hub id")
    data_config: str = _f("", "configuration (subset) name of a Hub --data / --eval-data ('' = its default)")
    eval_data: str = _f("", "held-out data for eval loss, same kinds as --data (empty = split --eval-fraction off "
                        "--data)")
    eval_split: str = _f("test", "split of --eval-data when it is a dataset folder or Hub id")
    eval_fraction: float = _f(0.0, "fraction of --data held out for eval loss when --eval-data is not given")
    # data shaping
    assistant_only_loss: bool = _f(True, "conversations: loss only on assistant turns (off: on every token of the "
                                   "rendered conversation)")
    completion_only_loss: bool = _f(True, "prompt/completion rows: loss only on the completion (off: on the prompt "
                                    "too)")
    max_seq_len: int = _f(512, "tokens per row; a longer example is an error unless --truncate")
    truncate: bool = _f(False, "cut examples longer than --max-seq-len instead of failing")
    packing: bool = _f(True, "pack several examples per row (positions reset, attention kept within each example)")
    group_by_length: bool = _f(True, "batch examples of similar length together (less padding)")
    # adapter
    r: int = _f(64, "LoRA rank")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with --use-rslora)")
    lora_dropout: float = _f(0.1, "dropout on the LoRA input")
    target_modules: str | tuple[str, ...] = _f(
        ("all-linear",), "projections to adapt, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
        "down_proj; each matches a module path's end) or all-linear; in a config file a string is a regular "
        "expression matched against the whole module path, as in PEFT")
    exclude_modules: str | tuple[str, ...] = _f((), "modules never adapted: comma-separated names (matching a path's "
                                                "end); in a config file a string is a regular expression (full match)")
    layers_to_transform: tuple[int, ...] = _f((), "adapt only these decoder layers, comma-separated indices (empty = "
                                              "all); needs names, not a regular expression, in target_modules")
    layers_pattern: tuple[str, ...] = _f((), "name of the layer list in module paths for --layers-to-transform "
                                         "(empty = the first numbered path part, e.g. layers)")
    use_rslora: bool = _f(False, "rank-stabilised LoRA: scale = lora_alpha / sqrt(r) instead of lora_alpha / r")
    # optimisation
    learning_rate: float = _f(2e-4, "peak learning rate")
    lr_scheduler: str = _f("constant", "learning-rate schedule after warmup", choices=SCHEDULES)
    warmup_ratio: float = _f(0.03, "fraction of the steps spent warming up linearly")
    warmup_steps: int = _f(0, "warmup steps; overrides --warmup-ratio when > 0")
    max_grad_norm: float = _f(0.3, "clip the global gradient norm to this (0 = no clipping)")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    optimizer: str = _f("paged_adamw", "optimizer (trainer.optim)", choices=OPTIMIZERS)
    gpu_memory_budget_mb: float = _f(-1.0, "paged optimizers: MiB of optimizer state kept on the GPU (-1 = page all)")
    batch_size: int = _f(4, "rows per micro-batch")
    grad_accum: int = _f(4, "micro-batches per optimizer step")
    epochs: int = _f(1, "passes over the data (ignored when --max-steps > 0)")
    max_steps: int = _f(0, "optimizer steps to run (0 = --epochs worth)")
    seed: int = _f(42, "seed for adapter init, data order and dropout")
    # compute
    gradient_checkpointing: bool = _f(True, "recompute each decoder layer in backward instead of keeping activations")
    compute_dtype: str = _f("bfloat16", "activation dtype", choices=DTYPES)
    device: str = _f("auto", "cuda if available, else cpu", choices=DEVICES)
    loss_chunk_size: int = _f(1024, "tokens per chunk of the LM-head cross-entropy (never the full logits)")
    threads: int = _f(0, "CPU intra-op threads (torch.set_num_threads; 0 = torch's default, one per core); "
                      "use 1 when training beside a server on a small CPU so the two do not oversubscribe cores")
    # bookkeeping
    log_every: int = _f(1, "steps between metrics.jsonl lines")
    eval_every: int = _f(0, "steps between eval losses (0 = only at the end)")
    save_every: int = _f(0, "steps between resumable checkpoints (0 = none until the end)")
    stop_after: int = _f(0, "stop with a resumable checkpoint after this many steps of this run (0 = run to the end)")
    resume: str = _f("", "checkpoint folder (or run folder: its latest checkpoint) to continue from")
    progress: bool = _f(True, "live progress display")
    report_to: str = _f("none", "also log loss, lr and eval loss to: tensorboard (event files in OUT/runs/; the "
                        "tensorboard extra)", choices=REPORT_TO)

    def __post_init__(self):
        for name in ("base", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required (--{name} or config key {name})")
        positive = ("max_seq_len", "r", "batch_size", "grad_accum", "epochs", "log_every", "loss_chunk_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1 (--{_flag(name)})")
        nonneg = ("threads", "warmup_steps", "max_steps", "eval_every", "save_every", "stop_after", "max_grad_norm",
                  "weight_decay", "learning_rate", "adam_eps")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 0 (--{_flag(name)})")
        for f in fields(self):  # nan passes every comparison below; inf trains to an all-NaN adapter
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name)):
                raise ConfigError(f"{f.name}={getattr(self, f.name)}: must be a finite number (--{_flag(f.name)})")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed={self.seed}: must be in [0, 2**63) (--seed)")
        for name in ("eval_fraction", "warmup_ratio", "lora_dropout", "adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be in [0, 1) (--{_flag(name)})")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}={getattr(self, f.name)!r}: choose one of {', '.join(choices)} "
                                  f"(--{_flag(f.name)})")
        if not self.target_modules or any(not t for t in self.target_modules):
            raise ConfigError(f"target_modules={list(self.target_modules)}: name at least one projection or all-linear")
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("report_to=tensorboard needs the tensorboard package: pip install 'qlora-kit[tensorboard]' "
                              "(--report-to)")
        if isinstance(self.target_modules, str) and (self.layers_to_transform or self.layers_pattern):
            raise ConfigError(f"target_modules={self.target_modules!r}: a regular expression cannot be combined with "
                              "layers_to_transform/layers_pattern (as in PEFT); give a list of names")
        if self.layers_pattern and not self.layers_to_transform:
            raise ConfigError(f"layers_pattern={list(self.layers_pattern)}: needs --layers-to-transform (as in PEFT)")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.layers_to_transform):
            raise ConfigError(f"layers_to_transform={list(self.layers_to_transform)}: layer indices must be "
                              "integers >= 0 (--layers-to-transform)")
        patterns = [("layers_pattern", p) for p in self.layers_pattern]
        patterns += [(n, getattr(self, n)) for n in ("target_modules", "exclude_modules") if isinstance(getattr(self, n), str)]
        for name, pattern in patterns:
            try:
                FullMatch(pattern)
            except PatternError as e:
                raise ConfigError(f"{name}={pattern!r}: {e} (a regular expression, as in PEFT)") from None

    def to_json(self) -> dict:
        return {k: json_value(v) for k, v in asdict(self).items()}


def json_value(value):
    """A field value as train_config.json holds it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def _flag(name: str) -> str:
    return name.replace("_", "-")


def defaults() -> dict:
    """Field name -> default value (the one place defaults are written is the dataclass above)."""
    return {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse a .toml, .yaml/.yml or .json file into {field: value}; unknown keys are errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            raw = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            if not HAS_YAML:
                raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use a .toml file")
            raw = yaml.safe_load(text) or {}
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config type {suffix!r}; use .toml, .yaml/.yml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    except Exception as e:  # yaml.YAMLError carries the line and column in its text
        if HAS_YAML and isinstance(e, yaml.YAMLError):
            raise ConfigError(f"{path}: {' '.join(str(e).split())}") from None
        raise
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level")
    return _normalise(raw, str(path))


def _normalise(raw: dict, where: str) -> dict:
    known = {f.name: f for f in fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known and name in UNTRAINABLE_PEFT_FIELDS:
            why = unsupported_peft_field(name, value)
            if why:
                raise ConfigError(f"{where}: {why}")
            continue  # a PEFT field at PEFT's default asks for what qtrain does anyway
        if name not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        default = known[name].default
        if name in ("target_modules", "exclude_modules") and isinstance(value, str):
            # PEFT: a string is a regular expression (full match); "all-linear" is its shorthand
            out[name] = (value,) if value == "all-linear" else value
            continue
        if name == "layers_to_transform":
            out[name] = _layers(value, key, where)
            continue
        if name == "layers_pattern" and isinstance(value, str):
            value = [value]
        if isinstance(default, tuple):
            if not isinstance(value, (str, list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: {key}={value!r}: expected a comma-separated string or a list of strings")
            value = tuple(s.strip() for s in value.split(",")) if isinstance(value, str) else tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key}={value!r}: expected true or false")
        elif isinstance(value, bool):
            raise ConfigError(f"{where}: {key}={value!r}: expected a {type(default).__name__}, not true/false")
        elif isinstance(default, float) and isinstance(value, int):
            value = float(value)
        elif not isinstance(value, type(default)):
            raise ConfigError(f"{where}: {key}={value!r}: expected a {type(default).__name__}")
        out[name] = value
    return out


def _layers(value, key: str, where: str) -> tuple[int, ...]:
    """layers_to_transform: an int, a list of ints, or (command line) comma-separated digit strings."""
    items = [value] if isinstance(value, (int, str)) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{where}: {key}={value!r}: expected a layer index or a list of layer indices")
    out = []
    for v in items:
        if isinstance(v, str) and v.strip().isdecimal() and v.strip().isascii():
            v = int(v.strip())
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{where}: {key}={value!r}: expected a layer index or a list of layer indices")
        out.append(v)
    return tuple(out)


def build_config(file: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """Defaults <- config file <- overrides (None values are 'not given' and skipped)."""
    from_file = read_config_file(file) if file else {}
    given = _normalise({k: v for k, v in overrides.items() if v is not None}, "command line")
    try:
        return TrainConfig(**{**from_file, **given})
    except TypeError as e:  # pragma: no cover - _normalise rejects unknown keys first
        raise ConfigError(str(e)) from None
    except ConfigError as e:  # name the file when the bad value came from it
        key = str(e).split("=", 1)[0].split(" ", 1)[0]
        if key in from_file and key not in given:
            raise ConfigError(f"{file}: {e}") from None
        raise


def with_overrides(cfg: TrainConfig, **changes) -> TrainConfig:
    return replace(cfg, **changes)
