"""One 4-bit Llama-family decoder with multi-adapter LoRA, shared by the trainer and the server."""
from .adapters import (
    adapter_ids,
    adapter_params,
    adapter_state,
    add_adapter,
    load_peft_adapter,
    remove_adapter,
    save_peft_adapter,
)
from .attention import AttentionMeta, KVCache, StaticKVCache, attend, build_meta
from .batch import Batch
from .config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeConfig, config_from_hf, load_config
from .errors import AdapterError, CheckpointError, ConfigError, ModelError, TokenizerError, UnsupportedArchitecture
from .generate import generate
from .llama import PROJECTIONS, Llama, RMSNorm
from .loading import load_model
from .lora import BASE_ONLY, LoraLinear
from .nf4_linear import NF4Linear
from .sampling import SamplingParams, sample
from .tokenizer import Tokenizer

__all__ = [
    "adapter_ids", "adapter_params", "adapter_state", "add_adapter", "load_peft_adapter", "remove_adapter",
    "save_peft_adapter", "AttentionMeta", "KVCache", "StaticKVCache", "attend", "build_meta", "Batch",
    "SUPPORTED_MODEL_TYPES", "ModelConfig", "RopeConfig", "config_from_hf", "load_config",
    "AdapterError", "CheckpointError", "ConfigError", "ModelError", "TokenizerError", "UnsupportedArchitecture",
    "generate", "PROJECTIONS", "Llama", "RMSNorm", "load_model", "BASE_ONLY", "LoraLinear", "NF4Linear",
    "SamplingParams", "sample", "Tokenizer",
]
