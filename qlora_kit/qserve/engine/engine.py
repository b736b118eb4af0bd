"""The step loop: admit, schedule, run, sample, detokenize, check stop strings, stream to each request.

One background thread owns the model. HTTP handlers call `add` (validates and queues synchronously, so
404/413/429 are raised to the caller) and read `RequestHandle` as an async iterator of `Output`s; leaving the
iterator early (client disconnected) cancels the request, which the scheduler frees at its next step.
Adapters that queued requests need are loaded by a worker pool (never on the loop), then made resident at
admission; a load that fails ends its waiting requests with an error instead of serving them on the base.
"""
import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from ..adapters import AdapterRegistry, RegistryConfig
from ..errors import InvalidRequest, SamplingFailed, ServeError
from ..metrics import EngineMetrics, Metrics
from ..store import AdapterStore, HubSource
from ..store.stats import SOURCES
from .block_manager import BlockManager
from .detokenizer import Detokenizer
from .lora import evict, install, read_adapter
from .request import FinishReason, Request, SamplingParams  # models.SamplingParams
from .runner import ModelRunner
from .scheduler import Scheduler, SchedulerConfig

log = logging.getLogger("qserve")
LOAD_WORKERS = 4  # adapter reads run in this pool, never on the step loop; one job per adapter (de-duplicated)


@dataclass(frozen=True, slots=True)
class Output:
    """One streamed update: new text and token ids; `finish_reason` set on the last one."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None


class RequestHandle:
    """Async iterator over a request's Outputs; closing it early cancels the request."""

    def __init__(self, engine: "Engine", request: Request):
        self.engine, self.request = engine, request
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def _push(self, out: Output) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)
        except RuntimeError:  # the client's event loop is gone
            self.request.cancel()

    async def get(self) -> Output:
        """The next Output (safe to cancel: the request keeps running until `close`)."""
        return await self._queue.get()

    def close(self) -> None:
        """Cancel the request unless it already finished (client gone)."""
        if not self.request.is_finished:
            self.engine.cancel(self.request)

    async def __aiter__(self):
        try:
            while True:
                out = await self._queue.get()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            self.close()


class Engine:
    """Scheduler + block manager + adapter registry + model runner, driven by one thread.

    Args:
        model: models.Llama; tokenizer: models.Tokenizer.
        config: qserve.config.ServeConfig.
        base_names: names of the served base accepted in adapters' base_model_name_or_path.
    """

    def __init__(self, model, tokenizer, config, base_names: tuple[str, ...] = ()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.max_model_len = min(config.max_model_len, model.cfg.max_position_embeddings)
        self.runner = ModelRunner(model, config.num_blocks, config.block_size)
        self.registry = AdapterRegistry(
            RegistryConfig(allowed_root=config.allowed_root, max_loras=config.max_loras,
                           max_cpu_loras=config.max_cpu_loras, cpu_budget_bytes=config.cpu_budget_bytes),
            # an LRU-evicted slot keeps its weights for the next install to overwrite in place (engine/lora.py
            # install); an unloaded adapter's are dropped (on_remove)
            loader=self._load, on_resident=self._install, on_remove=self._clear,
            store=None if config.adapter_store is None else AdapterStore(config.adapter_store),
            hub=HubSource(config.adapter_hub_allow) if config.adapter_hub_allow else None)
        self.base_names = tuple(base_names) + tuple(config.base_names)
        self.lora_dtype = model.dtype if config.lora_dtype == "auto" else getattr(torch, config.lora_dtype)
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, max_waiting=config.max_waiting,
            adapter_age_cap_s=config.adapter_age_cap_s), self.blocks, self.registry)
        self.metrics = Metrics(config.served_name)  # the app records per-request families on it too
        self.engine_metrics = EngineMetrics(self.metrics, self.stats)
        self.metrics.on_scrape(self.registry.stats.families(self.metrics, self.scheduler.waiting_for_adapters))
        self._lock = threading.Lock()  # the scheduler is single-threaded: add/schedule/update/finish under it
        self._wake = threading.Event()
        self._handles: dict[str, RequestHandle] = {}
        self._text: dict[str, Detokenizer] = {}
        self._t0: dict[str, float] = {}
        self._tlast: dict[str, float] = {}  # when each request's last token was out (time per output token)
        self._loads: dict[str, object] = {}
        self._loads_lock = threading.Lock()  # _start_loads runs on the loop and, for a request's first use, in add
        self._pool = ThreadPoolExecutor(max_workers=LOAD_WORKERS, thread_name_prefix="qserve-load")
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    # -- adapter callbacks ----------------------------------------------------------------------------------
    def _load(self, name: str, path: str):
        t0, source = time.perf_counter(), self.registry.source(name)
        try:
            out = read_adapter(self.model, name, path, self.base_names, dtype=self.lora_dtype)
        except ServeError:
            self.metrics.adapter_load_failed(source)
            raise
        self.metrics.adapter_loaded(source, time.perf_counter() - t0)
        return out

    def _install(self, name, payload, slot):
        with self.runner.lock:
            install(self.model, payload, slot)

    def _clear(self, name, slot):
        with self.runner.lock:
            evict(self.model, slot)

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run_loop, name="qserve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- intake ---------------------------------------------------------------------------------------------
    def add(self, prompt_ids: list[int], sampling: SamplingParams, adapter: str | None = None,
            tenant: str | None = None) -> RequestHandle:
        """Queue a request (call from the event loop); `tenant` salts the prefix cache.
        Raises ServeError subclasses (404, 413, 429, 400)."""
        limit = self.config.max_tokens_limit
        if sampling.max_tokens > limit:
            raise InvalidRequest(f"max_tokens={sampling.max_tokens}: must be an integer <= {limit}")
        stops = () if sampling.ignore_eos else tuple(self.tokenizer.stop_token_ids)
        sp = replace(sampling, stop_token_ids=tuple(sorted(set(sampling.stop_token_ids) | set(stops))))
        req = Request(prompt_ids, sp, adapter, tenant=tenant)
        handle = RequestHandle(self, req)
        with self._lock:
            self.scheduler.add(req)
            self._handles[req.request_id] = handle
            self._text[req.request_id] = Detokenizer(self.tokenizer, sp.stop)
            self._t0[req.request_id] = time.perf_counter()
        if adapter is not None and self.registry.tier(adapter) in SOURCES:
            self._start_loads([adapter])  # now, not after the step under way: a cold adapter's read starts at once
        self._wake.set()
        return handle

    def cancel(self, request: Request) -> None:
        request.cancel()
        self._wake.set()

    # -- the loop -------------------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        self.runner.pin_threads(self.config.threads)  # this thread's own intra-op count (ServeConfig.threads)
        while not self._stopping:
            self._start_loads()
            with self._lock:
                batch = self.scheduler.schedule()
                for req in batch.finished:
                    self._finish_output(req, "")
            if not batch.items:
                self._wake.wait(0.05 if self.scheduler.has_unfinished else 0.5)
                self._wake.clear()
                continue
            try:
                sampled = self.runner.run(batch)
            except Exception as err:  # a runner failure ends this batch's requests, never the server
                log.exception("model step failed")
                with self._lock:
                    for it in batch.items:
                        self.scheduler.finish(it.request, FinishReason.ERROR, f"model step failed: {err}")
                        self._finish_output(it.request, "")
                continue
            self.steps += 1
            with self._lock:
                for it in batch.items:  # a request whose own sampling failed ends alone; the batch goes on
                    err = sampled.get(it.request.request_id)
                    if isinstance(err, SamplingFailed):
                        self.scheduler.finish(it.request, FinishReason.ERROR, str(err))
                        self._finish_output(it.request, "")
                self.scheduler.update(batch, sampled)
                for it in batch.items:
                    if it.request.request_id in sampled:
                        self._emit(it.request)

    def _emit(self, req: Request) -> None:
        rid = req.request_id
        handle = self._handles.get(rid)
        if handle is None:
            return
        now, detok = time.perf_counter(), self._text[rid]
        last = self._tlast.get(rid)
        if last is None:
            self.engine_metrics.ttft.observe(now - self._t0[rid])
        else:
            self.engine_metrics.tpot.observe(now - last)
        self._tlast[rid] = now
        delta, stopped = detok.step(req.output_token_ids[len(detok.ids):], req.is_finished)
        if stopped and not req.is_finished:
            self.scheduler.finish(req, FinishReason.STOP)
        if req.is_finished:
            self._finish_output(req, delta, (req.output_token_ids[-1],))
        else:
            handle._push(Output(rid, delta, (req.output_token_ids[-1],), req.num_prompt_tokens,
                                req.num_output_tokens))

    def _finish_output(self, req: Request, delta: str, token_ids: tuple = ()) -> None:
        rid = req.request_id
        handle = self._handles.pop(rid, None)
        self._text.pop(rid, None)
        self._tlast.pop(rid, None)
        t0 = self._t0.pop(rid, None)
        self.runner.release(rid)
        reason = req.finish_reason.value if req.finish_reason is not None else "error"
        if t0 is not None:  # once per request that entered the engine
            self.engine_metrics.finished(reason, req.num_prompt_tokens, req.num_output_tokens, time.perf_counter() - t0)
        if handle is not None:
            handle._push(Output(rid, delta, token_ids, req.num_prompt_tokens, req.num_output_tokens,
                                reason, req.error))

    def _start_loads(self, names: list[str] | None = None) -> None:
        """Submit a load job for each adapter in `names` (default: registry.pending_loads()) not loading yet."""
        with self._loads_lock:
            for name in self.registry.pending_loads() if names is None else names:
                if name not in self._loads:
                    self._loads[name] = self._pool.submit(self._load_job, name)

    def _load_job(self, name: str) -> None:
        try:
            self.registry.load(name)
        except Exception as err:  # any loader failure ends the requests waiting for it, never the loop
            if not isinstance(err, ServeError):
                log.exception("adapter %r: load failed", name)
            with self._lock:
                for req in [r for r in self.scheduler.waiting if r.adapter == name]:
                    self.scheduler.finish(req, FinishReason.ERROR, str(err))
                    self._finish_output(req, "")
        finally:
            with self._loads_lock:
                self._loads.pop(name, None)
            self._wake.set()

    # -- reporting ------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counts read at each /metrics scrape (metrics.EngineMetrics.SCRAPED names them)."""
        s = self.scheduler.stats()
        return {"running": s["running"], "waiting": s["waiting"], "kv_usage": s["kv_usage"],
                "preemptions": s["preemptions"], "prefix_queries": s["kv_prefix_query_tokens"],
                "prefix_hits": s["kv_prefix_hit_tokens"], "steps": self.steps,
                "adapters_registered": len(self.registry.list()),
                "adapters_resident": sum(1 for a in self.registry.list() if a.state.value == "resident")}

    def memory_report(self) -> dict:
        """Registry memory report plus the KV cache and base weights."""
        rep = self.registry.memory_report()
        rep["kv_cache_bytes"] = self.runner.cache.nbytes
        rep["base_bytes"] = sum(t.nbytes for t in self.model.state_dict().values())
        return rep
