"""Build a Llama from a Hugging Face folder: 4-bit checkpoint (our layout = transformers + bitsandbytes'),
or a bf16/fp32 checkpoint quantized while loading, or kept dense.

The model is constructed on the meta device (no storage), then each tensor is read lazily from
safetensors, placed on `device` (and quantized, when asked) and assigned into its module, one at a
time: peak memory is the final model plus one full-precision tensor, never a whole bf16 copy.
"""
import json
import os
from pathlib import Path

import torch
from torch import nn

from qlora_kit.formats import (from_entries, is_state_key, open_safetensors, quantize_4bit, quantized_weight_names,
                     safetensors_files, should_quantize)

from .config import load_config
from .errors import CheckpointError
from .llama import Llama
from .lora import LoraLinear
from .nf4_linear import NF4Linear, dense_linear


def is_prequantized(folder: Path) -> bool:
    cfg = json.loads((folder / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    return bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def _target(model: Llama, key: str) -> tuple[nn.Module, str]:
    """The module and attribute a checkpoint key assigns (a LoraLinear's key goes to its base)."""
    path, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise CheckpointError(f"{key}: no such module in a {model.cfg.model_type} decoder") from None
    if isinstance(module, LoraLinear):
        module = module.base
    return module, attr


def _assign(module: nn.Module, attr: str, tensor: torch.Tensor, key: str) -> None:
    current = getattr(module, attr, None)
    if not isinstance(current, torch.Tensor):
        raise CheckpointError(f"{key}: the model has no parameter {attr!r} here")
    if tuple(current.shape) != tuple(tensor.shape):
        raise CheckpointError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(current.shape)}")
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def _densify(model: Llama, key: str, module: NF4Linear) -> nn.Linear:
    """Swap a 4-bit slot for a dense layer (a checkpoint that left this projection unquantized)."""
    with torch.device("meta"):
        dense = dense_linear(module.in_features, module.out_features, module.bias is not None)
    model.get_submodule(key.rpartition(".")[0]).base = dense
    return dense


def load_model(
    folder: str | os.PathLike,
    *,
    quantize: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    backend: str | None = None,
) -> Llama:
    """Load a decoder for inference or QLoRA training.

    Args:
        folder: Hugging Face model folder (config.json + safetensors).
        quantize: projections as NF4Linear. A 4-bit checkpoint is used as stored; a full-precision one
            is quantized tensor by tensor with (quant_type, blocksize, double_quant). False keeps dense
            projections (a 4-bit checkpoint then cannot be loaded).
        compute_dtype: dtype of embeddings, norms, dense weights and activations.
        device: where the weights go.
        backend: NF4Linear kernel backend (None = CUDA -> Triton, CPU -> torch).

    Returns:
        Llama in eval mode with every weight frozen.

    Raises:
        UnsupportedArchitecture, CheckpointError, FormatError.
    """
    folder = Path(folder)
    cfg = load_config(folder)
    prequantized = is_prequantized(folder)
    if prequantized and not quantize:
        raise CheckpointError(f"{folder}: is a 4-bit checkpoint; load it with quantize=True")
    with torch.device("meta"):
        model = Llama(cfg, quantized=quantize, backend=backend)
    for path in safetensors_files(folder):
        with open_safetensors(path) as f:
            keys = list(f.keys())
            for name in quantized_weight_names(keys):
                entries = {k: f.get_tensor(k) for k in keys if k == name or k.startswith(name + ".")}
                module, _ = _target(model, name)
                if not isinstance(module, NF4Linear):
                    raise CheckpointError(f"{name}: stored 4-bit but the model expects a dense weight here")
                module.set_packed(from_entries(name, entries).to(device))
            packed = set(quantized_weight_names(keys))
            for key in keys:
                if key in packed or is_state_key(key):
                    continue
                if cfg.tie_word_embeddings and key == "lm_head.weight":
                    continue
                tensor = f.get_tensor(key)
                module, attr = _target(model, key)
                if isinstance(module, NF4Linear) and attr == "weight":
                    if prequantized or not should_quantize(key, tensor):
                        _assign(_densify(model, key, module), attr, tensor.to(device, compute_dtype), key)
                        continue
                    module.set_packed(quantize_4bit(tensor.to(device), quant_type, blocksize, double_quant, key))
                    continue
                _assign(module, attr, tensor.to(device, compute_dtype), key)
    _check_loaded(model, folder)
    model.init_rope(device)
    return model.eval()


def _check_loaded(model: Llama, folder: Path) -> None:
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_meta and n != "inv_freq"]
    missing += [n + ".weight" for n, m in model.named_modules() if isinstance(m, NF4Linear) and m._meta is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{folder}: checkpoint lacks {shown}")
