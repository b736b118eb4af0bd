"""qserve: one 4-bit base, many hot-swappable LoRA adapters, OpenAI-compatible HTTP API.

The engine core (scheduler, block manager, adapter registry) is plain Python; torch enters only through the
model runner, which is not imported here.
"""
from .adapters import AdapterInfo, AdapterRegistry, AdapterState, RegistryConfig
from .engine import (
    BlockManager,
    FinishReason,
    Request,
    RequestStatus,
    SamplingParams,
    ScheduledBatch,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
)
from .errors import (
    AdapterExists,
    AdapterNotFound,
    AdapterPathRefused,
    AdapterRefused,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    RequestNotFound,
    ServeError,
)

__all__ = [
    "AdapterExists",
    "AdapterInfo",
    "AdapterNotFound",
    "AdapterPathRefused",
    "AdapterRefused",
    "AdapterRegistry",
    "AdapterState",
    "BlockManager",
    "FinishReason",
    "InvalidRequest",
    "PromptTooLong",
    "QueueFull",
    "Request",
    "RequestNotFound",
    "RequestStatus",
    "SamplingParams",
    "ScheduledBatch",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "ServeError",
]
