"""vLLM model loader `qlora_nf4`: reads a checkpoint in our layout (FORMAT.md) into a vLLM model.

Each quantized weight (`P.weight` + its quant_state entries) is rebuilt with `formats.from_entries`, mapped
to vLLM's module (q/k/v_proj -> qkv_proj part 0/1/2, gate/up_proj -> gate_up_proj part 0/1, through the
model's `packed_modules_mapping`), cut to this rank's tensor-parallel shard on block boundaries
(`shards.take`) and handed to the layer; the layer's quant method glues the parts after loading. Every
other tensor (embeddings, norms, head) goes through the model's own `load_weights`.
"""
import os
from pathlib import Path

import torch
from torch import nn
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.models.utils import is_pp_missing_parameter

from qlora_kit.formats import from_entries, open_safetensors, quantized_weight_names, safetensors_files

from .errors import CheckpointMismatch
from ._quant import QloraNF4LinearMethod
from .shards import rank_slice, take


_QKV_PARTS = {"q": 0, "k": 1, "v": 2}


def _target(model: nn.Module, name: str) -> tuple[str, int] | None:
    """vLLM module path and part index for a checkpoint weight key; None when the key is to be dropped.

    The model's `hf_to_vllm_mapper` (when it has one) renames and stacks keys; otherwise its
    `packed_modules_mapping` says which merged layer a projection belongs to.
    """
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    if mapper is not None:
        mapped = list(mapper.apply([(name, torch.empty(0))]))
        if not mapped:
            return None
        if len(mapped) > 1:
            raise CheckpointMismatch(f"{name}: vLLM loads this weight into {len(mapped)} shards; not supported")
        name, probe = mapped[0]
        shard = getattr(probe, "shard_id", None)
        if shard is not None:
            return name.removesuffix(".weight"), _QKV_PARTS.get(shard, shard)
    path = name.removesuffix(".weight")
    parent, _, leaf = path.rpartition(".")
    for merged, subs in getattr(model, "packed_modules_mapping", {}).items():
        if leaf in subs:
            return f"{parent}.{merged}" if parent else merged, subs.index(leaf)
    return path, 0


def install(model: nn.Module, name: str, packed) -> None:
    """Give this rank's shard of the checkpoint weight `name` to its vLLM layer (module.qlora_parts)."""
    where = _target(model, name)
    if where is None:
        return
    path, part = where
    if is_pp_missing_parameter(path + ".weight", model):
        return
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise CheckpointMismatch(f"{name}: quantized in the checkpoint but vLLM's model has no module {path}") from None
    if not isinstance(getattr(module, "quant_method", None), QloraNF4LinearMethod):
        raise CheckpointMismatch(f"{name}: quantized in the checkpoint but vLLM built {path} as "
                                 f"{type(module).__name__} without the qlora_nf4 linear method")
    in_part, out_parts, _, _ = module.qlora_geometry
    if part >= len(out_parts):
        raise CheckpointMismatch(f"{name}: part {part} of {path}, which has {len(out_parts)} part(s)")
    rank, size = getattr(module, "tp_rank", 0), getattr(module, "tp_size", 1)
    n, k = packed.state.shape if len(packed.state.shape) == 2 else (0, 0)
    rows = rank_slice(n, out_parts[part], rank, size, f"{name} (out-features)")
    cols = rank_slice(k, in_part, rank, size, f"{name} (in-features)")
    module.qlora_parts[part] = take(packed, rows, cols, name).to(module.weight.device)


class QloraNF4Loader(BaseModelLoader):
    """`--load-format qlora_nf4`: a local checkpoint folder written by `qconvert convert` (or transformers+bnb)."""

    def download_model(self, model_config) -> None:
        if not os.path.isdir(model_config.model):
            raise CheckpointMismatch(f"{model_config.model}: the qlora_nf4 loader reads a local checkpoint folder; "
                                     "download it first (huggingface-cli download)")

    def load_weights(self, model: nn.Module, model_config) -> None:
        folder = Path(model_config.model)
        dense: list[tuple[str, torch.Tensor]] = []
        for path in safetensors_files(folder):
            with open_safetensors(path) as f:
                keys = list(f.keys())
                owned: set[str] = set()
                for name in quantized_weight_names(keys):
                    entries = {k: f.get_tensor(k) for k in keys if k == name or k.startswith(name + ".")}
                    owned.update(entries)
                    install(model, name, from_entries(name, entries))
                dense += [(k, f.get_tensor(k)) for k in keys if k not in owned]
        loaded = model.load_weights(iter(dense)) or set()
        ours = {n for n, m in model.named_modules() if isinstance(getattr(m, "quant_method", None), QloraNF4LinearMethod)}
        missing = [p for p, _ in model.named_parameters()
                   if p not in loaded and p.rpartition(".")[0] not in ours and not is_pp_missing_parameter(p, model)]
        if missing:
            raise CheckpointMismatch(f"{folder}: no tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
