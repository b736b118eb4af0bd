"""PEFT's LoRA adapter layout: a folder with adapter_config.json and adapter_model.safetensors.

Tensor names are PEFT's for a causal LM, without the adapter name:

    base_model.model.<module path>.lora_A.weight   (r, in_features)
    base_model.model.<module path>.lora_B.weight   (out_features, r)

e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. The update is
W x + (lora_alpha / r) * B A x  (or lora_alpha / sqrt(r) with use_rslora). Pickled
adapter_model.bin files are refused: adapters load from safetensors only.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._pattern import PatternError, PatternTable
from ._targets import ALL_LINEAR, Targets
from .errors import AdapterFormatError
from .io import atomic_dir, load_safetensors, save_safetensors, write_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"
# PEFT LoraConfig fields (PEFT 0.21) qlora-kit does not implement, with PEFT's default. A config that sets one to
# anything else is refused by name, never ignored (None, [] and {} count as the same empty default).
# init_lora_weights only shapes a fresh adapter's start, so a loaded adapter may carry the init modes that leave the
# base weights untouched (true, false, "gaussian"); PiSSA/OLoRA/LoftQ/CorDA-style inits change the base and are refused.
UNSUPPORTED_PEFT_FIELDS = {
    "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "init_lora_weights": True,
    "megatron_config": None, "trainable_token_indices": None, "loftq_config": {}, "eva_config": None,
    "corda_config": None, "lora_ga_config": None, "use_dora": False, "velora_config": None,
    "alora_invocation_tokens": None, "use_qalora": False, "monteclora_config": None, "layer_replication": None,
    "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "ensure_weight_tying": False,
}


# and, when training (qtrain writes one rank and alpha for every module), these; loading honours them
UNTRAINABLE_PEFT_FIELDS = {**UNSUPPORTED_PEFT_FIELDS, "rank_pattern": {}, "alpha_pattern": {}}


def unsupported_peft_field(key: str, value, loading: bool = False) -> str | None:
    """Why PEFT field `key` = `value` cannot be honoured when loading an adapter or (not `loading`) training one;
    None when `key` is not such a field or holds PEFT's default."""
    table = UNSUPPORTED_PEFT_FIELDS if loading else UNTRAINABLE_PEFT_FIELDS
    if key not in table:
        return None
    default = table[key]
    if value == default or (value in (None, [], {}) and default in (None, [], {})):
        return None
    if loading and key == "init_lora_weights" and (value is True or value is False or value == "gaussian"):
        return None
    return f"{key}={value!r} is not supported by qlora-kit (PEFT's default {default!r} is the only value accepted)"


@dataclass(frozen=True)
class LoraConfig:
    """The adapter_config.json fields qlora-kit reads and writes; other keys are kept verbatim in `extra`."""

    r: int
    lora_alpha: float
    target_modules: str | tuple[str, ...]  # a str is a regex (full match); a tuple holds names (suffix match)
    lora_dropout: float = 0.0
    use_rslora: bool = False
    base_model_name_or_path: str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    exclude_modules: str | tuple[str, ...] = ()
    layers_to_transform: tuple[int, ...] = ()
    layers_pattern: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        def bad(key, rule):
            raise AdapterFormatError(f"{key}={getattr(self, key)!r}: {rule} (adapter_config.json key {key})")

        if not _is_int(self.r) or self.r < 1:
            bad("r", "must be an integer >= 1")
        if not _is_number(self.lora_alpha):
            bad("lora_alpha", "must be a finite number")
        for key in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
            value = getattr(self, key)
            if isinstance(value, list) or value == ALL_LINEAR:  # PEFT's spellings of the same settings
                object.__setattr__(self, key, _str_or_tuple(value))
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if not (isinstance(value, str) and value) and not (
                    isinstance(value, tuple) and all(isinstance(t, str) and t for t in value)):
                bad(key, "must be a module name or a list of module names (a string is a regular expression, as in PEFT)")
        if not self.target_modules:
            raise AdapterFormatError("target_modules is empty (adapter_config.json key target_modules)")
        if not isinstance(self.layers_to_transform, tuple) or not all(_is_int(i) and i >= 0
                                                                      for i in self.layers_to_transform):
            bad("layers_to_transform", "must be a layer index or a list of layer indices >= 0")
        if not isinstance(self.layers_pattern, tuple) or not all(isinstance(p, str) and p for p in self.layers_pattern):
            bad("layers_pattern", "must be a name or a list of names")
        if isinstance(self.target_modules, str) and (self.layers_to_transform or self.layers_pattern):
            bad("target_modules", "a regular expression cannot be combined with layers_to_transform/layers_pattern "
                "(as in PEFT); give a list of names")
        if self.layers_pattern and not self.layers_to_transform:
            bad("layers_pattern", "needs layers_to_transform (as in PEFT)")
        try:
            object.__setattr__(self, "_targets", Targets(self.target_modules, self.exclude_modules,
                                                         self.layers_to_transform, self.layers_pattern))
        except PatternError as e:
            raise AdapterFormatError(f"{e} (adapter_config.json)") from None
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", "must be in [0, 1)")
        if not isinstance(self.use_rslora, bool):
            bad("use_rslora", "must be true or false")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            bad("base_model_name_or_path", "must be a string or null")
        tables = {}
        for key, ok, rule in (("rank_pattern", lambda v: _is_int(v) and v >= 1, "integers >= 1"),
                              ("alpha_pattern", _is_number, "finite numbers")):
            table = getattr(self, key)
            if not isinstance(table, dict) or not all(ok(v) for v in table.values()):
                bad(key, f"must map module-name patterns to {rule}")
            try:
                tables[key] = PatternTable(table)
            except PatternError as e:
                raise AdapterFormatError(f"{key}: {e} (adapter_config.json key {key})") from None
        object.__setattr__(self, "_tables", tables)

    def __getstate__(self):  # the compiled pattern tables hold closures: pickle the fields, rebuild on load
        return {k: v for k, v in self.__dict__.items() if k not in ("_tables", "_targets")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()

    def selects(self, module_path: str) -> bool:
        """Whether this adapter goes on `module_path`, PEFT's way (formats/_targets.py)."""
        try:
            return self._targets.selects(module_path)
        except PatternError as e:
            raise AdapterFormatError(f"{e} (adapter_config.json)") from None

    def scale(self, rank: int | None = None) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        r = rank or self.r
        return self.lora_alpha / (r**0.5 if self.use_rslora else r)

    def rank_for(self, module_path: str) -> int:
        """r of one module: `rank_pattern` overrides `r` where a key matches the end of the module path."""
        return self._lookup("rank_pattern", module_path, self.r)

    def alpha_for(self, module_path: str) -> float:
        """lora_alpha of one module: `alpha_pattern` overrides it the same way."""
        return float(self._lookup("alpha_pattern", module_path, self.lora_alpha))

    def _lookup(self, key: str, module_path: str, default):
        try:
            return self._tables[key].lookup(module_path, default)
        except PatternError as e:
            raise AdapterFormatError(f"{key}: {e} (adapter_config.json key {key})") from None

    def scale_for(self, module_path: str, rank: int | None = None) -> float:
        """s of one module, from its own alpha and rank (the stored rank when given)."""
        r = rank or self.rank_for(module_path)
        return self.alpha_for(module_path) / (r**0.5 if self.use_rslora else r)

    def to_json(self) -> dict:
        out = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            # PEFT reads the list ["all-linear"] as a module named "all-linear"; its shorthand is the string
            "target_modules": _list_or_str(self.target_modules),
            "exclude_modules": _list_or_str(self.exclude_modules) if self.exclude_modules else None,
            "layers_to_transform": list(self.layers_to_transform) or None,
            "layers_pattern": list(self.layers_pattern) or None,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "use_dora": False,
        }
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, obj: dict, where: str = CONFIG_NAME) -> "LoraConfig":
        if not isinstance(obj, dict):
            raise AdapterFormatError(f"{where}: expected a JSON object")
        if obj.get("peft_type", "LORA") != "LORA":
            raise AdapterFormatError(f"{where}: peft_type {obj.get('peft_type')!r} is not LORA")
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in obj:
                raise AdapterFormatError(f"{where}: missing key {key!r}")
        for key, value in obj.items():
            why = unsupported_peft_field(key, value, loading=True)
            if why:
                raise AdapterFormatError(f"{where}: {why}")
        known = {"r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "base_model_name_or_path",
                 "rank_pattern", "alpha_pattern", "exclude_modules", "layers_to_transform", "layers_pattern"}
        layers = _or(obj.get("layers_to_transform"), ())
        try:
            return cls(
                r=obj["r"], lora_alpha=obj["lora_alpha"], target_modules=_str_or_tuple(obj["target_modules"]),
                lora_dropout=_or(obj.get("lora_dropout"), 0.0), use_rslora=_or(obj.get("use_rslora"), False),
                base_model_name_or_path=obj.get("base_model_name_or_path"),
                rank_pattern=_or(obj.get("rank_pattern"), {}), alpha_pattern=_or(obj.get("alpha_pattern"), {}),
                exclude_modules=_str_or_tuple(_or(obj.get("exclude_modules"), ())),
                layers_to_transform=(layers,) if _is_int(layers) else tuple(layers) if isinstance(layers, list) else layers,
                layers_pattern=_tuple(_or(obj.get("layers_pattern"), ())),
                extra={k: v for k, v in obj.items() if k not in known},
            )
        except AdapterFormatError as e:
            raise AdapterFormatError(f"{where}: {e}") from None


def _str_or_tuple(value):
    """PEFT's str-or-list fields: "all-linear" and lists become tuples; any other string stays a regex."""
    if value == ALL_LINEAR:
        return (ALL_LINEAR,)
    return tuple(value) if isinstance(value, list) else value


def _tuple(value):
    return (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else value


def _list_or_str(value):
    if value == (ALL_LINEAR,):
        return ALL_LINEAR
    return value if isinstance(value, str) else sorted(value)


def _or(value, default):
    """PEFT writes null for an unset optional key."""
    return default if value is None else value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def lora_pairs(tensors: dict[str, torch.Tensor], where: str = WEIGHTS_NAME) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group adapter tensors by module path (without the `base_model.model.` prefix) into (A, B) pairs.

    Raises AdapterFormatError on an unexpected key, an A without its B, or inconsistent ranks.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(KEY_PREFIX) or not key.endswith((LORA_A, LORA_B)):
            raise AdapterFormatError(f"{where}: unexpected tensor {key!r} (expected {KEY_PREFIX}<module>.lora_A|B.weight)")
        module, kind = key[len(KEY_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        pairs.setdefault(module, {})[kind] = t
    out = {}
    for module, p in pairs.items():
        if set(p) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(f"{where}: module {module} has {sorted(p)} but needs both lora_A and lora_B")
        a, b = p["lora_A"], p["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(f"{where}: module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                     "do not form a rank-r pair (A: (r, in), B: (out, r))")
        out[module] = (a, b)
    if not out:
        raise AdapterFormatError(f"{where}: holds no LoRA tensors")
    return out


def save_adapter(path: str | os.PathLike, config: LoraConfig, tensors: dict[str, torch.Tensor], overwrite: bool = False) -> None:
    """Write an adapter folder atomically; `tensors` use PEFT's key names."""
    lora_pairs(tensors)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_json(tmp / CONFIG_NAME, config.to_json())
        save_safetensors(tensors, tmp / WEIGHTS_NAME)


def load_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter folder. Raises AdapterFormatError naming the file at fault."""
    path = Path(path)
    cfg_path, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{cfg_path}: missing; not a PEFT adapter folder")
    if not weights.is_file():
        pickled = path / "adapter_model.bin"
        hint = " (adapter_model.bin is pickle and is refused: convert it to safetensors)" if pickled.exists() else ""
        raise AdapterFormatError(f"{weights}: missing{hint}")
    try:  # not UTF-8 and nesting too deep to parse are bad JSON too, not a traceback
        obj = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise AdapterFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    config = LoraConfig.from_json(obj, str(cfg_path))
    tensors = load_safetensors(weights)
    lora_pairs(tensors, str(weights))
    return config, tensors
