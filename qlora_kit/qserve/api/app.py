"""FastAPI routes: OpenAI-compatible completions/chat (SSE streaming), models, vLLM-style adapter admin,
health and Prometheus metrics. HTTP only: the engine does the work, api/errors.py maps the errors."""
import asyncio
import json
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import AdapterNotFound, AdapterRefused, BodyTooLarge, InvalidRequest
from . import errors
from .auth import KeyStore, Principal
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


async def _cancel_on_disconnect(request: Request, handle) -> None:
    """Wait for the client to go away (the ASGI server sends http.disconnect), then cancel its request."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.close()
            return
        await asyncio.sleep(0.05)  # a stray body message: the body was already read


def create_app(engine, keys: KeyStore, served_name: str) -> FastAPI:
    """The HTTP app over a started Engine.

    Args:
        engine: qserve.engine.engine.Engine.
        keys: the KeyStore (authentication off when it has no file).
        served_name: the `model` name of the base model.
    """
    app = FastAPI(title="qserve", docs_url=None, redoc_url=None)
    errors.install(app)
    limit = engine.config.max_body_bytes
    created = int(time.time())

    def who(request: Request) -> Principal:
        return keys.authenticate(request.headers.get("authorization"))

    def adapter_of(model: str, principal: Principal) -> str | None:
        adapter = None if model == served_name else model
        KeyStore.check_model(principal, adapter)
        if adapter is not None and adapter not in engine.registry:
            raise AdapterNotFound(f"model {model!r}: no such model or adapter; see /v1/models")
        return adapter

    async def run(request: Request, principal: Principal, prompt_ids, body, chat: bool):
        adapter = adapter_of(body.model, principal)
        handle = engine.add(prompt_ids, body.sampling(DEFAULT_MAX_TOKENS), adapter, tenant=principal.tenant)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(handle, rid, body.model, chat, include_usage),
                                     media_type="text/event-stream")
        text, last = [], None
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        try:
            while last is None or last.finish_reason is None:
                last = await handle.get()
                text.append(last.text)
        finally:  # done, or this handler cancelled: stop watching; a request not finished is cancelled
            watcher.cancel()
            handle.close()
        if last.finish_reason == "cancelled":
            return JSONResponse({}, status_code=499)
        if last.finish_reason == "error":
            return errors.error_response(last.error or "generation failed", 500, "server_error")
        choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": "".join(text)}} if chat else {"text": "".join(text)})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.model, "choices": [choice], "usage": _usage(last)}

    @app.post("/v1/completions")
    async def completions(request: Request, principal: Principal = Depends(who)):
        body = CompletionRequest.model_validate(await _body(request, limit))
        p = body.prompt
        if isinstance(p, list) and p and all(isinstance(t, str) for t in p):
            if len(p) != 1:
                raise InvalidRequest("prompt: a list of several strings (batch) is not supported; send one")
            p = p[0]
        ids = engine.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise InvalidRequest("prompt: is empty")
        if any(t < 0 or t >= engine.model.cfg.vocab_size for t in ids):
            raise InvalidRequest(f"prompt: token ids must be in [0, {engine.model.cfg.vocab_size})")
        return await run(request, principal, ids, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, principal: Principal = Depends(who)):
        body = ChatRequest.model_validate(await _body(request, limit))
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return await run(request, principal, engine.tokenizer.encode_chat(messages), body, chat=True)

    @app.get("/v1/models")
    async def models(principal: Principal = Depends(who)):
        return model_list(principal, served_name, engine.registry, created)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request, principal: Principal = Depends(who)):
        KeyStore.check_admin(principal)
        body = LoadAdapter.model_validate(await _body(request, limit))
        check_adapter_name(body.lora_name, served_name)
        info = await asyncio.to_thread(engine.registry.add, body.lora_name, body.lora_path)
        return {"status": "ok", "message": f"Success: LoRA adapter '{info.name}' added successfully.",
                "adapter": _adapter_json(info)}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request, principal: Principal = Depends(who)):
        KeyStore.check_admin(principal)
        body = UnloadAdapter.model_validate(await _body(request, limit))
        gone = await asyncio.to_thread(engine.registry.unload, body.lora_name)
        state = "unloaded" if gone else "draining: removed when its running requests finish"
        return {"status": "ok", "message": f"Success: LoRA adapter '{body.lora_name}' {state}.", "unloaded": gone}

    @app.get("/v1/adapters")
    async def adapters(principal: Principal = Depends(who)):
        KeyStore.check_admin(principal)
        return {"adapters": [_adapter_json(a) for a in engine.registry.list()], "memory": engine.memory_report()}

    @app.get("/health")
    async def health():
        alive = engine._thread is not None and engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics(principal: Principal = Depends(who)):
        KeyStore.check_metrics(principal)  # counters move with other tenants' requests (prefix hits, tokens)
        return PlainTextResponse(engine.metrics.render(engine.gauges()), media_type="text/plain; version=0.0.4")

    return app


def _adapter_json(a) -> dict:
    return {"name": a.name, "path": a.path, "state": a.state.value, "bytes": a.nbytes, "in_flight": a.in_flight,
            "running": a.running, "slot": a.slot, "draining": a.draining, "load_time_s": a.load_time_s}


def _usage(out) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


async def _sse(handle, rid: str, model: str, chat: bool, include_usage: bool):
    """Server-sent events: one chunk per Output, an optional usage chunk, then [DONE]."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())

    def chunk(delta_text, finish, first=False, usage=None):
        if chat:
            delta = {"role": "assistant", "content": delta_text} if first else {"content": delta_text}
            choices = [{"index": 0, "delta": delta if finish is None or delta_text else {}, "finish_reason": finish,
                        "logprobs": None}]
        else:
            choices = [{"index": 0, "text": delta_text, "finish_reason": finish, "logprobs": None}]
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [] if usage else choices}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    first = True
    try:
        while True:
            out = await handle.get()
            if out.finish_reason == "error":
                err = errors.error_body(out.error or "generation failed", "server_error", 500)
                yield f"data: {json.dumps(err)}\n\n"
                break
            if out.text or out.finish_reason is not None or first:
                yield chunk(out.text, out.finish_reason, first)
                first = False
            if out.finish_reason is not None:
                if include_usage:
                    yield chunk("", None, usage=_usage(out))
                break
        yield "data: [DONE]\n\n"
    finally:  # client gone (the response task is cancelled) or done: free the request's KV blocks now
        handle.close()
