"""qserve's front over a vLLM server: the same API keys, per-tenant adapter access, adapter path root, admin
API, error bodies and metrics as the native backend; generation is proxied to vLLM's OpenAI server.

Requests are checked here (key, tenant may use `model`, adapter registered, max_tokens limit) and only then
forwarded with the child's private key. Adapters loaded through the admin API are resolved under the allowed
root and validated (PEFT safetensors, base model, rank <= vLLM's --max-lora-rank) by qserve's
AdapterRegistry before vLLM is asked to load them by their real path.
"""
import asyncio
import json
import os
import time

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from qlora_kit.formats.errors import QloraKitError

from ..adapters import AdapterRegistry
from ..api import errors
from ..api.app import _adapter_json, _body, model_list
from ..api.auth import KeyStore, Principal
from ..engine.lora import loader
from ..errors import AdapterNotFound, AdapterRefused, InvalidRequest
from ..metrics import Metrics


def adapter_loader(base_names: tuple[str, ...], max_rank: int, shapes: dict | None = None):
    """The registry's loader for the vLLM backend: the native engine's checks (against the base's projection
    `shapes`, models.projection_shapes of its config) plus vLLM's --max-lora-rank; vLLM keeps the weights."""
    return loader(shapes, base_names, max_rank, keep_weights=False)


def _upstream_error(resp: httpx.Response) -> JSONResponse:
    try:
        body = resp.json()
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
    except (ValueError, AttributeError):
        msg = None
    status = resp.status_code if 400 <= resp.status_code < 600 else 502
    kind = "invalid_request_error" if status < 500 else "server_error"
    return errors.error_response(f"vLLM: {msg or resp.text[:500]}", status, kind)


def create_front(upstream: str, upstream_key: str, keys: KeyStore, served_name: str, registry: AdapterRegistry,
                 max_tokens_limit: int, max_body_bytes: int, metrics: Metrics | None = None) -> FastAPI:
    """The HTTP app in front of vLLM's OpenAI server at `upstream` (which requires `upstream_key`)."""
    app = FastAPI(title="qserve (vLLM backend)", docs_url=None, redoc_url=None)
    errors.install(app)
    metrics = metrics or Metrics()
    client = httpx.AsyncClient(base_url=upstream, headers={"Authorization": f"Bearer {upstream_key}"},
                               timeout=httpx.Timeout(None, connect=10.0))
    created = int(time.time())
    app.state.metrics, app.state.registry = metrics, registry

    def who(request: Request) -> Principal:
        return keys.authenticate(request.headers.get("authorization"))

    def check_model(body: dict, principal: Principal) -> None:
        model = body.get("model")
        if not isinstance(model, str):
            raise InvalidRequest("model: a model or adapter name (string) is required")
        adapter = None if model == served_name else model
        KeyStore.check_model(principal, adapter)
        if adapter is not None and (adapter not in registry or registry.get(adapter).draining):
            raise AdapterNotFound(f"model {model!r}: no such model or adapter; see /v1/models")
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if v is not None and (not isinstance(v, int) or v > max_tokens_limit):
                raise InvalidRequest(f"{key}={v!r}: must be an integer <= {max_tokens_limit}")

    def record(start: float, finish: str | None, usage: dict | None) -> None:
        metrics.inc("requests_total", finish_reason=finish or "unknown")
        metrics.observe("request_latency_seconds", time.monotonic() - start)
        if usage:
            metrics.inc("prompt_tokens_total", usage.get("prompt_tokens") or 0)
            metrics.inc("generation_tokens_total", usage.get("completion_tokens") or 0)

    async def forward(path: str, body: dict):
        start = time.monotonic()
        if not body.get("stream"):
            resp = await client.post(path, json=body)
            if resp.status_code != 200:
                record(start, "error", None)
                return _upstream_error(resp)
            data = resp.json()
            metrics.observe("time_to_first_token_seconds", time.monotonic() - start)
            choices = data.get("choices") or [{}]
            record(start, choices[0].get("finish_reason"), data.get("usage"))
            return JSONResponse(data)
        resp = await client.send(client.build_request("POST", path, json=body), stream=True)
        if resp.status_code != 200:
            await resp.aread()
            await resp.aclose()
            record(start, "error", None)
            return _upstream_error(resp)
        return StreamingResponse(_relay(resp, start), media_type="text/event-stream")

    async def _relay(resp: httpx.Response, start: float):
        first, finish, usage = True, None, None
        try:
            async for line in resp.aiter_lines():
                if first and line.startswith("data:"):
                    metrics.observe("time_to_first_token_seconds", time.monotonic() - start)
                    first = False
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    for c in chunk.get("choices") or []:
                        finish = c.get("finish_reason") or finish
                    usage = chunk.get("usage") or usage
                yield line + "\n"
        finally:
            await resp.aclose()
            record(start, finish, usage)

    @app.post("/v1/completions")
    async def completions(request: Request, principal: Principal = Depends(who)):
        body = await _body(request, max_body_bytes)
        check_model(body, principal)
        return await forward("/v1/completions", body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, principal: Principal = Depends(who)):
        body = await _body(request, max_body_bytes)
        check_model(body, principal)
        return await forward("/v1/chat/completions", body)

    @app.get("/v1/models")
    async def models(principal: Principal = Depends(who)):
        return model_list(principal, served_name, registry, created)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request, principal: Principal = Depends(who)):
        KeyStore.check_admin(principal)
        body = await _body(request, max_body_bytes)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise InvalidRequest("lora_name and lora_path: strings are required")
        t0 = time.monotonic()
        try:
            info = await asyncio.to_thread(registry.add, name, path)
        except QloraKitError:
            metrics.inc("adapter_load_failures_total")
            raise
        resp = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": info.path})
        if resp.status_code != 200:
            registry.unload(name)
            metrics.inc("adapter_load_failures_total")
            return _upstream_error(resp)
        metrics.observe("adapter_load_seconds", time.monotonic() - t0)
        return {"status": "ok", "message": f"Success: LoRA adapter '{name}' added successfully.",
                "adapter": _adapter_json(registry.get(name))}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request, principal: Principal = Depends(who)):
        KeyStore.check_admin(principal)
        body = await _body(request, max_body_bytes)
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise InvalidRequest("lora_name: a string is required")
        registry.get(name)  # AdapterNotFound before touching vLLM
        resp = await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        if resp.status_code != 200:
            return _upstream_error(resp)
        registry.unload(name)  # vLLM finishes running requests of an unloaded adapter itself
        return {"status": "ok", "message": f"Success: LoRA adapter '{name}' unloaded.", "unloaded": True}

    @app.get("/v1/adapters")
    async def adapters(principal: Principal = Depends(who)):
        KeyStore.check_admin(principal)
        memory = {**registry.memory_report(), "kv_cache_bytes": None, "base_bytes": None}  # vLLM does not report them
        return {"adapters": [_adapter_json(a) for a in registry.list()], "memory": memory}

    @app.get("/health")
    async def health():
        try:
            ok = (await client.get("/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            ok = False
        return JSONResponse({"status": "ok" if ok else "vLLM not answering"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_text(principal: Principal = Depends(who)):
        KeyStore.check_metrics(principal)
        gauges = {"adapters_registered": ("Adapters registered with the vLLM backend", len(registry.list()))}
        ours = metrics.render(gauges)
        try:
            theirs = (await client.get("/metrics", timeout=5.0)).text  # vLLM's own engine metrics (vllm:*)
        except httpx.HTTPError:
            theirs = ""
        return PlainTextResponse(ours + theirs, media_type="text/plain; version=0.0.4")

    @app.on_event("shutdown")
    async def _close():
        await client.aclose()

    return app
