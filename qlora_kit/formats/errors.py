"""Errors raised by formats/. Every package's errors derive from `QloraKitError`.

Messages name the tensor, file or field at fault and, where there is one, the fix.
"""


class QloraKitError(Exception):
    """Base class of every error qlora-kit raises on bad input or failed work."""


class FormatError(QloraKitError):
    """A tensor, file or checkpoint does not follow FORMAT.md."""


class NonFiniteWeight(FormatError):
    """A weight to quantize holds NaN or Inf."""


class UnsupportedBlocksize(FormatError):
    """A blocksize that is not a power of two in the supported range."""


class UnsupportedDtype(FormatError):
    """A dtype the codec or layout cannot take."""


class UnsupportedQuantType(FormatError):
    """A quant_type other than nf4 or fp4."""


class CorruptQuantState(FormatError):
    """A quant_state JSON blob that is truncated, unparsable or inconsistent."""


class ShapeMismatch(FormatError):
    """Packed data, absmax or declared shape disagree."""


class MissingTensor(FormatError):
    """A tensor the layout requires is absent."""


class AdapterFormatError(FormatError):
    """A LoRA adapter folder that is not in PEFT's layout."""
