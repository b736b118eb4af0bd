"""Errors raised by models/: one subclass of QloraKitError per failure mode, messages name the field or file."""
from qlora_kit.formats.errors import QloraKitError


class ModelError(QloraKitError):
    """Base class of models/ errors."""


class UnsupportedArchitecture(ModelError):
    """config.json names a model type or RoPE scaling the decoder does not implement."""


class ConfigError(ModelError, ValueError):
    """A config.json that is not a JSON object, lacks a field the decoder needs, or holds a value out of range."""


class CheckpointError(ModelError):
    """A checkpoint folder lacks a tensor the decoder needs, or holds one it cannot place."""


class AdapterError(ModelError):
    """A LoRA adapter that does not fit the model (unknown module, wrong shape, unknown or duplicate id)."""


class TokenizerError(ModelError):
    """A tokenizer folder without tokenizer.json, or a chat template that cannot be rendered."""
