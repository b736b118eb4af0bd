"""qserve's Prometheus metrics through prometheus_client, on one CollectorRegistry per server (so servers in one
process, e.g. tests, never share counters).

Names follow vLLM where vLLM has the metric (`vllm:*`, label `model_name` = the served base name), so dashboards
built for `vllm serve` work unchanged; qserve's own names (`qserve:*`, same `model_name` label first) carry what
vLLM has no name for: per-adapter and per-tenant request and token counts, adapter loads.

- `Metrics`: the registry, the per-request families the HTTP app records for both backends through
  `RequestRecord` (`adapter` "" = the base, `tenant` "" = no authentication), and the way any other module adds
  its own families to the same registry: `counter()` / `gauge()` / `histogram()` (labels after `model_name`; bind
  them with `labels(family, ...)`), or `on_scrape(fn)` for values read at scrape time.
- `EngineMetrics`: the vLLM-named families of the native engine. The vLLM backend does not register them: the
  front appends vLLM's own /metrics text, which has them.

Plain Python (no torch): importable by the torch-free parts of qserve.
"""
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .store.stats import SOURCES

# seconds; vLLM-like spread from 1 ms to 2 min
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 120.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Callback:
    """A collector whose families are built by `fn()` at each scrape."""

    def __init__(self, fn: Callable[[], Iterable[Metric]]):
        self.fn = fn

    def collect(self):
        return list(self.fn())

    def describe(self):
        return []  # names unknown until scraped: the registry does not check them for duplicates


class Metrics:
    """One server's metric registry and its per-request families (api/app.py records them for every backend).

    Args:
        model_name: the served base name, the `model_name` label of every family.

    Attributes:
        registry: the prometheus_client CollectorRegistry `/metrics` renders.
        requests, prompt_tokens, generation_tokens: counters labelled (adapter, tenant, status) / (adapter, tenant);
            `qserve:requests_total`, `qserve:prompt_tokens_total`, `qserve:generation_tokens_total`.
        ttft, latency: histograms labelled (adapter,): `qserve:time_to_first_token_seconds`,
            `qserve:e2e_request_latency_seconds`.
        adapter_load_seconds, adapter_load_failures: histogram and counter labelled (source,), the disk tier
            the adapter was read from (store or hub, qserve/store/stats.py's SOURCES; both series exist from the
            start): `qserve:adapter_load_seconds`, `qserve:adapter_load_failures_total`.
    """

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = self.counter("qserve:requests", "Requests finished, by adapter, tenant and status (a finish "
                                     "reason, or rejected: refused before running)", ("adapter", "tenant", "status"))
        self.prompt_tokens = self.counter("qserve:prompt_tokens", "Prompt tokens of finished requests",
                                          ("adapter", "tenant"))
        self.generation_tokens = self.counter("qserve:generation_tokens", "Tokens generated for finished requests",
                                              ("adapter", "tenant"))
        self.ttft = self.histogram("qserve:time_to_first_token_seconds", "Arrival to first token, by adapter",
                                   ("adapter",))
        self.latency = self.histogram("qserve:e2e_request_latency_seconds", "Arrival to finish, by adapter",
                                      ("adapter",))
        self.adapter_load_seconds = self.histogram("qserve:adapter_load_seconds", "Time to read and validate one "
                                                   "adapter, by source (store or hub)", ("source",))
        self.adapter_load_failures = self.counter("qserve:adapter_load_failures", "Adapter loads refused or failed, "
                                                  "by source (store or hub)", ("source",))
        for source in SOURCES:  # every series shown from the start, zero until its first load
            self.labels(self.adapter_load_seconds, source)
            self.labels(self.adapter_load_failures, source)

    # -- adding families (any module) ---------------------------------------------------------------------
    def counter(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
        """A Counter on this registry with labels (model_name, *labels); exported as `<name>_total`."""
        return Counter(name, documentation, ("model_name", *labels), registry=self.registry)

    def gauge(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
        """A Gauge on this registry with labels (model_name, *labels)."""
        return Gauge(name, documentation, ("model_name", *labels), registry=self.registry)

    def histogram(self, name: str, documentation: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
        """A Histogram on this registry with labels (model_name, *labels)."""
        return Histogram(name, documentation, ("model_name", *labels), registry=self.registry, buckets=buckets)

    def labels(self, family, *values: str):
        """The child of `family` for this server's model_name and the other label `values`, in order."""
        return family.labels(self.model_name, *values)

    def adapter_loaded(self, source: str, seconds: float) -> None:
        """One adapter load from disk tier `source` (store or hub) took `seconds` (read + validate)."""
        self.labels(self.adapter_load_seconds, source).observe(seconds)

    def adapter_load_failed(self, source: str) -> None:
        """One adapter load from disk tier `source` was refused or failed."""
        self.labels(self.adapter_load_failures, source).inc()

    def on_scrape(self, fn: Callable[[], Iterable[Metric]]) -> None:
        """Register `fn`, called at each scrape, returning families built with `family()`."""
        self.registry.register(_Callback(fn))

    def family(self, kind: str, name: str, documentation: str, value: float, **labels: str) -> Metric:
        """A one-sample gauge or counter family for `on_scrape` callbacks (model_name label added)."""
        names = ["model_name", *labels]
        fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, documentation, labels=names)
        fam.add_metric([self.model_name, *labels.values()], value)
        return fam

    # -- requests (the HTTP app) --------------------------------------------------------------------------
    def record(self, adapter: str | None, tenant: str | None) -> "RequestRecord":
        """A RequestRecord for one request to `adapter` (None = the base) by `tenant` (None = no auth)."""
        return RequestRecord(self, adapter or "", tenant or "")

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0.0 when absent), model_name filled in: e.g. value("qserve:requests_total",
        adapter="a", tenant="", status="stop")."""
        v = self.registry.get_sample_value(name, {"model_name": self.model_name, **labels})
        return 0.0 if v is None else v

    def render(self) -> str:
        """The Prometheus text exposition of every family on the registry."""
        return generate_latest(self.registry).decode()


class RequestRecord:
    """One request as the HTTP app counts it: its labels and clock. The backend calls `first_token()` when the
    first text or token is out and `finish()` once at the end (later calls do nothing)."""

    def __init__(self, metrics: Metrics, adapter: str, tenant: str):
        self.metrics, self.adapter, self.tenant = metrics, adapter, tenant
        self.start = time.monotonic()
        self.first_at: float | None = None
        self.done = False

    def first_token(self) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()
            self.metrics.labels(self.metrics.ttft, self.adapter).observe(self.first_at - self.start)

    def finish(self, status: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Count the request under `status` (stop, length, cancelled, error or rejected) with its tokens."""
        if self.done:
            return
        self.done = True
        m = self.metrics
        m.labels(m.requests, self.adapter, self.tenant, status).inc()
        m.labels(m.prompt_tokens, self.adapter, self.tenant).inc(prompt_tokens)
        m.labels(m.generation_tokens, self.adapter, self.tenant).inc(completion_tokens)
        m.labels(m.latency, self.adapter).observe(time.monotonic() - self.start)


# the native engine's finish reasons as vLLM's finished_reason label values
_VLLM_REASON = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "abort"}


class EngineMetrics:
    """The native engine's families under vLLM's names (label model_name), recorded by the engine thread, plus
    scrape-time gauges and counters read from `stats()`.

    Args:
        metrics: the server's Metrics (the families go on its registry).
        stats: called at each scrape; returns the scheduler/registry counts named in `SCRAPED`.
    """

    # stats() key -> (kind, name, help)
    SCRAPED = {
        "running": ("gauge", "vllm:num_requests_running", "Number of requests in model execution batches."),
        "waiting": ("gauge", "vllm:num_requests_waiting", "Number of requests waiting to be processed."),
        "kv_usage": ("gauge", "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
        "preemptions": ("counter", "vllm:num_preemptions", "Cumulative number of preemptions from the engine."),
        "prefix_queries": ("counter", "vllm:prefix_cache_queries", "Prefix cache queries, in terms of tokens."),
        "prefix_hits": ("counter", "vllm:prefix_cache_hits", "Prefix cache hits, in terms of tokens."),
        "steps": ("counter", "qserve:engine_steps", "Model steps run."),
        "adapters_registered": ("gauge", "qserve:adapters_registered", "Adapters registered."),
        "adapters_resident": ("gauge", "qserve:adapters_resident", "Adapters in resident slots."),
    }

    def __init__(self, metrics: Metrics, stats: Callable[[], dict]):
        m = self.metrics = metrics
        self.prompt_tokens = m.labels(m.counter("vllm:prompt_tokens", "Number of prefill tokens processed."))
        self.generation_tokens = m.labels(m.counter("vllm:generation_tokens", "Number of generation tokens processed."))
        self.success = m.counter("vllm:request_success", "Count of successfully processed requests.",
                                 ("finished_reason",))
        self.ttft = m.labels(m.histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token "
                                         "in seconds."))
        self.tpot = m.labels(m.histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token "
                                         "in seconds."))
        self.e2e = m.labels(m.histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in "
                                        "seconds."))
        self.prompt_len = m.labels(m.histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                               buckets=TOKEN_BUCKETS))
        self.output_len = m.labels(m.histogram("vllm:request_generation_tokens", "Number of generation tokens "
                                               "processed.", buckets=TOKEN_BUCKETS))
        self._stats = stats
        m.on_scrape(self._scrape)

    def finished(self, reason: str, prompt_tokens: int, output_tokens: int, latency_s: float) -> None:
        """One request left the engine (any reason)."""
        self.success.labels(self.metrics.model_name, _VLLM_REASON.get(reason, "abort")).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.prompt_len.observe(prompt_tokens)
        self.output_len.observe(output_tokens)
        self.e2e.observe(latency_s)

    def _scrape(self):
        s = self._stats()
        return [self.metrics.family(kind, name, doc, s[key]) for key, (kind, name, doc) in self.SCRAPED.items()]
