"""qserve's side of the adapter boundary (models.read_peft_adapter / install_adapter): the registry's loader,
for the native engine and the vLLM front alike, with the verdict rephrased as AdapterRefused naming the adapter.

Both backends refuse exactly what the boundary refuses, with the same reason text (see
tests/unit/test_adapter_verdicts.py); the vLLM front adds one limit of its own, the server's --max-lora-rank.
"""
import torch

from qlora_kit.models import AdapterError, AdapterPayload, install_adapter, projection_shapes, read_peft_adapter
from qlora_kit.models import remove_adapter as evict

from ..errors import AdapterRefused

__all__ = ["AdapterPayload", "evict", "install", "loader", "read_adapter"]


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


def install(model, payload: AdapterPayload, slot: int) -> None:
    """Copy an adapter into resident slot `slot`, replacing whatever was there."""
    install_adapter(model, payload, slot, replace=True)


def loader(base, base_names: tuple[str, ...], max_rank: int | None = None, keep_weights: bool = True):
    """The registry's `loader(name, path) -> (payload, nbytes)` over read_adapter.

    `max_rank` (vLLM: the server's --max-lora-rank) refuses larger ranks; without `keep_weights` (vLLM reads the
    weights itself) the payload is the adapter's LoraConfig alone, nbytes still its weights' size.
    """
    def load(name: str, path: str):
        payload, nbytes = read_adapter(base, name, path, base_names)
        rank = max([payload.config.r, *payload.config.rank_pattern.values(), *payload.ranks.values()])
        if max_rank is not None and rank > max_rank:
            raise AdapterRefused(f"adapter {name!r} ({path}): rank {rank} is above the vLLM server's "
                                 f"--max-lora-rank {max_rank}; restart it with a larger one")
        return (payload if keep_weights else payload.config), nbytes

    return load
