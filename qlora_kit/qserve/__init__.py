"""qserve: one 4-bit base, many hot-swappable LoRA adapters, OpenAI-compatible HTTP API.

The engine core (scheduler, block manager, adapter registry, config) is plain Python; torch enters only through
the model runner, engine loop and server (qserve.engine.runner / .engine / qserve.server), not imported here.
"""
from .adapters import AdapterInfo, AdapterRegistry, AdapterState, RegistryConfig
from .config import ServeConfig
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
    BodyTooLarge,
    Forbidden,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    RequestNotFound,
    ServeError,
    Unauthorized,
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
    "BodyTooLarge",
    "Forbidden",
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
    "ServeConfig",
    "ServeError",
    "Unauthorized",
]
