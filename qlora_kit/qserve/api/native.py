"""The native backend of the HTTP app: qserve's own engine (continuous batching, paged KV, multi-LoRA) in this
process. It tokenizes, queues the request on the engine and turns its Outputs into OpenAI JSON or SSE chunks."""
import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import InvalidRequest
from . import errors
from .protocol import ChatRequest


class NativeBackend:
    """api.backend.Backend over a started qserve.engine.engine.Engine."""

    def __init__(self, engine):
        self.engine = engine
        self.registry, self.metrics = engine.registry, engine.metrics
        self.vocab_size = engine.model.cfg.vocab_size

    async def generate(self, request: Request, body, raw: dict, sampling, adapter, tenant, record):
        chat = isinstance(body, ChatRequest)
        tok = self.engine.tokenizer
        if chat:
            ids = tok.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        else:
            ids = tok.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
            if not ids:
                raise InvalidRequest("prompt: is empty")
        handle = self.engine.add(ids, sampling, adapter, tenant=tenant)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(handle, rid, body.model, chat, include_usage, record),
                                     media_type="text/event-stream")
        text, last = [], None
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        try:
            while last is None or last.finish_reason is None:
                last = await handle.get()
                _observe(record, last)
                text.append(last.text)
        finally:  # done, or this handler cancelled: stop watching; a request not finished is cancelled
            watcher.cancel()
            handle.close()
            _finish(record, last)
        if last.finish_reason == "cancelled":
            return JSONResponse({}, status_code=499)
        if last.finish_reason == "error":
            return errors.error_response(last.error or "generation failed", 500, "server_error")
        choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": "".join(text)}} if chat else {"text": "".join(text)})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.model, "choices": [choice], "usage": _usage(last)}

    async def load(self, name: str, path: str):
        return await asyncio.to_thread(self.registry.add, name, path)

    async def unload(self, name: str) -> bool:
        return await asyncio.to_thread(self.registry.unload, name)

    def memory(self) -> dict:
        return self.engine.memory_report()

    async def health(self) -> str | None:
        thread = self.engine._thread
        return None if thread is not None and thread.is_alive() else "engine stopped"

    async def metrics_text(self) -> str:
        return self.metrics.render()

    async def aclose(self) -> None:
        pass  # the engine is stopped by whoever started it (server.ServerHandle / serve)


async def _cancel_on_disconnect(request: Request, handle) -> None:
    """Wait for the client to go away (the ASGI server sends http.disconnect), then cancel its request."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.close()
            return
        await asyncio.sleep(0.05)  # a stray body message: the body was already read


def _observe(record, out) -> None:
    """Mark the first token out, and the finish when `out` is the last Output."""
    if out.token_ids:
        record.first_token()
    if out.finish_reason is not None:
        record.finish(out.finish_reason, out.prompt_tokens, out.completion_tokens)


def _finish(record, last) -> None:
    """A request that ended without its last Output (client gone): cancelled, with the tokens seen so far."""
    record.finish("cancelled", *((last.prompt_tokens, last.completion_tokens) if last is not None else ()))


def _usage(out) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


async def _sse(handle, rid: str, model: str, chat: bool, include_usage: bool, record):
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

    first, out = True, None
    try:
        while True:
            out = await handle.get()
            _observe(record, out)
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
        _finish(record, out)
