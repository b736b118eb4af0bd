"""The one HTTP app, over a Backend (api/backend.py: the native engine or vLLM): OpenAI-compatible
completions/chat (SSE streaming), models, vLLM-style adapter admin, health and Prometheus metrics.

Defined here once for both backends: the routes, API-key auth, tenants' adapter access, the body-size and
max_tokens limits, request validation (api/protocol.py) and, through api/errors.py, every error body. The
OpenAI-API defaults are applied here too: temperature 1.0 (protocol.py) and DEFAULT_MAX_TOKENS new tokens (as
vLLM's completions), whatever the backend; models.SamplingParams keeps the offline defaults.

Metrics: each request to a known model gets a metrics.RequestRecord (labels: adapter, tenant) here, for both
backends; the backend marks its first token and its finish (reason, prompt and completion tokens), and a request
refused before it runs (max_tokens over the limit, queue full, prompt too long) is counted as `rejected`.
/metrics renders the backend's registry.
"""
import json
import time

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse

from ..errors import AdapterNotFound, AdapterRefused, BodyTooLarge, InvalidRequest, ServeError
from ..metrics import CONTENT_TYPE
from . import errors
from .auth import KeyStore, Principal
from .backend import Backend
from .protocol import ChatRequest, CompletionRequest, LoadAdapter, UnloadAdapter

DEFAULT_MAX_TOKENS = 16


async def _body(request: Request, limit: int) -> dict:
    """The JSON body, refusing more than `limit` bytes before reading them all (413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body: {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body: over {limit} bytes")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks) or b"null")
    except RecursionError:
        raise InvalidRequest("request body: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and ints over Python's digit limit
        raise InvalidRequest(f"request body: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body: must be a JSON object")
    return data


def model_list(principal: Principal, served_name: str, registry, created: int) -> dict:
    """The /v1/models body: the base and the live adapters this key may use (paths shown to admins only)."""
    data = [{"id": served_name, "object": "model", "created": created, "owned_by": "qserve", "root": served_name,
             "parent": None}] if principal.may_use(None) else []
    for a in registry.list():
        if not a.draining and principal.may_use(a.name):
            data.append({"id": a.name, "object": "model", "created": created, "owned_by": "qserve",
                         "root": a.path if principal.admin else a.name, "parent": served_name})
    return {"object": "list", "data": data}


def check_adapter_name(name: str, served_name: str) -> None:
    """An adapter may not take the base model's name (requests for it would be ambiguous)."""
    if name == served_name:
        raise AdapterRefused(f"adapter name {name!r}: is the served base model's name; choose another")


def check_prompt(prompt, vocab_size: int):
    """A completion prompt: one string or one list of token ids in [0, vocab_size); a one-string list is
    unwrapped (several strings, a batch, are refused)."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, str) for t in prompt):
        if len(prompt) != 1:
            raise InvalidRequest("prompt: a list of several strings (batch) is not supported; send one")
        prompt = prompt[0]
    if not prompt:
        raise InvalidRequest("prompt: is empty")
    if not isinstance(prompt, str) and any(t < 0 or t >= vocab_size for t in prompt):
        raise InvalidRequest(f"prompt: token ids must be in [0, {vocab_size})")
    return prompt


def create_app(backend: Backend, keys: KeyStore, served_name: str, max_body_bytes: int,
               max_tokens_limit: int) -> FastAPI:
    """The HTTP app over `backend`.

    Args:
        backend: the native engine's (api.native.NativeBackend) or vLLM's (vllm_backend.front.VllmBackend).
        keys: the KeyStore (authentication off when it has no file).
        served_name: the `model` name of the base model.
        max_body_bytes: larger request bodies are refused (413) before they are read.
        max_tokens_limit: larger max_tokens / max_completion_tokens are refused (400).
    """
    app = FastAPI(title="qserve", docs_url=None, redoc_url=None)
    errors.install(app)
    registry = backend.registry
    created = int(time.time())

    def who(request: Request) -> Principal:
        return keys.authenticate(request.headers.get("authorization"))

    async def adapter_of(model: str, principal: Principal) -> str | None:
        adapter = None if model == served_name else model
        KeyStore.check_model(principal, adapter)  # before any lookup: a forbidden name costs no disk or Hub access
        # with --adapter-store / --adapter-hub-allow: found there on first use; in a worker thread, as a Hub fetch
        # can take long and must not stall the event loop
        if adapter is not None and adapter not in registry and not await run_in_threadpool(registry.lookup, adapter):
            raise AdapterNotFound(f"model {model!r}: no such model or adapter; see /v1/models")
        return adapter

    async def generate(request: Request, principal: Principal, kind: type):
        raw = await _body(request, max_body_bytes)
        body = kind.model_validate(raw)
        if isinstance(body, CompletionRequest):
            body.prompt = check_prompt(body.prompt, backend.vocab_size)
        adapter = await adapter_of(body.model, principal)
        record = backend.metrics.record(adapter, principal.tenant)  # counted from here on, refused or not
        try:
            sampling = body.sampling(DEFAULT_MAX_TOKENS)
            if sampling.max_tokens > max_tokens_limit:
                key = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
                raise InvalidRequest(f"{key}={sampling.max_tokens}: must be an integer <= {max_tokens_limit}")
            raw.pop("max_completion_tokens", None)
            raw["max_tokens"] = sampling.max_tokens  # the default applied here, not left to the backend
            return await backend.generate(request, body, raw, sampling, adapter, principal.tenant, record)
        except ServeError:
            record.finish("rejected")
            raise

    @app.post("/v1/completions")
    async def completions(request: Request, principal: Principal = Depends(who)):
        return await generate(request, principal, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, principal: Principal = Depends(who)):
        return await generate(request, principal, ChatRequest)

    @app.get("/v1/models")
    async def models(principal: Principal = Depends(who)):
        return model_list(principal, served_name, registry, created)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request, principal: Principal = Depends(who)):
        KeyStore.check_admin(principal)
        body = LoadAdapter.model_validate(await _body(request, max_body_bytes))
        check_adapter_name(body.lora_name, served_name)
        info = await backend.load(body.lora_name, body.lora_path)
        return {"status": "ok", "message": f"Success: LoRA adapter '{info.name}' added successfully.",
                "adapter": _adapter_json(info)}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request, principal: Principal = Depends(who)):
        KeyStore.check_admin(principal)
        body = UnloadAdapter.model_validate(await _body(request, max_body_bytes))
        gone = await backend.unload(body.lora_name)
        state = "unloaded" if gone else "draining: removed when its running requests finish"
        return {"status": "ok", "message": f"Success: LoRA adapter '{body.lora_name}' {state}.", "unloaded": gone}

    @app.get("/v1/adapters")
    async def adapters(principal: Principal = Depends(who)):
        KeyStore.check_admin(principal)
        return {"adapters": [_adapter_json(a) for a in registry.list()], "memory": backend.memory()}

    @app.get("/health")
    async def health():
        why = await backend.health()
        return JSONResponse({"status": why or "ok"}, status_code=200 if why is None else 503)

    @app.get("/metrics")
    async def metrics(principal: Principal = Depends(who)):
        KeyStore.check_metrics(principal)  # counters move with other tenants' requests (prefix hits, tokens)
        return PlainTextResponse(await backend.metrics_text(), media_type=CONTENT_TYPE)

    @app.on_event("shutdown")
    async def _close():
        await backend.aclose()

    return app


def _adapter_json(a) -> dict:
    return {"name": a.name, "path": a.path, "state": a.state.value, "tier": a.tier, "bytes": a.nbytes,
            "in_flight": a.in_flight, "running": a.running, "slot": a.slot, "draining": a.draining,
            "load_time_s": a.load_time_s, "last_use": a.last_use}
