"""What the one HTTP app (api/app.py) needs from a backend: generate, list and load. Everything else (routes,
auth, tenants, body and token limits, request validation, error bodies, the metrics route) is the app's.
Implemented by the native engine (api/native.py) and by a vLLM OpenAI server (vllm_backend/front.py).
"""
from typing import Protocol

from fastapi import Request
from fastapi.responses import Response

from qlora_kit.models.sampling_params import SamplingParams

from ..adapter_entry import AdapterInfo
from ..adapters import AdapterRegistry
from ..metrics import Metrics, RequestRecord
from .protocol import ChatRequest, CompletionRequest


class Backend(Protocol):
    """A generation backend: `registry` (the adapters it serves; the app checks names and tenants against it),
    `metrics` (its metrics.Metrics registry; the app records per-request families on it) and `vocab_size`
    (token-id prompts are checked against it)."""

    registry: AdapterRegistry
    metrics: Metrics
    vocab_size: int

    async def generate(self, request: Request, body: CompletionRequest | ChatRequest, raw: dict,
                       sampling: SamplingParams, adapter: str | None, tenant: str | None,
                       record: RequestRecord) -> Response | dict:
        """The OpenAI response (JSON or SSE) to a validated request: `raw` is its JSON with max_tokens resolved,
        `adapter` None for the base. Calls `record.first_token()` at the first token out and `record.finish()` once
        it ends (also when the client goes away: "cancelled")."""

    async def load(self, name: str, path: str) -> AdapterInfo:
        """Register and load an adapter (checked by qserve.engine.lora.read_adapter); raises ServeError."""

    async def unload(self, name: str) -> bool:
        """Unload an adapter; False while it drains (removed when its running requests finish)."""

    def memory(self) -> dict:
        """The memory report of /v1/adapters."""

    async def health(self) -> str | None:
        """None when healthy, else why not (/health answers 503 with it)."""

    async def metrics_text(self) -> str:
        """The /metrics body (Prometheus text): `metrics.render()`, plus what the backend exports itself."""

    async def aclose(self) -> None:
        """Release what the backend holds open (at app shutdown)."""
