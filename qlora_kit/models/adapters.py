"""Model-level LoRA adapter management: create, load and save adapters in PEFT's format, and the one adapter
boundary (read_peft_adapter: read + validate against a base; install_adapter) that trainer and qserve call.

An adapter is identified by an integer id >= 0 (the value rows carry in Batch.adapter_ids). Module
paths are Hugging Face's, so PEFT's keys `base_model.model.<path>.lora_A.weight` map one to one.
PEFT's rank_pattern / alpha_pattern keys match a module path when the path ends with the key
(after a dot) or the key matches it as a regular expression.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit.formats import LoraConfig, load_adapter, lora_pairs, save_adapter
from qlora_kit.formats.errors import QloraKitError
from qlora_kit.formats.peft import KEY_PREFIX, LORA_A, LORA_B

from .config import ModelConfig
from .errors import AdapterError
from .llama import Llama

MAX_RANK = 256  # the largest rank read_peft_adapter accepts


# modules of a Hugging Face Llama-family model that are not LoRA projections here, per decoder layer and once
_LAYER_OTHERS = ("input_layernorm", "post_attention_layernorm", "mlp.act_fn")
_MODEL_OTHERS = ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")


def select_modules(paths, config: LoraConfig) -> list[str]:
    """The projection paths `config` selects, PEFT's way (LoraConfig.selects: regex or names, exclude_modules,
    layers_to_transform).

    Raises AdapterError when it selects nothing, or selects a module that is not a LoRA projection here (an
    embedding, the LM head, a norm, a whole layer: PEFT would adapt or reject those; qlora-kit cannot adapt them).
    """
    paths = list(paths)
    try:
        chosen = [p for p in paths if config.selects(p)]
        others = {".".join(p.split(".")[:k]) for p in paths for k in range(1, p.count(".") + 1)}
        layers = {p.split(".mlp.")[0].split(".self_attn.")[0] for p in paths}
        others |= {f"{layer}.{o}" for layer in layers for o in _LAYER_OTHERS} | set(_MODEL_OTHERS)
        # all-linear is PEFT's "every linear layer but the output layer": exactly the projections here
        wrong = [] if config.target_modules == ("all-linear",) else sorted(o for o in others - set(paths)
                                                                          if config.selects(o))
    except QloraKitError as e:
        raise AdapterError(str(e)) from None
    shown = _shown_targets(config)
    names = config.target_modules
    if not isinstance(names, str) and names != ("all-linear",):
        unknown = sorted(n for n in names if not any(p == n or p.endswith("." + n) for p in paths))
        if unknown:
            known = sorted({p.rsplit(".", 1)[-1] for p in paths})
            raise AdapterError(f"target_modules {unknown} are not projections of the base; known: {known}")
    if wrong:
        raise AdapterError(f"{shown} selects {', '.join(wrong[:4])}, which qlora-kit cannot adapt (only the "
                           f"projections {', '.join(sorted({p.rsplit('.', 1)[-1] for p in paths}))})")
    if not chosen:
        known = sorted({p.rsplit(".", 1)[-1] for p in paths})
        raise AdapterError(f"{shown} matches no projection; known: {known}")
    return chosen


def _shown_targets(config: LoraConfig) -> str:
    t = config.target_modules
    out = f"target_modules={t!r}" if isinstance(t, str) else f"target_modules={sorted(t)}"
    if config.exclude_modules:
        out += f" exclude_modules={config.exclude_modules!r}"
    if config.layers_to_transform:
        out += f" layers_to_transform={list(config.layers_to_transform)}"
    return out


def add_adapter(model: Llama, adapter_id: int, config: LoraConfig, dtype: torch.dtype = torch.float32) -> None:
    """Create adapter `adapter_id` on the modules config selects (select_modules; A Kaiming-uniform, B zero).

    Raises AdapterError if the id is taken or the selection is refused.
    """
    if adapter_id in adapter_ids(model):
        raise AdapterError(f"adapter id {adapter_id} is already loaded; remove it first")
    layers = model.lora_layers()
    for path in select_modules(layers, config):
        layer = layers[path]
        rank = config.rank_for(path)
        layer.add_adapter(adapter_id, rank, config.scale_for(path, rank), config.lora_dropout, dtype)


def adapter_ids(model: Llama) -> list[int]:
    """Ids of the adapters resident in the model."""
    return sorted({i for layer in model.lora_layers().values() for i in layer.adapter_ids})


def remove_adapter(model: Llama, adapter_id: int) -> None:
    for layer in model.lora_layers().values():
        layer.remove_adapter(adapter_id)


def adapter_params(model: Llama, adapter_id: int | None = None) -> dict[str, torch.nn.Parameter]:
    """Trainable tensors of one adapter (or all), keyed `<module path>.lora_a.<id>` / `.lora_b.<id>`."""
    out = {}
    for path, layer in model.lora_layers().items():
        for name, p in layer.adapter_params(adapter_id).items():
            out[f"{path}.{name}"] = p
    return out


def adapter_state(model: Llama, adapter_id: int) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's key names (detached, on CPU)."""
    out = {}
    for path, layer in model.lora_layers().items():
        if adapter_id in layer.scales:
            out[f"{KEY_PREFIX}{path}.{LORA_A}"] = layer.lora_a[str(adapter_id)].detach().cpu().contiguous()
            out[f"{KEY_PREFIX}{path}.{LORA_B}"] = layer.lora_b[str(adapter_id)].detach().cpu().contiguous()
    if not out:
        raise AdapterError(f"adapter id {adapter_id} is not loaded (loaded: {adapter_ids(model)})")
    return out


@dataclass(frozen=True, slots=True)
class AdapterPayload:
    """A validated adapter in host memory: per module path, (A (r, in), B (out, r), scale); its config; bytes."""

    config: LoraConfig
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    nbytes: int


def projection_shapes(base: Llama | ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA-capable projection by module path, from a model or, without
    weights, from its config (the decoder built on the meta device: the shapes are the model's own)."""
    if isinstance(base, ModelConfig):
        with torch.device("meta"):
            base = Llama(base)
    return {path: (m.in_features, m.out_features) for path, m in base.lora_layers().items()}


def base_names(folder: str | os.PathLike) -> tuple[str, ...]:
    """Names an adapter's base_model_name_or_path may give for the base in `folder`: the folder's name and
    config.json's _name_or_path."""
    folder = Path(folder)
    names = [folder.name]
    cfg = json.loads((folder / "config.json").read_text())
    if isinstance(cfg, dict) and isinstance(cfg.get("_name_or_path"), str) and cfg["_name_or_path"]:
        names.append(cfg["_name_or_path"])
    return tuple(names)


def _norm_name(name: str) -> str:
    return os.path.basename(str(name).rstrip("/\\")).lower()


def read_peft_adapter(folder: str | os.PathLike, shapes: dict[str, tuple[int, int]] | None,
                      base: tuple[str, ...] = (), dtype: torch.dtype = torch.float32) -> AdapterPayload:
    """Read a PEFT adapter folder and validate it against a base: the one adapter boundary (trainer, native
    engine and vLLM front all call it, so one adapter gets one verdict).

    Refused, in this order: a folder formats/ refuses (pickle, bad config, unpaired tensors); with `base`, a
    base_model_name_or_path that is missing or names none of `base`; with `shapes`, target modules or weights
    the base does not have, weights outside target_modules, A/B shapes that do not fit; ranks outside
    [1, MAX_RANK]; non-finite weights.

    Args:
        folder: the adapter folder.
        shapes: projection_shapes() of the base; None skips the module and shape checks.
        base: base_names() of the base; empty skips the base-name check.
        dtype: dtype the weights are kept in (and checked for finiteness in).

    Raises:
        AdapterError whose `reason` names the field and what the base expects.
    """
    def refuse(reason):
        raise AdapterError(reason, folder)

    try:
        config, tensors = load_adapter(folder)
        pairs = lora_pairs(tensors, str(folder))
    except QloraKitError as e:
        raise AdapterError(str(e), folder) from None
    wanted = {_norm_name(n) for n in base if n}
    if wanted and not config.base_model_name_or_path:
        refuse(f"adapter_config.json has no base_model_name_or_path, so it cannot be checked against the base "
               f"{sorted(wanted)}; set it to the base it was trained on")
    if wanted and _norm_name(config.base_model_name_or_path) not in wanted:
        refuse(f"trained for base model {config.base_model_name_or_path!r}, but the base is {sorted(wanted)}; "
               "load it on its own base (or, in qserve, add an alias with --base-name)")
    try:
        chosen = set(select_modules(shapes, config)) if shapes is not None else None
    except AdapterError as e:
        refuse(e.reason)
    layers, nbytes = {}, 0
    for module, (a, b) in pairs.items():
        if shapes is not None:
            if module not in shapes:
                refuse(f"module {module} is not a projection of the base")
            if module not in chosen:
                refuse(f"module {module} has weights but is not in target_modules ({_shown_targets(config)})")
            in_f, out_f = shapes[module]
            if a.shape[1] != in_f or b.shape[0] != out_f:
                refuse(f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base's "
                       f"({out_f}, {in_f}) weight")
        r = a.shape[0]
        if not 1 <= r <= MAX_RANK:
            refuse(f"{module}: rank {r} outside [1, {MAX_RANK}]")
        a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            refuse(f"{module}: weights hold NaN or inf")
        layers[module] = (a, b, config.scale_for(module, r))
        nbytes += a.nbytes + b.nbytes
    return AdapterPayload(config, layers, nbytes)


def install_adapter(model: Llama, payload: AdapterPayload, adapter_id: int, replace: bool = False) -> None:
    """Copy a validated adapter into slot `adapter_id` (its rank kept per module, on the model's device).

    Raises AdapterError if the slot is taken and not `replace`.
    """
    if adapter_id in adapter_ids(model):
        if not replace:
            raise AdapterError(f"adapter id {adapter_id} is already loaded; remove it first")
        remove_adapter(model, adapter_id)
    layers = model.lora_layers()
    device = model.model.embed_tokens.weight.device
    for module, (a, b, scale) in payload.layers.items():
        layer = layers[module]
        layer.add_adapter(adapter_id, a.shape[0], scale, payload.config.lora_dropout, a.dtype, device)
        with torch.no_grad():
            layer.lora_a[str(adapter_id)].copy_(a)
            layer.lora_b[str(adapter_id)].copy_(b)


def load_peft_adapter(model: Llama, folder: str | os.PathLike, adapter_id: int, dtype: torch.dtype = torch.float32,
                      base: tuple[str, ...] = ()) -> LoraConfig:
    """read_peft_adapter against `model` (and, with `base`, its names), then install_adapter; returns the config.

    Raises AdapterError (nothing is installed).
    """
    payload = read_peft_adapter(folder, projection_shapes(model), base, dtype)
    install_adapter(model, payload, adapter_id)
    return payload.config


def save_peft_adapter(model: Llama, adapter_id: int, folder: str | os.PathLike, config: LoraConfig,
                      overwrite: bool = False) -> None:
    """Write slot `adapter_id` as a PEFT adapter folder (atomic)."""
    save_adapter(folder, config, adapter_state(model, adapter_id), overwrite=overwrite)
