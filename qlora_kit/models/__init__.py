"""One 4-bit Llama-family decoder with multi-adapter LoRA, shared by the trainer and the server.

Names are re-exported lazily (as in formats/), so the torch-free parts (errors, sampling_params) can be imported
by qserve's torch-free engine core without loading torch.
"""
import importlib

_EXPORTS = {
    **dict.fromkeys(("MAX_RANK", "AdapterPayload", "adapter_ids", "adapter_params", "adapter_state", "add_adapter",
                     "base_names", "install_adapter", "load_peft_adapter", "projection_shapes",
                     "read_peft_adapter", "remove_adapter", "save_peft_adapter"), "adapters"),
    **dict.fromkeys(("AttentionMeta", "KVCache", "StaticKVCache", "attend", "build_meta"), "attention"),
    "Batch": "batch",
    **dict.fromkeys(("SUPPORTED_MODEL_TYPES", "ModelConfig", "RopeConfig", "config_from_hf", "load_config"), "config"),
    **dict.fromkeys(("AdapterError", "CheckpointError", "ConfigError", "ModelError", "SamplingError",
                     "TokenizerError", "UnsupportedArchitecture"), "errors"),
    "generate": "generation",  # not generate.py: a submodule of that name would shadow the function
    **dict.fromkeys(("PROJECTIONS", "Llama", "RMSNorm"), "llama"),
    "load_model": "loading",
    **dict.fromkeys(("BASE_ONLY", "LoraLinear"), "lora"),
    "NF4Linear": "nf4_linear",
    "sample": "sampling",
    "SamplingParams": "sampling_params",
    "Tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qlora_kit.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
