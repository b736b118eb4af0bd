"""What the one HTTP app (api/app.py) needs from a backend: generate, list and load. Everything else (routes,
auth, tenants, body and token limits, request validation, error bodies, the metrics route) is the app's.

Two backends implement it: the native engine (api/native.py) and a vLLM OpenAI server (vllm_backend/front.py).
"""
from typing import Protocol

from fastapi import Request
from fastapi.responses import Response

from qlora_kit.models.sampling_params import SamplingParams

from ..adapters import AdapterInfo, AdapterRegistry
from ..metrics import Metrics
from .protocol import ChatRequest, CompletionRequest


class Backend(Protocol):
    """A generation backend behind qserve's HTTP app.

    Attributes:
        registry: the adapters it serves (the app checks names, tenants and listings against it).
        metrics: qserve's counters for this backend (rendered by /metrics).
        vocab_size: the base's vocabulary size (token-id prompts are checked against it).
    """

    registry: AdapterRegistry
    metrics: Metrics
    vocab_size: int

    async def generate(self, request: Request, body: CompletionRequest | ChatRequest, raw: dict,
                       sampling: SamplingParams, adapter: str | None, tenant: str | None) -> Response | dict:
        """Answer a validated request: `body` parsed, `raw` the JSON as sent (max_tokens resolved), `sampling`
        its settings, `adapter` None for the base. Returns the OpenAI response (JSON or SSE stream)."""

    async def load(self, name: str, path: str) -> AdapterInfo:
        """Register and load an adapter (validated by qserve.engine.lora); raises ServeError subclasses."""

    async def unload(self, name: str) -> bool:
        """Unload an adapter; False when it drains (removed when its running requests finish)."""

    def memory(self) -> dict:
        """The memory report of /v1/adapters (registry tiers, KV cache and base bytes where known)."""

    async def health(self) -> str | None:
        """None when healthy, else why not (/health answers 503 with it)."""

    async def metrics_text(self) -> str:
        """The /metrics body (Prometheus text)."""

    async def aclose(self) -> None:
        """Release what the backend holds open (called at app shutdown)."""
