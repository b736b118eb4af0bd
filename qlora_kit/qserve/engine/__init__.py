"""The torch-free engine core: request state, paged KV block manager and continuous-batching scheduler."""
from .block_manager import Block, BlockManager, block_hash
from .request import FinishReason, Request, RequestStatus, SamplingParams
from .scheduler import ScheduledBatch, ScheduledRequest, Scheduler, SchedulerConfig

__all__ = [
    "Block",
    "BlockManager",
    "FinishReason",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "ScheduledBatch",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "block_hash",
]
