"""qserve's side of the adapter boundary (models.read_peft_adapter / install_adapter), for the native engine's
registry and the vLLM front's alike: the verdict rephrased as AdapterRefused naming the adapter.

Both backends refuse exactly what the boundary refuses, with the same reason text (see
tests/unit/test_adapter_verdicts.py); the vLLM front adds one limit of its own, the server's --max-lora-rank.
"""
import torch

from qlora_kit.models import AdapterError, AdapterPayload, install_adapter, projection_shapes, read_peft_adapter
from qlora_kit.models import remove_adapter as evict

from ..errors import AdapterRefused

__all__ = ["AdapterPayload", "evict", "install", "read_adapter"]


def read_adapter(base, name: str, path: str, base_names: tuple[str, ...] = (),
                 dtype: torch.dtype = torch.float32) -> tuple[AdapterPayload, int]:
    """Read and validate the adapter folder `path` against `base` (a models.Llama, or projection_shapes()).

    Args:
        base: the served model, or its projection shapes (vLLM front: no weights in this process), or None
            when the base is not at hand (no module or shape checks).
        name: adapter name (for messages).
        path: a folder already checked by the registry (safetensors only, under the allowed root).
        base_names: names of the served base (models.base_names + --base-name); empty = no check.
        dtype: dtype the adapter weights are kept in.

    Returns:
        (payload, nbytes).

    Raises:
        AdapterRefused: "adapter 'name' (path): <the boundary's reason>".
    """
    shapes = base if base is None or isinstance(base, dict) else projection_shapes(base)
    try:
        payload = read_peft_adapter(path, shapes, base_names, dtype)
    except AdapterError as e:
        raise AdapterRefused(f"adapter {name!r} ({path}): {e.reason}") from None
    return payload, payload.nbytes


def install(model, payload: AdapterPayload, slot: int) -> bool:
    """Copy an adapter into resident slot `slot`, replacing whatever was there.

    When the slot holds weights of the same modules, ranks and dtype (its last adapter's: the engine leaves an
    evicted slot's weights in place, and a fleet's adapters mostly share one shape), every layer is overwritten in
    place (LoraLinear.write_adapter: no new Parameters, no re-pack of the layer's other adapters); otherwise the
    slot is emptied and created afresh (install_adapter). Only copies run here: the payload was read, validated
    and converted to the slot dtype by `read_adapter` in a load thread.

    Returns:
        True when written in place.
    """
    layers = model.lora_layers()
    held = {path for path, layer in layers.items() if slot in layer.scales}
    dropout = payload.config.lora_dropout
    if held == payload.layers.keys() and all(layers[m].write_adapter(slot, a, b, s, dropout)
                                             for m, (a, b, s) in payload.layers.items()):
        return True
    install_adapter(model, payload, slot, replace=True)  # also undoes a partial in-place write above
    return False
