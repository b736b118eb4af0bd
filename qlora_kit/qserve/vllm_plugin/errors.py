"""Errors of the vLLM plugin, under qserve's ServeError. Messages name the tensor, layer or flag at fault."""
from ..errors import ServeError


class PluginError(ServeError):
    """Base class of the vLLM plugin's errors."""


class ShardSplitError(PluginError):
    """A 4-bit weight cannot be cut into this tensor-parallel shard on quantization-block boundaries."""


class CheckpointMismatch(PluginError):
    """The checkpoint and vLLM's model disagree: a tensor with no layer, a layer with no tensor, a bad config."""


class BackendStartError(PluginError):
    """vLLM's server process (qserve serve --backend vllm) exited or did not become ready in time."""
