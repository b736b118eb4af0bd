"""Errors raised by qconvert/. All derive from QloraKitError, so the CLI prints one line and exits 2.

Messages name the folder, file, tensor or config field at fault and, where there is one, the fix.
"""
from qlora_kit._cli.errors import InvalidOption  # noqa: F401  (shared with qtrain merge; qconvert's public name)
from qlora_kit.formats.errors import QloraKitError


class ConvertError(QloraKitError):
    """Base class of qconvert's own errors."""


class SourceNotFound(ConvertError):
    """SRC is neither an existing folder nor a Hub repo that can be fetched."""


class UnsupportedArchitecture(ConvertError):
    """config.json names a model outside the Llama family (llama, mistral, qwen2, qwen3)."""


class UnsupportedSourceDtype(ConvertError):
    """A source tensor's dtype is not float32, float16 or bfloat16 (or the source is already quantized)."""


class VerifyFailed(ConvertError):
    """A checkpoint failed integrity or error-threshold checks."""


class PublishError(ConvertError):
    """Creating the Hub repo or uploading failed."""
