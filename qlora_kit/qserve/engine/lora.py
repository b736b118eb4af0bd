"""The torch side of the adapter registry: read + validate a PEFT adapter against the served base, and copy it
into / out of a resident slot of the model (the slot index is the per-row adapter id in `Batch.adapter_ids`).

Validation refuses, with a message naming the field, anything that would otherwise be served wrongly:
a base-model name that is not the served base, target modules or tensors that the base does not have, shapes
that do not fit, ranks outside [1, MAX_RANK], non-finite weights. Each adapter keeps its own rank (no padding).
"""
import os
from dataclasses import dataclass

import torch

from qlora_kit.formats import load_adapter, lora_pairs
from qlora_kit.formats.errors import QloraKitError

from ..errors import AdapterRefused

MAX_RANK = 256


@dataclass(frozen=True, slots=True)
class AdapterPayload:
    """A validated adapter in host memory: per module path, (A (r, in), B (out, r), scale)."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    ranks: dict[str, int]
    base_model: str | None


def _norm_name(name: str) -> str:
    return os.path.basename(str(name).rstrip("/\\")).lower()


def read_adapter(model, name: str, path: str, base_names: tuple[str, ...] = (),
                 dtype: torch.dtype = torch.float32) -> tuple[AdapterPayload, int]:
    """Load and validate the adapter folder `path` for `model`; the registry's loader.

    Args:
        model: the served models.Llama.
        name: adapter name (for messages).
        path: a folder already checked by the registry (safetensors only, under the allowed root).
        base_names: names of the served base; an adapter naming another base model is refused. Empty = no check.
        dtype: dtype the adapter weights are kept in.

    Returns:
        (payload, nbytes).

    Raises:
        AdapterRefused naming the adapter, the field and what the base expects.
    """
    where = f"adapter {name!r} ({path})"
    try:
        config, tensors = load_adapter(path)
        pairs = lora_pairs(tensors, path)
    except QloraKitError as e:
        raise AdapterRefused(f"{where}: {e}") from None
    wanted = {_norm_name(n) for n in base_names if n}
    if wanted and not config.base_model_name_or_path:
        raise AdapterRefused(f"{where}: adapter_config.json has no base_model_name_or_path, so it cannot be checked "
                             f"against this server's base {sorted(wanted)}; set it to the base it was trained on")
    if wanted and _norm_name(config.base_model_name_or_path) not in wanted:
        raise AdapterRefused(f"{where}: trained for base model {config.base_model_name_or_path!r}, but this server "
                             f"serves {sorted(wanted)}; load it on its own base (or add an alias with --base-name)")
    layers = model.lora_layers()
    known = sorted({p.rsplit(".", 1)[-1] for p in layers})
    targets = set(config.target_modules)
    if targets != {"all-linear"}:
        unknown = sorted(t for t in targets if t not in known and not any(p.endswith("." + t) for p in layers))
        if unknown:
            raise AdapterRefused(f"{where}: target_modules {unknown} are not projections of the base; known: {known}")
    out, ranks, nbytes = {}, {}, 0
    for module, (a, b) in pairs.items():
        layer = layers.get(module)
        if layer is None:
            raise AdapterRefused(f"{where}: module {module} is not a projection of the served base")
        if targets != {"all-linear"} and module.rsplit(".", 1)[-1] not in targets and module not in targets:
            raise AdapterRefused(f"{where}: module {module} has weights but is not in target_modules {sorted(targets)}")
        r = a.shape[0]
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise AdapterRefused(f"{where}: {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                                 f"the base's ({layer.out_features}, {layer.in_features}) weight")
        if not 1 <= r <= MAX_RANK:
            raise AdapterRefused(f"{where}: {module}: rank {r} outside [1, {MAX_RANK}]")
        a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterRefused(f"{where}: {module}: weights hold NaN or inf")
        scale = config.scale_for(module, r)
        out[module], ranks[module] = (a, b, scale), r
        nbytes += a.nbytes + b.nbytes
    return AdapterPayload(out, ranks, config.base_model_name_or_path), nbytes


def install(model, payload: AdapterPayload, slot: int) -> None:
    """Copy an adapter into resident slot `slot` (its rank kept per module), replacing whatever was there."""
    evict(model, slot)
    layers = model.lora_layers()
    device = model.model.embed_tokens.weight.device
    for module, (a, b, scale) in payload.layers.items():
        layer = layers[module]
        layer.add_adapter(slot, a.shape[0], scale, 0.0, a.dtype, device)
        with torch.no_grad():
            layer.lora_a[str(slot)].copy_(a)
            layer.lora_b[str(slot)].copy_(b)


def evict(model, slot: int) -> None:
    for layer in model.lora_layers().values():
        layer.remove_adapter(slot)
