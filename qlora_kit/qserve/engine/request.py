"""One request's state: its tokens, sampling parameters (models.SamplingParams), adapter, status and KV block table.

Plain Python (no torch). The scheduler owns status changes; the engine loop appends sampled tokens through
`Scheduler.update`, and an HTTP handler may call `cancel()` from another thread at any time (the flag is read
at the next scheduling step).
"""
import enum
import itertools
import time

from qlora_kit.models.sampling_params import SamplingParams

from ..errors import InvalidRequest

_ids = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """OpenAI's finish_reason values plus our own `cancelled` and `error`."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


class Request:
    """A generation request moving through WAITING -> RUNNING (<-> PREEMPTED) -> FINISHED.

    Args:
        prompt_token_ids: the tokenized prompt, non-empty.
        sampling: its SamplingParams.
        adapter: adapter name, or None for the base model.
        request_id: caller's id; a fresh one is made if None.
        arrival_time: monotonic seconds; defaults to now. Preemption picks the latest arrival.
        eos_token_id: ends generation unless sampling.ignore_eos.

    Attributes:
        output_token_ids: generated tokens so far.
        num_computed_tokens: tokens whose KV is in the cache (prefix hits included).
        num_cached_tokens: tokens served from the prefix cache at the last admission.
        block_table: KV block ids, in order; owned by the BlockManager.
        block_hashes: prefix-cache hashes of the full blocks registered so far.
        adapter_uid: the registry's id for this load of the adapter (0 for the base); salts the prefix cache.
        tenant: who sent it (None = no authentication); salts the prefix cache too, so one tenant's requests
            never reuse (and so can never time or count hits on) another tenant's cached prompt blocks.
        adapter_slot: resident slot index while running (-1 for the base or when not resident).
    """

    def __init__(self, prompt_token_ids, sampling: SamplingParams | None = None, adapter: str | None = None,
                 request_id: str | None = None, arrival_time: float | None = None, eos_token_id: int | None = None,
                 tenant: str | None = None):
        prompt = list(prompt_token_ids)
        if not prompt:
            raise InvalidRequest("prompt: is empty; send at least one token")
        if not all(isinstance(t, int) and t >= 0 for t in prompt):
            raise InvalidRequest("prompt: token ids must be integers >= 0")
        self.request_id = request_id if request_id is not None else f"req-{next(_ids)}"
        self.prompt_token_ids = prompt
        self.output_token_ids: list[int] = []
        self.sampling = sampling or SamplingParams()
        self.adapter = adapter
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.adapter_uid = 0
        self.tenant = tenant
        self.adapter_slot = -1
        self.cancelled = False
        self._stop_ids = frozenset(self.sampling.stop_token_ids) | (
            frozenset() if eos_token_id is None or self.sampling.ignore_eos else frozenset({eos_token_id}))

    def __repr__(self):
        return (f"Request({self.request_id!r}, adapter={self.adapter!r}, status={self.status.name}, "
                f"prompt={self.num_prompt_tokens}, out={self.num_output_tokens}, computed={self.num_computed_tokens})")

    @property
    def prefix_salt(self) -> tuple:
        """What a prefix-cache block is keyed by besides its tokens: (adapter load uid, tenant)."""
        return (self.adapter_uid, self.tenant)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def num_pending_tokens(self) -> int:
        """Tokens known but not yet in the KV cache (the whole prompt at first, 1 while decoding)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """True when only the last sampled token is pending, i.e. the next step is a decode step."""
        return self.num_output_tokens > 0 and self.num_pending_tokens == 1

    def cancel(self) -> None:
        """Ask for the request to stop; the scheduler frees it at its next step. Safe from any thread."""
        self.cancelled = True

    def append_token(self, token_id: int, max_model_len: int | None = None) -> FinishReason | None:
        """Record a sampled token; return the finish reason it causes (stop id, max_tokens or model length).

        Stop *strings* need the detokenized text and are checked by the engine, which then finishes the
        request through `Scheduler.finish`.
        """
        self.output_token_ids.append(token_id)
        if token_id in self._stop_ids:
            return FinishReason.STOP
        if self.num_output_tokens >= self.sampling.max_tokens:
            return FinishReason.LENGTH
        if max_model_len is not None and self.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None
