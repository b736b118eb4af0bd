"""What the bytes mean: NF4/FP4 codebooks, blockwise + double quantization, the 4-bit checkpoint
layout and PEFT's adapter layout. FORMAT.md at the repository root is the specification."""
from . import spec
from .codec import (
    NestedAbsmax,
    Packed4bit,
    QuantState,
    decode_absmax,
    dequantize_4bit,
    quantize_4bit,
    quantize_blockwise_8bit,
    sqnr_db,
    unpack_codes,
)
from .errors import (
    AdapterFormatError,
    CorruptQuantState,
    FormatError,
    MissingTensor,
    NonFiniteWeight,
    QloraKitError,
    ShapeMismatch,
    UnsupportedBlocksize,
    UnsupportedDtype,
    UnsupportedQuantType,
)
from .io import atomic_dir, atomic_file, load_safetensors, open_safetensors, read_header, save_safetensors, write_json
from .layout import (
    decode_state_json,
    encode_state_json,
    from_entries,
    is_state_key,
    quantization_config,
    quantized_weight_names,
    should_quantize,
    to_entries,
)
from .peft import LoraConfig, load_adapter, lora_pairs, save_adapter

__all__ = [
    "spec", "NestedAbsmax", "Packed4bit", "QuantState", "decode_absmax", "dequantize_4bit", "quantize_4bit",
    "quantize_blockwise_8bit", "sqnr_db", "unpack_codes",
    "AdapterFormatError", "CorruptQuantState", "FormatError", "MissingTensor", "NonFiniteWeight", "QloraKitError",
    "ShapeMismatch", "UnsupportedBlocksize", "UnsupportedDtype", "UnsupportedQuantType",
    "atomic_dir", "atomic_file", "load_safetensors", "open_safetensors", "read_header", "save_safetensors",
    "write_json", "decode_state_json", "encode_state_json", "from_entries", "is_state_key", "quantization_config",
    "quantized_weight_names", "should_quantize", "to_entries", "LoraConfig", "load_adapter", "lora_pairs", "save_adapter",
]
