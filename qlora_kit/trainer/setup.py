"""Everything a run needs before its first step, checked in the order that fails fastest:
config -> output folder -> tokenizer and data (every line) -> model -> context length, adapter targets -> optimizer."""
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from qlora_kit._cli.hub import resolve_checkpoint
from qlora_kit.formats.errors import AdapterFormatError
from qlora_kit.formats.peft import LoraConfig
from qlora_kit.models import AdapterError, Llama, Tokenizer, adapter_params, add_adapter, load_model

from .batching import plan_epoch
from .checkpoint import find_checkpoint
from .config import TrainConfig, json_value
from .data import Example, LossMask, load_examples, split_eval
from .errors import ConfigError, OutputExists, ResumeError
from .optim import AdamW

ALL_LINEAR = "all-linear"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# fields that must match between a checkpoint and the run resuming it (they fix the data stream or shapes)
RESUME_KEYS = ("data", "seed", "batch_size", "grad_accum", "max_seq_len", "packing", "group_by_length", "truncate",
               "epochs", "max_steps", "r", "lora_alpha", "target_modules", "optimizer", "eval_fraction", "eval_data",
               "data_split", "data_config", "eval_split", "assistant_only_loss", "completion_only_loss",
               "exclude_modules", "layers_to_transform", "layers_pattern", "use_rslora")


@dataclass
class Data:
    train: list[Example]
    eval: list[Example]
    pad_id: int


def pin_threads(n: int) -> None:
    """TrainConfig.threads: intra-op CPU threads of this process (0 keeps torch's default)."""
    if n:
        torch.set_num_threads(n)


def check_output(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run into a folder that must not exist yet."""
    out = Path(cfg.out)
    if cfg.resume:
        return find_checkpoint(cfg.resume)
    if out.exists():
        raise OutputExists(f"{out}: output folder already exists; choose another --out, or continue that run with "
                           f"--resume {out}")
    return None


def check_resume_config(saved: dict, cfg: TrainConfig, where: Path) -> None:
    now = cfg.to_json()
    # a key an older checkpoint lacks had its default then
    unset = {f.name: json_value(f.default) for f in fields(TrainConfig)}
    for key in RESUME_KEYS:
        if saved.get(key, unset[key]) != now.get(key):
            raise ResumeError(f"{where}: {key}={saved.get(key)!r} in the checkpoint but {now.get(key)!r} now; "
                              "resume with the same setting")


def load_data(cfg: TrainConfig, tok: Tokenizer) -> Data:
    mask = LossMask(cfg.assistant_only_loss, cfg.completion_only_loss)
    train = load_examples(cfg.data, tok, cfg.max_seq_len, cfg.truncate, cfg.data_split, cfg.data_config, mask)
    if cfg.eval_data:
        evals = load_examples(cfg.eval_data, tok, cfg.max_seq_len, cfg.truncate, cfg.eval_split, cfg.data_config,
                              mask)
    else:
        train, evals = split_eval(train, cfg.eval_fraction, cfg.seed)
    return Data(train, evals, tok.pad_token_id)


def base_folder(base: str) -> Path:
    """--base as a local folder: the folder itself, or a Hub id's snapshot in the HF cache (HF_HUB_OFFLINE honoured).

    The config keeps the id as given, so the adapter's base_model_name_or_path names the Hub repo.
    """
    return resolve_checkpoint(base)


def load_base(base: str | Path, compute_dtype: str, device: torch.device) -> Llama:
    """The frozen 4-bit base every adapter of a run trains against (a bf16 folder is quantized at load)."""
    return load_model(base, quantize=True, compute_dtype=DTYPES[compute_dtype], device=device)


def check_context(model: Llama, cfg: TrainConfig) -> None:
    limit = model.cfg.max_position_embeddings
    if cfg.max_seq_len > limit:
        raise ConfigError(f"max_seq_len={cfg.max_seq_len} exceeds the model's context of {limit} tokens "
                          f"({cfg.base}/config.json max_position_embeddings); lower --max-seq-len")


def target_names(model: Llama, targets: str | tuple[str, ...]) -> str | tuple[str, ...]:
    """Projection names to adapt (every requested name must exist in the model; all-linear becomes every
    projection's name), or a regular expression (a string), kept as given for PEFT-style full matching."""
    if isinstance(targets, str):
        return targets
    known = sorted({p.rsplit(".", 1)[-1] for p in model.lora_layers()})
    if ALL_LINEAR in targets:
        if len(targets) > 1:
            raise ConfigError(f"target_modules={list(targets)}: all-linear cannot be combined with names")
        return tuple(known)
    paths = model.lora_layers()
    missing = [t for t in targets if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        raise ConfigError(f"target_modules: {', '.join(missing)} not in this model; its projections are "
                          f"{', '.join(known)} (or all-linear)")
    return tuple(sorted(set(targets)))


def attach_adapter(model: Llama, cfg: TrainConfig, slot: int) -> tuple[LoraConfig, list[torch.nn.Parameter]]:
    """A fresh adapter in `slot`: seeded Kaiming A / zero B on the configured targets, fp32, trainable."""
    try:
        lora = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=target_names(model, cfg.target_modules),
                          lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora, base_model_name_or_path=cfg.base,
                          exclude_modules=cfg.exclude_modules, layers_to_transform=cfg.layers_to_transform,
                          layers_pattern=cfg.layers_pattern)
        torch.manual_seed(cfg.seed)  # adapter init (Kaiming A) is part of the seeded run
        add_adapter(model, slot, lora, dtype=torch.float32)
    except (AdapterError, AdapterFormatError) as e:
        raise ConfigError(str(e).replace(" (adapter_config.json)", "")) from None
    params = list(adapter_params(model, slot).values())
    for p in params:
        p.requires_grad_(True)
    return lora, params


def build_optimizer(params: list, cfg: TrainConfig) -> AdamW:
    paged = cfg.optimizer.startswith("paged")
    budget = None
    if paged:
        budget = 0 if cfg.gpu_memory_budget_mb < 0 else int(cfg.gpu_memory_budget_mb * 2**20)
    return AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                 weight_decay=cfg.weight_decay, optim_bits=8 if cfg.optimizer.endswith("8bit") else 32,
                 paged=paged, gpu_memory_budget=budget)


def total_steps(cfg: TrainConfig, data: Data) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    lengths = [len(e) for e in data.train]
    micro = sum(len(plan_epoch(lengths, e, cfg.seed, cfg.batch_size, cfg.max_seq_len, cfg.packing,
                               cfg.group_by_length)) for e in range(cfg.epochs))
    return math.ceil(micro / cfg.grad_accum)
