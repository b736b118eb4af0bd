"""The vLLM backend of qserve's HTTP app (api/app.py): generation is proxied to vLLM's OpenAI server.

The app checks each request (key, tenant may use `model`, adapter registered, body validated, max_tokens
limit) exactly as for the native engine, and only then is the body forwarded with the child's private key.
Adapters loaded through the admin API are resolved under the allowed root and validated by qserve's
AdapterRegistry with the native engine's checks (qserve.engine.lora, the models/ adapter boundary) plus vLLM's
--max-lora-rank, before vLLM is asked to load them by their real path.

With --adapter-store the front resolves a request's adapter from the same store as the native engine (the app's
`registry.lookup`, qserve/store), validates it on first use in a worker thread (the same loader), then asks
vLLM to load it through the same runtime API; concurrent first requests share one load. Hub repo ids allowed by
--adapter-hub-allow resolve the same way (qserve/store/hub.py), and vLLM is given the snapshot folder in the
Hugging Face cache. vLLM keeps its own GPU/CPU LRU of loaded adapters (its --max-loras / --max-cpu-loras).
"""
import asyncio
import json
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from qlora_kit.formats.errors import QloraKitError
from qlora_kit.models import base_names, load_config, projection_shapes

from ..adapters import AdapterRegistry, RegistryConfig
from ..api.app import create_app
from ..api.auth import KeyStore
from ..api.protocol import ChatRequest
from ..config import ServeConfig
from ..engine.lora import read_adapter
from ..errors import AdapterRefused, UpstreamError
from ..metrics import Metrics
from ..store import AdapterStore, HubSource


def adapter_loader(names: tuple[str, ...], max_rank: int, shapes: dict | None = None):
    """The registry's loader for the vLLM backend: the native engine's checks (read_adapter against the base's
    `names` and projection `shapes`, from models.projection_shapes of its config; None skips them) plus vLLM's
    --max-lora-rank. vLLM reads the weights itself: the payload kept is the LoraConfig, nbytes the weights' size."""
    def load(name: str, path: str):
        payload, nbytes = read_adapter(shapes, name, path, names)
        cfg, weights = payload.config, payload.layers.values()
        rank = max([cfg.r, *cfg.rank_pattern.values(), *(a.shape[0] for a, _, _ in weights)])
        if rank > max_rank:
            raise AdapterRefused(f"adapter {name!r} ({path}): rank {rank} is above the vLLM server's "
                                 f"--max-lora-rank {max_rank}; restart it with a larger one")
        return cfg, nbytes

    return load


def _upstream_error(resp: httpx.Response) -> UpstreamError:
    try:
        body = resp.json()
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
    except (ValueError, AttributeError):
        msg = None
    status = resp.status_code if 400 <= resp.status_code < 600 else 502
    return UpstreamError(f"vLLM: {msg or resp.text[:500]}", status)


class VllmBackend:
    """api.backend.Backend over vLLM's OpenAI server at `upstream` (which requires `upstream_key`).

    Its Metrics registry holds only qserve:* families (per adapter and tenant, recorded from vLLM's responses);
    /metrics appends vLLM's own text, which has the engine's vllm:* families."""

    def __init__(self, upstream: str, upstream_key: str, registry: AdapterRegistry, vocab_size: int,
                 metrics: Metrics):
        self.registry, self.vocab_size, self.metrics = registry, vocab_size, metrics
        metrics.on_scrape(registry.stats.families(metrics))
        self._upstream: dict[str, asyncio.Future | bool] = {}  # True: vLLM has it; a Future: being loaded
        for a in registry.list():  # start-up adapters: vLLM got them with --lora-modules
            self._upstream[a.name] = True
        self.client = httpx.AsyncClient(base_url=upstream, headers={"Authorization": f"Bearer {upstream_key}"},
                                        timeout=httpx.Timeout(None, connect=10.0))

    async def _ensure_upstream(self, name: str) -> None:
        """Load a store adapter into vLLM on its first request; concurrent first requests share the one load."""
        fut = self._upstream.get(name)
        if fut is True:
            return
        if fut is None:
            fut = self._upstream[name] = asyncio.ensure_future(self._load_upstream(name))
        try:
            await asyncio.shield(fut)
        except Exception:
            if self._upstream.get(name) is fut:
                del self._upstream[name]  # a later request tries again
            raise
        self._upstream[name] = True

    async def _load_upstream(self, name: str) -> None:
        t0, source = time.monotonic(), self.registry.source(name)
        try:
            info = await asyncio.to_thread(self.registry.load, name)  # validated as an admin load (read once)
        except QloraKitError:
            self.metrics.adapter_load_failed(source)
            raise
        resp = await self.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": info.path})
        if resp.status_code != 200:
            self.metrics.adapter_load_failed(source)
            raise _upstream_error(resp)
        self.metrics.adapter_loaded(source, time.monotonic() - t0)

    async def generate(self, request: Request, body, raw: dict, sampling, adapter, tenant, record):
        path = "/v1/chat/completions" if isinstance(body, ChatRequest) else "/v1/completions"
        if adapter is not None:
            try:
                await self._ensure_upstream(adapter)
            except Exception:
                record.finish("error")
                raise
        if not body.stream:
            resp = await self.client.post(path, json=raw)
            if resp.status_code != 200:
                record.finish("error")
                raise _upstream_error(resp)
            data = resp.json()
            record.first_token()
            _finish(record, (data.get("choices") or [{}])[0].get("finish_reason"), data.get("usage"))
            return JSONResponse(data)
        # usage is asked of vLLM always (token counts per adapter), and relayed only when the client asked
        wants_usage = bool(body.stream_options and body.stream_options.include_usage)
        raw = {**raw, "stream_options": {**(raw.get("stream_options") or {}), "include_usage": True}}
        resp = await self.client.send(self.client.build_request("POST", path, json=raw), stream=True)
        if resp.status_code != 200:
            await resp.aread()
            await resp.aclose()
            record.finish("error")
            raise _upstream_error(resp)
        return StreamingResponse(self._relay(resp, record, wants_usage), media_type="text/event-stream")

    async def _relay(self, resp: httpx.Response, record, wants_usage: bool):
        finish, usage = None, None
        try:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    choices = chunk.get("choices") or []
                    for c in choices:
                        record.first_token()
                        finish = c.get("finish_reason") or finish
                    usage = chunk.get("usage") or usage
                    if not choices and chunk.get("usage") and not wants_usage:
                        continue  # the usage-only chunk the client did not ask for
                yield line + "\n"
        finally:
            await resp.aclose()
            _finish(record, finish or "cancelled", usage)

    async def load(self, name: str, path: str):
        t0 = time.monotonic()  # an admin load by path: source store
        try:
            info = await asyncio.to_thread(self.registry.add, name, path)
        except QloraKitError:
            self.metrics.adapter_load_failed("store")
            raise
        resp = await self.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": info.path})
        if resp.status_code != 200:
            self.registry.unload(name)
            self.metrics.adapter_load_failed("store")
            raise _upstream_error(resp)
        self.metrics.adapter_loaded("store", time.monotonic() - t0)
        self._upstream[name] = True
        return self.registry.get(name)

    async def unload(self, name: str) -> bool:
        self.registry.get(name)  # AdapterNotFound before touching vLLM
        resp = await self.client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        if resp.status_code != 200:
            raise _upstream_error(resp)
        self.registry.unload(name)  # vLLM finishes running requests of an unloaded adapter itself
        self._upstream.pop(name, None)
        return True

    def memory(self) -> dict:
        return {**self.registry.memory_report(), "kv_cache_bytes": None, "base_bytes": None}  # vLLM reports neither

    async def health(self) -> str | None:
        try:
            ok = (await self.client.get("/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            ok = False
        return None if ok else "vLLM not answering"

    async def metrics_text(self) -> str:
        try:
            theirs = (await self.client.get("/metrics", timeout=5.0)).text  # vLLM's own engine metrics (vllm:*)
        except httpx.HTTPError:
            theirs = ""
        return self.metrics.render() + theirs

    async def aclose(self) -> None:
        await self.client.aclose()


def _finish(record, finish: str | None, usage: dict | None) -> None:
    usage = usage or {}
    record.finish(finish or "unknown", usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)


def front_registry(config: ServeConfig, max_rank: int) -> AdapterRegistry:
    """The front's adapter registry for `config`'s checkpoint: adapter_loader against the base's names and its
    projection shapes (from config.json; no weights are loaded here). Start-up adapters are not added yet."""
    folder = Path(config.checkpoint)
    names = base_names(folder) + tuple(config.base_names)
    loader = adapter_loader(names, max_rank, projection_shapes(load_config(folder)))
    store = None if config.adapter_store is None else AdapterStore(config.adapter_store)
    hub = HubSource(config.adapter_hub_allow) if config.adapter_hub_allow else None
    return AdapterRegistry(RegistryConfig(config.allowed_root, config.max_loras), loader, store=store, hub=hub)


def create_front(config: ServeConfig, registry: AdapterRegistry, upstream: str, upstream_key: str,
                 keys: KeyStore) -> FastAPI:
    """qserve's HTTP app over the vLLM OpenAI server at `upstream` serving `config`'s checkpoint."""
    metrics = Metrics(config.served_name)
    metrics.on_scrape(lambda: [metrics.family("gauge", "qserve:adapters_registered", "Adapters registered with the "
                                              "vLLM backend", len(registry.list()))])
    backend = VllmBackend(upstream, upstream_key, registry, load_config(config.checkpoint).vocab_size, metrics)
    return create_app(backend, keys, config.served_name, config.max_body_bytes, config.max_tokens_limit)
