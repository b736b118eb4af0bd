"""The adapter fleet's counters, recorded by the registry and rendered into /metrics (Prometheus text).

Tiers: `resident` (a slot of the engine's per-row LoRA kernels), `host` (validated weights in host memory,
bounded by --cpu-adapter-budget) and `store` (only on disk). Series:

- qserve:adapter_requests_total{tier}: requests by the tier their adapter was in when they arrived (hit rate of
  a tier = its share); tier="loading" when a load was already under way.
- qserve:adapter_loads_total{tier}: tier="host" reads from the store into host memory, tier="resident" installs
  into a slot.
- qserve:adapter_evictions_total{tier}: tier="resident" slot -> host, tier="host" host -> store (dropped).
- qserve:adapter_load_seconds: histogram of store -> host load latency (read + validate).
- qserve:adapter_host_bytes / qserve:adapter_host_budget_bytes / qserve:adapter_host_peak_bytes: gauges.
- qserve:adapter_requests_waiting: queued requests whose adapter is not resident (sampled at scrape time).
"""
import threading
from collections import Counter

from ..metrics import Histogram, _labels

TIERS = ("resident", "host", "loading", "store")


class FleetStats:
    """Thread-safe counters of the adapter tiers (plain Python)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = dict.fromkeys(TIERS, 0)
        self.loads = {"host": 0, "resident": 0}
        self.evictions = {"host": 0, "resident": 0}
        self.host_drops: Counter[str] = Counter()  # host -> store evictions per adapter name
        self.load_seconds = Histogram()
        self.host_bytes = self.host_peak_bytes = 0
        self.host_budget_bytes: int | None = None

    def request(self, tier: str) -> None:
        with self._lock:
            self.requests[tier] += 1

    def loaded(self, tier: str, seconds: float | None = None) -> None:
        with self._lock:
            self.loads[tier] += 1
            if seconds is not None:
                self.load_seconds.observe(seconds)

    def evicted(self, tier: str, name: str | None = None) -> None:
        with self._lock:
            self.evictions[tier] += 1
            if tier == "host" and name is not None:
                self.host_drops[name] += 1

    def host(self, used: int) -> None:
        """Record the host tier's bytes after a change (the peak is what tests hold against the budget)."""
        with self._lock:
            self.host_bytes = used
            self.host_peak_bytes = max(self.host_peak_bytes, used)

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": dict(self.requests), "loads": dict(self.loads), "evictions": dict(self.evictions),
                    "host_bytes": self.host_bytes, "host_peak_bytes": self.host_peak_bytes,
                    "host_budget_bytes": self.host_budget_bytes, "load_seconds_count": self.load_seconds.count,
                    "load_seconds_sum": self.load_seconds.sum}

    def render(self, waiting: int | None = None) -> str:
        """Prometheus text for these series; `waiting` is the requests-waiting-for-an-adapter gauge."""
        lines = []

        def family(name, kind, help_, series):
            lines.extend([f"# HELP qserve:{name} {help_}", f"# TYPE qserve:{name} {kind}"])
            lines.extend(f"qserve:{name}{_labels(lb)} {v}" for lb, v in series)

        with self._lock:
            family("adapter_requests_total", "counter", "Requests by the tier their adapter was in on arrival",
                   [({"tier": t}, n) for t, n in self.requests.items()])
            family("adapter_loads_total", "counter", "Adapter loads into a tier (host: read from the store)",
                   [({"tier": t}, n) for t, n in self.loads.items()])
            family("adapter_evictions_total", "counter", "Adapters evicted from a tier",
                   [({"tier": t}, n) for t, n in self.evictions.items()])
            lines.extend(["# HELP qserve:adapter_load_seconds Store to host load latency (read and validate)",
                          "# TYPE qserve:adapter_load_seconds histogram"])
            lines.extend(self.load_seconds.lines("qserve:adapter_load_seconds"))
            family("adapter_host_bytes", "gauge", "Adapter bytes held in host memory", [({}, self.host_bytes)])
            family("adapter_host_peak_bytes", "gauge", "Most adapter bytes held in host memory so far",
                   [({}, self.host_peak_bytes)])
            if self.host_budget_bytes is not None:
                family("adapter_host_budget_bytes", "gauge", "The host tier's byte budget (--cpu-adapter-budget)",
                       [({}, self.host_budget_bytes)])
        if waiting is not None:
            family("adapter_requests_waiting", "gauge", "Queued requests whose adapter is not resident",
                   [({}, waiting)])
        return "\n".join(lines) + "\n"
