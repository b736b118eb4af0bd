"""What the bytes mean: NF4/FP4 codebooks, blockwise + double quantization, the 4-bit checkpoint
layout (its one reader, Checkpoint, and one writer, ShardWriter) and PEFT's adapter layout. FORMAT.md at the
repository root is the specification.

Names are re-exported lazily, so `formats.errors` (plain Python) can be imported without torch.
"""
import importlib

_EXPORTS = {
    "spec": None,
    "codec": None,
    "errors": None,
    "io": None,
    "layout": None,
    "peft": None,
    "shards": None,
    "checkpoint": None,
    "Checkpoint": "checkpoint",
    "ShardWriter": "shards",
    **dict.fromkeys(("NestedAbsmax", "Packed4bit", "QuantState", "decode_absmax", "dequantize_4bit", "quantize_4bit",
                     "quantize_blockwise_8bit", "sqnr_db", "unpack_codes"), "codec"),
    **dict.fromkeys(("AdapterFormatError", "CorruptQuantState", "FormatError", "MissingTensor", "NonFiniteWeight",
                     "QloraKitError", "ShapeMismatch", "UnsupportedBlocksize", "UnsupportedDtype",
                     "UnsupportedQuantType"), "errors"),
    **dict.fromkeys(("atomic_dir", "atomic_file", "index_shards", "load_safetensors", "open_safetensors",
                     "read_header", "read_json_object", "safetensors_files", "save_safetensors", "write_json"),
                   "io"),
    **dict.fromkeys(("decode_state_json", "encode_state_json", "from_entries", "is_state_key", "quantization_config",
                     "plain_config", "quantized_weight_names", "should_quantize", "to_entries"), "layout"),
    **dict.fromkeys(("LoraConfig", "load_adapter", "lora_pairs", "save_adapter"), "peft"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'formats' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name] or name}", __name__)
    value = module if _EXPORTS[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
