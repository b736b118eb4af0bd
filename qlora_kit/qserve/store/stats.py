"""The adapter fleet's counters, recorded by the registry and exported on the server's prometheus_client registry.

Tiers: `resident` (a slot of the engine's per-row LoRA kernels), `host` (validated weights in host memory,
bounded by --cpu-adapter-budget), and on disk only: `hub` (fetched from the Hugging Face Hub, --adapter-hub-allow:
in the HF cache) or `store` (every other adapter: the adapter store, admin loads, start-up adapters). The two
disk tiers are the SOURCES a load reads from. Series:

- qserve:adapter_requests_total{tier}: requests by the tier their adapter was in when they arrived (hit rate of
  a tier = its share); tier="loading" when a load was already under way.
- qserve:adapter_loads_total{tier}: tier="host" reads from disk (store or hub) into host memory, tier="resident"
  installs into a slot.
- qserve:adapter_evictions_total{tier}: tier="resident" slot -> host, tier="host" host -> disk (dropped).
- qserve:adapter_load_seconds{source}, qserve:adapter_load_failures_total{source} (qserve/metrics.py's): load
  latency (read + validate) and failed loads, by the disk tier read: source="store" or source="hub".
- qserve:adapter_host_bytes / qserve:adapter_host_budget_bytes / qserve:adapter_host_peak_bytes: gauges.
- qserve:adapter_requests_waiting: queued requests whose adapter is not resident (sampled at scrape time).
"""
import threading
from collections import Counter
from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

SOURCES = ("store", "hub")  # the disk tiers, and the `source` label values of the load metrics
TIERS = ("resident", "host", "loading", *SOURCES)


class FleetStats:
    """Thread-safe counters of the adapter tiers (plain Python), exported through `families`."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = dict.fromkeys(TIERS, 0)
        self.loads = {"host": 0, "resident": 0}
        self.evictions = {"host": 0, "resident": 0}
        self.host_drops: Counter[str] = Counter()  # host -> store evictions per adapter name
        self.host_bytes = self.host_peak_bytes = 0
        self.host_budget_bytes: int | None = None

    def request(self, tier: str) -> None:
        with self._lock:
            self.requests[tier] += 1

    def loaded(self, tier: str) -> None:
        with self._lock:
            self.loads[tier] += 1

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
                    "host_budget_bytes": self.host_budget_bytes}

    def families(self, metrics, waiting: Callable[[], int] | None = None) -> Callable[[], list]:
        """A scrape callback for `metrics.on_scrape` (qserve/metrics.py) building these series with label
        model_name first; `waiting()` gives the requests-waiting-for-an-adapter gauge (None: not exported).
        Load latency is metrics' own `qserve:adapter_load_seconds{source}` histogram, observed where loads run."""

        def scrape() -> list:
            snap = self.snapshot()
            out = []
            for key, name, doc in (("requests", "qserve:adapter_requests", "Requests by the tier their adapter was "
                                    "in on arrival"),
                                   ("loads", "qserve:adapter_loads", "Adapter loads into a tier (host: read from "
                                    "the store; resident: installed into a slot)"),
                                   ("evictions", "qserve:adapter_evictions", "Adapters evicted from a tier")):
                fam = CounterMetricFamily(name, doc, labels=["model_name", "tier"])
                for tier, n in snap[key].items():
                    fam.add_metric([metrics.model_name, tier], n)
                out.append(fam)
            gauges = [("qserve:adapter_host_bytes", "Adapter bytes held in host memory", snap["host_bytes"]),
                      ("qserve:adapter_host_peak_bytes", "Most adapter bytes held in host memory so far",
                       snap["host_peak_bytes"])]
            if snap["host_budget_bytes"] is not None:
                gauges.append(("qserve:adapter_host_budget_bytes", "The host tier's byte budget "
                               "(--cpu-adapter-budget)", snap["host_budget_bytes"]))
            if waiting is not None:
                gauges.append(("qserve:adapter_requests_waiting", "Queued requests whose adapter is not resident",
                               waiting()))
            for name, doc, value in gauges:
                fam = GaugeMetricFamily(name, doc, labels=["model_name"])
                fam.add_metric([metrics.model_name], value)
                out.append(fam)
            return out

        return scrape
