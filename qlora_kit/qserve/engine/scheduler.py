"""Continuous batching: which requests run in the next model step, and how many tokens each.

Plain Python (no torch). One engine thread calls `add`, `schedule`, `update` and `finish`; other threads only
call `Request.cancel()`. Each step:

1. cancelled requests are finished and their blocks freed;
2. running requests, oldest first, get their next tokens: 1 for a decode, a chunk of the prompt for a prefill,
   under the per-step token budget (each later decode keeps one token of it reserved). When blocks run out,
   the most recently arrived running request is preempted (recompute: its blocks are freed and it goes back to
   the front of the queue, to be prefilled again with prompt + generated tokens);
3. if nobody was preempted, waiting requests are admitted in order while the budget, `max_num_seqs`, the free
   blocks and the adapter slots allow. A request whose adapter is not resident (and cannot be made resident
   without evicting an adapter of a running request) waits; requests behind it may go ahead.
   Adapter-aware order (with a registry that has `tier`): requests preempted or queued longer than
   `adapter_age_cap_s` come first, then requests for the base or a resident adapter, then the rest, each group
   in queue order. When an aged request's adapter is in host memory but every slot is held by running requests,
   the slot with the fewest running requests (`registry.slot_to_free`) takes no new requests until it frees, and
   the aged request, first in line, gets it: nothing waits much past the cap, and the other slots keep running.

The output is a ScheduledBatch for the model runner, which turns it into tensors.
"""
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import AdapterNotFound, PromptTooLong, QueueFull, RequestNotFound
from .block_manager import BlockManager
from .request import FinishReason, Request, RequestStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Scheduler limits.

    Args:
        max_num_seqs: most requests in one batch.
        max_num_batched_tokens: per-step token budget (prefill chunks + decodes).
        max_model_len: prompt + generated tokens per request.
        max_waiting: queue length beyond which `add` raises QueueFull (HTTP 429).
        chunked_prefill: split long prompts across steps; if False a prompt must fit one step's budget.
        adapter_age_cap_s: seconds a queued request may be passed over for requests whose adapter is resident.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    max_waiting: int = 1024
    chunked_prefill: bool = True
    adapter_age_cap_s: float = 2.0

    def __post_init__(self):
        for key in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_waiting"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{key}={v!r}: must be an integer >= 1")
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} > max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}: every running request needs a token each step")
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} < max_model_len="
                             f"{self.max_model_len}: without chunked_prefill a long prompt could never run")


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One row group of the batch.

    Attributes:
        request: the request (read its all_token_ids[start:start + num_tokens] for the input ids).
        num_tokens: tokens to run this step.
        start: position of the first of them (= KV tokens already cached).
        is_prefill: False only for a one-token decode step.
        samples: True when this chunk reaches the last known token, so a token is sampled from its logits.
        adapter_slot: resident LoRA slot for the per-row adapter index; -1 for the base model.
    """

    request: Request
    num_tokens: int
    start: int
    is_prefill: bool
    samples: bool
    adapter_slot: int


@dataclass(slots=True)
class ScheduledBatch:
    """What the runner executes this step; block tables map request_id -> KV block ids."""

    items: list[ScheduledRequest] = field(default_factory=list)
    block_tables: dict[str, list[int]] = field(default_factory=dict)
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)  # cancelled this step; tell their clients

    @property
    def num_tokens(self) -> int:
        return sum(it.num_tokens for it in self.items)

    @property
    def adapters(self) -> set[str]:
        return {it.request.adapter for it in self.items if it.request.adapter is not None}

    def __len__(self):
        return len(self.items)


class Scheduler:
    """Waiting and running queues over one BlockManager and, optionally, an AdapterRegistry.

    Args:
        config: SchedulerConfig.
        block_manager: the KV block allocator.
        registry: an AdapterRegistry (anything with acquire/release/pin/unpin/ensure_resident/max_loras);
            None serves the base model only.

    Raises:
        ValueError if max_model_len tokens cannot fit the KV cache.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, registry=None):
        cap = block_manager.num_blocks * block_manager.block_size
        if config.max_model_len > cap:
            raise ValueError(f"max_model_len={config.max_model_len}: exceeds the KV cache ({cap} tokens = "
                             f"{block_manager.num_blocks} blocks x {block_manager.block_size})")
        self.config, self.blocks, self.registry = config, block_manager, registry
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self.num_preemptions = 0
        self._draining: str | None = None

    # -- intake ---------------------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request; acquires its adapter.

        Raises:
            PromptTooLong if the prompt leaves no room to generate within max_model_len; QueueFull at
            max_waiting; AdapterNotFound for an unknown or draining adapter; ValueError on a duplicate id.
        """
        n, limit = request.num_prompt_tokens, self.config.max_model_len
        if n >= limit:
            raise PromptTooLong(f"prompt: {n} tokens; the limit is {limit - 1} (max_model_len={limit} "
                                "includes at least one generated token)")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"queue: {len(self.waiting)} requests waiting (max_waiting="
                            f"{self.config.max_waiting}); retry later")
        if request.request_id in self._by_id:
            raise ValueError(f"request_id={request.request_id!r}: already queued")
        if request.adapter is not None:
            if self.registry is None:
                raise AdapterNotFound(f"adapter {request.adapter!r}: this server has no adapters")
            request.adapter_uid = self.registry.acquire(request.adapter)
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self._by_id[request.request_id] = request

    def get(self, request_id: str) -> Request:
        try:
            return self._by_id[request_id]
        except KeyError:
            raise RequestNotFound(f"request {request_id!r}: not queued or running") from None

    def abort(self, request_id: str) -> None:
        """Cancel by id (freed at the next step). Raises RequestNotFound."""
        self.get(request_id).cancel()

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        """Build the next batch (possibly empty, e.g. while adapters load)."""
        batch = ScheduledBatch()
        for req in [r for r in (*self.running, *self.waiting) if r.cancelled]:
            self.finish(req, FinishReason.CANCELLED)
            batch.finished.append(req)

        budget = self.config.max_num_batched_tokens
        self.running.sort(key=lambda r: r.arrival_time)
        decodes_left = sum(1 for r in self.running if r.is_decoding)
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if req.is_decoding:
                decodes_left -= 1
            want = min(req.num_pending_tokens, budget - decodes_left)
            if want <= 0:
                i += 1
                continue
            while not self.blocks.allocate(req, want):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # preempted itself: everyone after it is gone too
            budget -= want
            self._emit(batch, req, want)
            i += 1

        if not batch.preempted:
            self._admit(batch, budget)
        for it in batch.items:
            batch.block_tables[it.request.request_id] = list(it.request.block_table)
        return batch

    def _order_waiting(self) -> set[int]:
        """Reorder the queue adapter-aware (see the module docstring); returns ids of the aged requests."""
        tier = getattr(self.registry, "tier", None)
        if tier is None or not self.waiting:
            return set()
        oldest = time.monotonic() - self.config.adapter_age_cap_s
        aged = {id(r) for r in self.waiting if r.num_preemptions or r.arrival_time <= oldest}
        rank = {id(r): 0 if id(r) in aged else 1 if r.adapter is None or tier(r.adapter) == "resident" else 2
                for r in self.waiting}
        self.waiting = deque(sorted(self.waiting, key=lambda r: rank[id(r)]))  # stable: queue order kept
        return aged

    def waiting_for_adapters(self) -> int:
        """Queued requests whose adapter is not resident (the /metrics gauge; safe from another thread)."""
        tier = getattr(self.registry, "tier", None)
        if tier is None:
            return 0
        return sum(1 for r in list(self.waiting) if r.adapter is not None and tier(r.adapter) != "resident")

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        aged = self._order_waiting()
        skipped: list[Request] = []
        # a resident adapter taking no new requests (its slot is wanted by an aged request); kept across steps
        # until that request gets a slot, so one slot really drains
        draining = self._draining if self._draining and self.registry.tier(self._draining) == "resident" else None
        wanted = False
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            slot = -1
            if req.adapter is not None:
                slot = None if req.adapter == draining else self.registry.ensure_resident(req.adapter)
                if slot is None:
                    skipped.append(req)
                    if id(req) in aged and self.registry.tier(req.adapter) == "host":
                        wanted = True
                        if draining is None:
                            draining = self.registry.slot_to_free()  # every slot runs: let one drain for it
                    continue
            cached = self.blocks.lookup_prefix(req)
            pending = req.num_tokens - len(cached) * self.blocks.block_size
            want = min(pending, budget) if self.config.chunked_prefill else pending
            if want > budget or not self.blocks.allocate(req, want, cached):
                skipped.append(req)
                break  # out of budget or blocks: keep FIFO order for the rest
            req.status, req.adapter_slot = RequestStatus.RUNNING, slot
            if req.adapter is not None:
                self.registry.pin(req.adapter)
            self.running.append(req)
            budget -= want
            self._emit(batch, req, want)
        self.waiting.extendleft(reversed(skipped))
        self._draining = draining if wanted else None

    def _emit(self, batch: ScheduledBatch, req: Request, n: int) -> None:
        start = req.num_computed_tokens
        batch.items.append(ScheduledRequest(req, n, start, not req.is_decoding, start + n == req.num_tokens,
                                            req.adapter_slot))

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req)
        if req.adapter is not None:
            self.registry.unpin(req.adapter)
        req.status, req.adapter_slot = RequestStatus.PREEMPTED, -1
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- results --------------------------------------------------------------------------------------------
    def update(self, batch: ScheduledBatch, sampled: dict[str, int]) -> list[Request]:
        """Apply one step's results: advance computed tokens, register full blocks, append sampled tokens.

        Args:
            batch: the batch returned by `schedule`.
            sampled: request_id -> sampled token id, for every item with `samples=True`.

        Returns:
            Requests that finished this step (stop token, max_tokens or max_model_len).
        """
        done = []
        for it in batch.items:
            req = it.request
            if req.is_finished:
                continue
            req.num_computed_tokens = it.start + it.num_tokens
            self.blocks.cache_full_blocks(req)
            if not it.samples:
                continue
            if req.request_id not in sampled:
                raise KeyError(f"request {req.request_id!r}: sampled a token this step but none was given")
            reason = req.append_token(sampled[req.request_id], self.config.max_model_len)
            if reason is not None:
                self.finish(req, reason)
                done.append(req)
        return done

    def finish(self, req: Request, reason: FinishReason, error: str | None = None) -> None:
        """End a request now (stop string seen, client gone, runner error): free blocks, release adapter."""
        if req.is_finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            if req.adapter is not None:
                self.registry.unpin(req.adapter)
        else:
            self.waiting.remove(req)
        self.blocks.free(req)
        if req.adapter is not None:
            self.registry.release(req.adapter)
        req.status, req.finish_reason, req.error, req.adapter_slot = RequestStatus.FINISHED, reason, error, -1
        self._by_id.pop(req.request_id, None)

    def stats(self) -> dict:
        """Queue depths and counters for /metrics."""
        return {"waiting": len(self.waiting), "running": len(self.running), "preemptions": self.num_preemptions,
                **{f"kv_{k}": v for k, v in self.blocks.stats().items()}}
