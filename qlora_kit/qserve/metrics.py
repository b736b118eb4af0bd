"""Counters, gauges and histograms rendered in the Prometheus text exposition format (version 0.0.4).

Plain Python, thread-safe, no client library: the engine thread records, `/metrics` renders.
"""
import bisect
import threading

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in sorted(labels.items()))
    return "{" + body + "}"


class Histogram:
    """Cumulative-bucket histogram of one series."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for le, n in zip(self.buckets + (float("inf"),), self.counts):
            acc += n
            out.append(f'{name}_bucket{{le="{"+Inf" if le == float("inf") else le}"}} {acc}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    """The server's metrics; names are prefixed `qserve_`."""

    HELP = {
        "requests_total": ("counter", "Finished requests by finish reason"),
        "prompt_tokens_total": ("counter", "Prompt tokens processed"),
        "generation_tokens_total": ("counter", "Tokens generated"),
        "request_latency_seconds": ("histogram", "End-to-end request latency"),
        "time_to_first_token_seconds": ("histogram", "Time from arrival to the first generated token"),
        "adapter_load_seconds": ("histogram", "Time to read and validate one adapter"),
        "adapter_load_failures_total": ("counter", "Adapter loads refused or failed"),
    }

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.sections: list = []  # callables returning more Prometheus text (qserve/store/stats.py's series)
        self.hists = {"request_latency_seconds": Histogram(), "time_to_first_token_seconds": Histogram(),
                      "adapter_load_seconds": Histogram()}

    def inc(self, name: str, value: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.hists[name].observe(value)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """Text exposition; `gauges` maps name -> (help, value) sampled at scrape time."""
        lines = []
        with self._lock:
            by_name: dict[str, list] = {}
            for (name, labels), v in self.counters.items():
                by_name.setdefault(name, []).append((dict(labels), v))
            for name, (kind, help_) in self.HELP.items():
                full = f"qserve_{name}"
                lines += [f"# HELP {full} {help_}", f"# TYPE {full} {kind}"]
                if kind == "histogram":
                    lines += self.hists[name].lines(full)
                else:
                    series = by_name.get(name) or [({}, 0)]
                    lines += [f"{full}{_labels(lb)} {v}" for lb, v in series]
        for name, (help_, value) in gauges.items():
            full = f"qserve_{name}"
            lines += [f"# HELP {full} {help_}", f"# TYPE {full} gauge", f"{full} {value}"]
        return "\n".join(lines) + "\n" + "".join(section() for section in self.sections)
