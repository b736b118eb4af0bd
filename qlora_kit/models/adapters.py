"""Model-level LoRA adapter management: create, load and save adapters in PEFT's format.

An adapter is identified by an integer id >= 0 (the value rows carry in Batch.adapter_ids). Module
paths are Hugging Face's, so PEFT's keys `base_model.model.<path>.lora_A.weight` map one to one.
PEFT's rank_pattern / alpha_pattern keys match a module path when the path ends with the key
(after a dot) or the key matches it as a regular expression.
"""
import os

import torch

from qlora_kit.formats import LoraConfig, load_adapter, lora_pairs, save_adapter
from qlora_kit.formats.peft import KEY_PREFIX, LORA_A, LORA_B

from .errors import AdapterError
from .llama import Llama


def _targets(model: Llama, config: LoraConfig) -> dict:
    layers = model.lora_layers()
    names = set(config.target_modules)
    if names == {"all-linear"}:
        return layers
    chosen = {p: m for p, m in layers.items() if p.rsplit(".", 1)[-1] in names}
    if not chosen:
        known = sorted({p.rsplit(".", 1)[-1] for p in layers})
        raise AdapterError(f"target_modules={sorted(names)} matches no projection; known: {known}")
    return chosen


def add_adapter(model: Llama, adapter_id: int, config: LoraConfig, dtype: torch.dtype = torch.float32) -> None:
    """Create adapter `adapter_id` on config.target_modules (A Kaiming-uniform, B zero).

    Raises AdapterError if the id is taken or no module matches.
    """
    if adapter_id in adapter_ids(model):
        raise AdapterError(f"adapter id {adapter_id} is already loaded; remove it first")
    for path, layer in _targets(model, config).items():
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


def load_peft_adapter(model: Llama, folder: str | os.PathLike, adapter_id: int,
                      dtype: torch.dtype = torch.float32) -> LoraConfig:
    """Read a PEFT adapter folder into slot `adapter_id`; returns its config.

    Raises AdapterFormatError (bad folder) or AdapterError (modules or shapes that do not fit).
    """
    config, tensors = load_adapter(folder)
    pairs = lora_pairs(tensors)
    layers = model.lora_layers()
    for path, (a, b) in pairs.items():
        layer = layers.get(path)
        if layer is None:
            raise AdapterError(f"{folder}: module {path} is not a projection of this model")
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise AdapterError(f"{folder}: {path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                               f"a ({layer.out_features}, {layer.in_features}) weight")
    if adapter_id in adapter_ids(model):
        raise AdapterError(f"adapter id {adapter_id} is already loaded; remove it first")
    device = model.model.embed_tokens.weight.device
    for path, (a, b) in pairs.items():
        layer = layers[path]
        rank = a.shape[0]
        layer.add_adapter(adapter_id, rank, config.scale_for(path, rank), config.lora_dropout, dtype, device)
        with torch.no_grad():
            layer.lora_a[str(adapter_id)].copy_(a)
            layer.lora_b[str(adapter_id)].copy_(b)
    return config


def save_peft_adapter(model: Llama, adapter_id: int, folder: str | os.PathLike, config: LoraConfig,
                      overwrite: bool = False) -> None:
    """Write slot `adapter_id` as a PEFT adapter folder (atomic)."""
    save_adapter(folder, config, adapter_state(model, adapter_id), overwrite=overwrite)
