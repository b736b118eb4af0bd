"""One adapter as the registry (qserve/adapters.py) holds it: its tier (AdapterState), the registry's mutable
record of it (AdapterEntry, changed only under the registry's lock) and the frozen snapshot handed out to the
admin API, the scheduler and /metrics (AdapterInfo). Plain Python (no torch).
"""
import enum
import time
from dataclasses import dataclass


class AdapterState(enum.Enum):
    DISK = "disk"  # registered; not in memory
    LOADING = "loading"  # a loader call is running
    CPU = "cpu"  # in host memory
    RESIDENT = "resident"  # in a resident slot, usable by the batch


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """A snapshot of one adapter for the admin API and /metrics."""

    name: str
    path: str
    uid: int
    state: AdapterState
    nbytes: int | None
    in_flight: int
    running: int
    slot: int
    draining: bool
    load_time_s: float | None
    last_use: float | None = None  # wall-clock time (time.time()) of the last request or residency
    source: str = "store"  # hub: fetched from the Hub (HubSource); store: any other

    @property
    def tier(self) -> str:
        """resident, host, loading, or on disk its source: store or hub (qserve/store/stats.py's tiers)."""
        return {"resident": "resident", "cpu": "host", "loading": "loading", "disk": self.source}[self.state.value]


class AdapterEntry:
    """The registry's record of one adapter: where it is read from (`path`, `trusted`, `root`, `source`), its
    `state` and host `payload`, request counts (`refs` in flight, `pins` running), its resident `slot` (-1: none)
    and its LRU clock (`last_used`, the registry's counter; `last_use`, wall-clock time)."""

    __slots__ = ("name", "path", "trusted", "root", "uid", "source", "state", "payload", "nbytes", "refs", "pins",
                 "slot", "last_used", "last_use", "draining", "load_time_s")

    def __init__(self, name, path, trusted, uid, root=None, source="store"):
        self.name, self.path, self.trusted, self.root, self.uid, self.source = name, path, trusted, root, uid, source
        self.state, self.payload, self.nbytes, self.load_time_s = AdapterState.DISK, None, None, None
        self.refs = self.pins = 0
        self.slot, self.last_used, self.last_use, self.draining = -1, 0, None, False

    def touch(self, clock) -> None:
        self.last_used, self.last_use = next(clock), time.time()

    def info(self) -> AdapterInfo:
        return AdapterInfo(self.name, self.path, self.uid, self.state, self.nbytes, self.refs, self.pins,
                           self.slot, self.draining, self.load_time_s, self.last_use, self.source)
