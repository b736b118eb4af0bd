"""Scheduler driven by scripted request traces: admission, token budget, chunked prefill, preemption and
resume, cancellation, prefix hits keyed by adapter, adapter slots and draining. No model: the "runner" is
`step()`, which samples token 7 for every row that samples."""
import random

import pytest

from qlora_kit.qserve.adapters import AdapterRegistry, RegistryConfig
from qlora_kit.qserve.engine.block_manager import BlockManager
from qlora_kit.qserve.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from qlora_kit.qserve.engine.scheduler import Scheduler, SchedulerConfig
from qlora_kit.qserve.errors import AdapterNotFound, PromptTooLong, QueueFull, RequestNotFound

pytestmark = pytest.mark.unit


def make(num_blocks=64, block_size=4, prefix=True, registry=None, **cfg):
    cfg.setdefault("max_model_len", min(64, num_blocks * block_size))
    cfg.setdefault("max_num_seqs", 8)
    cfg.setdefault("adapter_age_cap_s", 1e9)  # traces use arrival times 0, 1, ...: no request ages unless asked
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size, prefix), registry)


def rq(n, rid, t, max_tokens=4, adapter=None, start=1):
    return Request(list(range(start, start + n)), SamplingParams(max_tokens=max_tokens), adapter=adapter,
                   request_id=rid, arrival_time=t)


def step(s, token=7):
    batch = s.schedule()
    done = s.update(batch, {it.request.request_id: token for it in batch.items if it.samples})
    return batch, done


def rows(batch):
    return [(it.request.request_id, it.num_tokens, it.is_prefill) for it in batch.items]


def make_registry(tmp_path, max_loras=2, names="abc"):
    for n in names:
        d = tmp_path / n
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
        (d / "adapter_model.safetensors").write_bytes(b"")
    reg = AdapterRegistry(RegistryConfig(allowed_root=str(tmp_path), max_loras=max_loras), lambda n, p: (n, 10))
    for n in names:
        reg.add(n, n)
    return reg


# -- config and errors ---------------------------------------------------------------------------------------
def test_config_errors():
    with pytest.raises(ValueError, match="max_num_seqs=0: must be an integer >= 1"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_seqs=9 > max_num_batched_tokens=8"):
        SchedulerConfig(max_num_seqs=9, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="without chunked_prefill a long prompt could never run"):
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32, chunked_prefill=False)
    with pytest.raises(ValueError, match=r"max_model_len=100: exceeds the KV cache \(32 tokens = 8 blocks x 4\)"):
        Scheduler(SchedulerConfig(max_model_len=100, max_num_batched_tokens=100), BlockManager(8, 4))


def test_prompt_too_long_and_queue_full_and_unknowns():
    s = make(max_model_len=16, max_waiting=2)
    with pytest.raises(PromptTooLong, match=r"prompt: 16 tokens; the limit is 15 \(max_model_len=16"):
        s.add(rq(16, "long", 0))
    s.add(rq(3, "a", 0)), s.add(rq(3, "b", 1))
    with pytest.raises(QueueFull, match=r"queue: 2 requests waiting \(max_waiting=2\); retry later"):
        s.add(rq(3, "c", 2))
    s2 = make()
    s2.add(rq(3, "a", 0))
    with pytest.raises(ValueError, match="request_id='a': already queued"):
        s2.add(rq(3, "a", 1))
    with pytest.raises(RequestNotFound, match="request 'zz': not queued or running"):
        s.abort("zz")
    with pytest.raises(AdapterNotFound, match="adapter 'x': this server has no adapters"):
        s2.add(rq(3, "x", 0, adapter="x"))


def test_unknown_adapter_with_registry(tmp_path):
    s = make(registry=make_registry(tmp_path))
    with pytest.raises(AdapterNotFound, match="adapter 'nope': is not loaded"):
        s.add(rq(3, "r", 0, adapter="nope"))
    assert not s.has_unfinished


# -- admission, budget, chunked prefill -------------------------------------------------------------------
def test_chunked_prefill_under_token_budget():
    s = make(max_num_batched_tokens=8, max_num_seqs=4)
    s.add(rq(5, "r1", 0)), s.add(rq(12, "r2", 1))
    b, _ = step(s)
    assert rows(b) == [("r1", 5, True), ("r2", 3, True)] and b.num_tokens == 8
    assert [it.samples for it in b.items] == [True, False]
    b, _ = step(s)
    assert rows(b) == [("r1", 1, False), ("r2", 7, True)]
    assert b.items[1].start == 3
    b, _ = step(s)
    assert rows(b) == [("r1", 1, False), ("r2", 2, True)] and b.items[1].samples
    assert s.get("r2").output_token_ids == [7]


def test_decodes_keep_their_token_when_a_long_prefill_runs_first():
    s = make(max_num_batched_tokens=8)
    s.add(rq(20, "old", 0)), s.add(rq(2, "young", 1))
    step(s)  # old: 8-token chunk; young waits for budget
    b, _ = step(s)
    assert rows(b) == [("old", 8, True)]
    b, _ = step(s)  # old's last 4 tokens, then young's prompt (2) fits the rest of the budget
    assert rows(b) == [("old", 4, True), ("young", 2, True)]
    b, _ = step(s)
    assert rows(b) == [("old", 1, False), ("young", 1, False)]


def test_new_requests_join_between_decode_steps_and_max_num_seqs():
    s = make(max_num_seqs=2)
    s.add(rq(3, "r1", 0, max_tokens=3))
    step(s)
    s.add(rq(3, "r2", 1)), s.add(rq(3, "r3", 2))
    b, _ = step(s)
    assert rows(b) == [("r1", 1, False), ("r2", 3, True)] and s.get("r3").status is RequestStatus.WAITING
    b, done = step(s)
    assert [r.request_id for r in done] == ["r1"] and done[0].finish_reason is FinishReason.LENGTH
    b, _ = step(s)
    assert rows(b) == [("r2", 1, False), ("r3", 3, True)]


def test_no_chunking_waits_for_a_step_with_room():
    s = make(max_num_batched_tokens=16, max_model_len=16, chunked_prefill=False)
    s.add(rq(10, "a", 0)), s.add(rq(10, "b", 1, start=50))
    b, _ = step(s)
    assert rows(b) == [("a", 10, True)]
    b, _ = step(s)
    assert rows(b) == [("a", 1, False), ("b", 10, True)]


def test_stop_token_and_engine_finish():
    s = make()
    r = Request([1, 2], SamplingParams(max_tokens=10), request_id="r", arrival_time=0, eos_token_id=9)
    s.add(r)
    _, done = step(s, token=9)
    assert done == [r] and r.finish_reason is FinishReason.STOP and r.block_table == []
    r2 = rq(3, "r2", 1)
    s.add(r2)
    step(s)
    s.finish(r2, FinishReason.STOP)  # the engine saw a stop string
    assert r2.is_finished and not s.has_unfinished and s.blocks.num_free_blocks == 64


# -- preemption ----------------------------------------------------------------------------------------------
def test_preempt_latest_arrival_and_resume_by_recompute():
    s = make(num_blocks=4, block_size=2, prefix=False, max_model_len=8)
    r1 = rq(3, "r1", 0, max_tokens=3)
    s.add(r1), s.add(rq(3, "r2", 1, max_tokens=3, start=50))
    step(s)  # each holds 2 blocks, has 1 output
    b, _ = step(s)  # 4th token of each fits block 2
    assert rows(b) == [("r1", 1, False), ("r2", 1, False)] and s.blocks.num_free_blocks == 0
    b, _ = step(s)  # r1 needs a 3rd block: r2 (arrived later) is preempted
    r2 = [r for r in b.preempted]
    assert [r.request_id for r in r2] == ["r2"] and rows(b) == [("r1", 1, False)]
    r2 = r2[0]
    assert r2.status is RequestStatus.PREEMPTED and r2.block_table == [] and r2.num_computed_tokens == 0
    assert s.waiting[0] is r2 and s.num_preemptions == 1 and r2.output_token_ids == [7, 7]
    assert r1.is_finished  # max_tokens=3
    b, _ = step(s)  # resume: prompt + both outputs re-prefilled, then a token is sampled
    assert rows(b) == [("r2", 5, True)] and b.items[0].samples and b.items[0].start == 0
    assert r2.output_token_ids == [7, 7, 7] and r2.finish_reason is FinishReason.LENGTH


def test_preempting_itself_when_it_is_the_latest():
    s = make(num_blocks=3, block_size=2, prefix=False, max_model_len=6)
    s.add(rq(2, "r1", 0, max_tokens=4)), s.add(rq(2, "r2", 5, max_tokens=4, start=20))
    step(s)
    b, _ = step(s)  # r1 takes the third block; r2 (latest) finds none free and preempts itself
    assert [r.request_id for r in b.preempted] == ["r2"] and rows(b) == [("r1", 1, False)]
    while s.has_unfinished:
        step(s)
    assert s.blocks.num_free_blocks == 3


def test_resume_hits_own_prefix_cache():
    s = make(num_blocks=4, block_size=2, max_model_len=8)
    s.add(rq(5, "r1", 0, max_tokens=1))
    step(s)
    assert s.blocks.stats()["cached_blocks"] == 2
    s.add(rq(5, "r2", 1, max_tokens=1))  # same prompt, same (base) adapter
    b, _ = step(s)
    assert rows(b) == [("r2", 1, True)] and b.items[0].start == 4 and s.get  # 4 tokens from the cache
    assert s.blocks.prefix_hit_tokens == 4


# -- cancellation --------------------------------------------------------------------------------------------
def test_cancel_running_and_waiting(tmp_path):
    reg = make_registry(tmp_path)
    s = make(max_num_seqs=1, registry=reg)
    a, b = rq(3, "a", 0, max_tokens=50, adapter="a"), rq(3, "b", 1, adapter="b")
    s.add(a), s.add(b)
    step(s)
    assert reg.get("a").running == 1 and reg.get("b").in_flight == 1
    a.cancel()
    s.abort("b")
    batch, _ = step(s)
    assert {r.request_id for r in batch.finished} == {"a", "b"} and not batch.items
    assert a.finish_reason is FinishReason.CANCELLED and b.finish_reason is FinishReason.CANCELLED
    assert reg.get("a").in_flight == 0 and reg.get("a").running == 0 and reg.get("b").in_flight == 0
    assert s.blocks.num_free_blocks == 64 and not s.has_unfinished


# -- adapters ------------------------------------------------------------------------------------------------
def test_prefix_hits_are_keyed_by_adapter(tmp_path):
    s = make(registry=make_registry(tmp_path))
    s.add(rq(9, "a1", 0, max_tokens=1, adapter="a"))
    step(s)
    s.add(rq(9, "b1", 1, max_tokens=1, adapter="b")), s.add(rq(9, "base", 2, max_tokens=1))
    s.add(rq(9, "a2", 3, max_tokens=1, adapter="a"))
    b, _ = step(s)
    # (base and a2, whose adapter is resident, are admitted ahead of b1: the adapter-aware order)
    assert [(it.request.request_id, it.start) for it in b.items] == [("base", 0), ("a2", 8), ("b1", 0)]
    assert {it.request.request_id: it.adapter_slot for it in b.items} == {"b1": 1, "base": -1, "a2": 0}


def test_at_most_max_loras_adapters_per_batch(tmp_path):
    reg = make_registry(tmp_path, max_loras=1)
    s = make(registry=reg)
    s.add(rq(3, "a", 0, max_tokens=2, adapter="a")), s.add(rq(3, "b", 1, max_tokens=2, adapter="b"))
    s.add(rq(3, "a2", 2, max_tokens=2, adapter="a")), s.add(rq(3, "base", 3, max_tokens=2))
    b, _ = step(s)  # b waits (its adapter cannot take the slot from a running adapter); those behind go ahead
    # (the base request first: no adapter was resident yet, and the base is preferred like a resident adapter)
    assert rows(b) == [("base", 3, True), ("a", 3, True), ("a2", 3, True)] and b.adapters == {"a"}
    assert [r.request_id for r in s.waiting] == ["b"]
    step(s)  # a and a2 finish; a's slot frees up
    b, _ = step(s)
    assert rows(b) == [("b", 3, True)] and reg.get("a").slot == -1 and reg.get("b").slot == 0


def test_resident_adapters_preferred_until_the_age_cap(tmp_path):
    """Requests for resident adapters go ahead of older ones that would evict; past adapter_age_cap_s the old one
    goes first, and when it finds every slot held by running requests, that slot takes no new requests until it
    frees; other requests (the base here) are still admitted."""
    import time

    now = time.monotonic()
    reg = make_registry(tmp_path, max_loras=1)
    for n in "abc":
        reg.load(n)
    s = make(registry=reg, max_num_seqs=8, adapter_age_cap_s=30.0)
    s.add(rq(3, "a0", now, max_tokens=3, adapter="a"))
    step(s)  # a0 runs: "a" is resident
    s.add(rq(3, "b0", now, max_tokens=2, adapter="b")), s.add(rq(3, "a1", now + 1, max_tokens=3, adapter="a"))
    b, _ = step(s)  # b0 cannot take the slot from running a0; a1 (resident) goes ahead
    assert [it.request.request_id for it in b.items] == ["a0", "a1"] and [r.request_id for r in s.waiting] == ["b0"]
    b, _ = step(s)  # a0 done; a1 still decoding; b0 still waits
    assert [it.request.request_id for it in b.items] == ["a0", "a1"] and [r.request_id for r in s.waiting] == ["b0"]
    s.waiting[0].arrival_time = now - 60  # b0 is now past the cap
    s.add(rq(3, "a2", now + 2, max_tokens=2, adapter="a")), s.add(rq(3, "base", now + 3, max_tokens=2))
    b, _ = step(s)  # b0 aged, "b" in host memory, the one slot runs a1: a2 may not join it, the base may
    assert [it.request.request_id for it in b.items] == ["a1", "base"]
    assert [r.request_id for r in s.waiting] == ["b0", "a2"]
    b, _ = step(s)  # a1 finished: b0 takes the slot
    assert [it.request.request_id for it in b.items] == ["base", "b0"] and reg.tier("b") == "resident"
    assert s.waiting_for_adapters() == 1  # a2 ("a" was evicted for "b")


def test_adapter_on_disk_waits_for_load(tmp_path):
    reg = make_registry(tmp_path, names="a")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "adapter_config.json").write_text("{}")
    (tmp_path / "z" / "adapter_model.safetensors").write_bytes(b"")
    reg.register("z", "z")  # registered, not loaded
    s = make(registry=reg)
    s.add(rq(3, "r", 0, adapter="z"))
    b, _ = step(s)
    assert not b.items and reg.pending_loads() == ["z"]
    reg.load("z")  # the engine does this in a worker thread
    b, _ = step(s)
    assert rows(b) == [("r", 3, True)]


def test_unload_drains_then_not_found(tmp_path):
    reg = make_registry(tmp_path)
    s = make(registry=reg)
    s.add(rq(3, "r", 0, max_tokens=2, adapter="a"))
    step(s)
    assert reg.unload("a") is False
    with pytest.raises(AdapterNotFound, match="adapter 'a': is being unloaded"):
        s.add(rq(3, "late", 1, adapter="a"))
    _, done = step(s)  # the running request still finishes on its adapter
    assert [r.request_id for r in done] == ["r"] and "a" not in reg
    with pytest.raises(AdapterNotFound, match="adapter 'a': is not loaded"):
        s.add(rq(3, "later", 2, adapter="a"))


# -- a random trace with invariants ----------------------------------------------------------------------
def test_random_trace_invariants(tmp_path):
    rnd = random.Random(1)
    reg = make_registry(tmp_path, max_loras=2, names="abcd")
    cfg = dict(max_num_batched_tokens=24, max_num_seqs=6, max_model_len=40)
    s = make(num_blocks=16, block_size=4, registry=reg, **cfg)
    reqs, t = [], 0
    for _ in range(400):
        if len(reqs) < 60 and rnd.random() < 0.5:
            r = rq(rnd.randint(1, 30), f"r{t}", t, max_tokens=rnd.randint(1, 12),
                   adapter=rnd.choice([None, "a", "b", "c", "d"]), start=rnd.choice([1, 1, 100]))
            s.add(r)
            reqs.append(r)
            t += 1
        if rnd.random() < 0.03 and s.running:
            rnd.choice(s.running).cancel()
        b, _ = step(s, token=rnd.randint(0, 50))
        assert b.num_tokens <= cfg["max_num_batched_tokens"] and len(b) <= cfg["max_num_seqs"]
        assert len(b.adapters) <= 2 and len({it.request.request_id for it in b.items}) == len(b)
        held = sum(blk.ref_count > 0 for blk in s.blocks.blocks)
        assert held + s.blocks.num_free_blocks == 16
        for r in s.running:
            assert len(r.block_table) == s.blocks.blocks_for(r.num_computed_tokens) or r.num_pending_tokens
    while s.has_unfinished:
        step(s)
    assert len(reqs) == 60 and all(r.is_finished for r in reqs)
    for r in reqs:
        if r.finish_reason is FinishReason.LENGTH:
            assert r.num_output_tokens == r.sampling.max_tokens or r.num_tokens == cfg["max_model_len"]
    assert s.blocks.num_free_blocks == 16 and all(i.in_flight == 0 and i.running == 0 for i in reg.list())
    assert s.num_preemptions > 0 and s.blocks.prefix_hit_tokens > 0
