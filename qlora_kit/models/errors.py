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
    """A LoRA adapter that does not fit the model (unknown module, wrong shape, unknown or duplicate id).

    `reason` is the verdict alone; `folder`, when known, the adapter folder (the message is "folder: reason").
    Consumers that name the adapter their own way (qserve: by its served name) reuse `reason` verbatim.
    """

    def __init__(self, reason: str, folder=None):
        super().__init__(reason if folder is None else f"{folder}: {reason}")
        self.reason, self.folder = reason, folder


class TokenizerError(ModelError):
    """A tokenizer folder without tokenizer.json, or a chat template that cannot be rendered."""


class SamplingError(ModelError, ValueError):
    """A sampling setting out of range (e.g. top_p=2): the message names the field and the allowed range."""
