"""Scheduling core: pure Python, no torch, no clock. Shared by the engine and the simulator."""

from flashserve.core.block_manager import BlockManager
from flashserve.core.records import RequestRecord, StepRecord
from flashserve.core.request import Request, RequestStatus, StopCriteria
from flashserve.core.scheduler import (
    BATCHING_POLICIES,
    KV_ALLOCATIONS,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    to_record,
)

__all__ = [
    "BATCHING_POLICIES",
    "KV_ALLOCATIONS",
    "BlockManager",
    "Request",
    "RequestRecord",
    "RequestStatus",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "StepRecord",
    "StopCriteria",
    "to_record",
]
