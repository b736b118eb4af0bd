"""qconvert: turn Hugging Face checkpoints into NF4 double-quantized checkpoints (FORMAT.md), and
inspect, verify, dequantize and publish them.

The public names below are imported on first use (PEP 562), so `qconvert convert` does not load
Triton or the Hub client it does not need. The three entry points that share a name with their module
are reached through it: qconvert.convert.convert, qconvert.dequantize.dequantize,
qconvert.model_card.model_card (re-exporting them here would be shadowed by the submodule on import).
"""
import importlib

_EXPORTS = {
    "ConvertResult": "convert", "ConvertConfig": "options", "parse_size": "options",
    "inspect_checkpoint": "inspection", "Inspection": "inspection",
    "check_integrity": "verify", "compare": "verify", "VerifyResult": "verify",
    "SourceWeights": "source", "resolve": "source", "plan": "publish", "upload": "publish",
    "ConvertError": "errors",
    "SourceNotFound": "errors", "UnsupportedArchitecture": "errors", "UnsupportedSourceDtype": "errors",
    "InvalidOption": "errors", "VerifyFailed": "errors", "PublishError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qconvert' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
