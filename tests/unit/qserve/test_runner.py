"""ModelRunner + paged KV cache: scheduled batches (chunked prefill, mixed decode/prefill, per-row adapters,
preemption, sliding window) produce exactly the greedy tokens of models.generate run one prompt at a time."""
import random

import pytest
import torch

from qlora_kit.models import SamplingParams as ModelSampling
from qlora_kit.models import generate, load_peft_adapter, remove_adapter
from qlora_kit.qserve.engine import BlockManager, Request, SamplingParams, Scheduler, SchedulerConfig
from qlora_kit.qserve.engine.lora import evict, install, read_adapter
from qlora_kit.qserve.engine.runner import ModelRunner

from ._tiny_serve import make_adapter, tiny_model

pytestmark = pytest.mark.unit


class _Slots:
    """Registry stand-in: adapter name -> fixed resident slot."""

    def __init__(self, slots):
        self.slots, self.max_loras = slots, len(slots)

    def acquire(self, name):
        return self.slots[name] + 1

    def ensure_resident(self, name):
        return self.slots[name]

    release = pin = unpin = lambda self, name: None


def _offline(model, folder, prompt, max_tokens):
    if folder is None:
        return generate(model, [prompt], ModelSampling(max_tokens=max_tokens))[0]
    load_peft_adapter(model, folder, 50)
    try:
        return generate(model, [prompt], ModelSampling(max_tokens=max_tokens), adapter_ids=[50])[0]
    finally:
        remove_adapter(model, 50)


def _drive(model, requests, num_blocks, block_size, budget, slots):
    blocks = BlockManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=min(64, num_blocks * block_size)),
                      blocks, _Slots(slots))
    runner = ModelRunner(model, num_blocks, block_size)
    for r in requests:
        sched.add(r)
    steps = 0
    while sched.has_unfinished:
        batch = sched.schedule()
        sched.update(batch, runner.run(batch))
        steps += 1
        assert steps < 500
    return sched


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("runner"), {}

    def get(variant):
        if variant not in cache:
            cache[variant] = tiny_model(root, variant)[1]
        return cache[variant]
    return get


@pytest.mark.parametrize("variant,num_blocks,budget", [("llama", 64, 48), ("llama", 8, 12), ("mistral", 64, 10)])
def test_batches_equal_offline_generate(tiny, tmp_path, variant, num_blocks, budget):
    model = tiny(variant)
    folders = [make_adapter(model, tmp_path / f"a{i}", rank=r, seed=i) for i, r in enumerate((2, 8, 16))]
    slots = {}
    for i, f in enumerate(folders):
        payload, _ = read_adapter(model, f"a{i}", str(f))
        install(model, payload, i)
        slots[f"a{i}"] = i
    rng = random.Random(0)
    cases = []
    for k in range(6):
        prompt = [rng.randrange(128) for _ in range(rng.randrange(3, 20))]
        adapter = None if k % 4 == 3 else f"a{k % 3}"
        cases.append((prompt, adapter, 6 + k))
    reqs = [Request(p, SamplingParams(temperature=0.0, max_tokens=n), a) for p, a, n in cases]
    sched = _drive(model, reqs, num_blocks, 4, budget, slots)
    if num_blocks == 8:
        assert sched.num_preemptions > 0  # the small cache forces recompute preemption
    for i in range(3):
        evict(model, i)
    for req, (prompt, adapter, n) in zip(reqs, cases):
        f = None if adapter is None else folders[int(adapter[1])]
        assert req.output_token_ids == _offline(model, f, prompt, n), (adapter, prompt)


def test_seeded_sampling_is_reproducible(tiny):
    model = tiny("llama")
    outs = []
    for _ in range(2):
        reqs = [Request([1, 2, 3, 4, 5], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=s))
                for s in (7, 7, 8)]
        _drive(model, reqs, 32, 4, 32, {})
        outs.append([r.output_token_ids for r in reqs])
    assert outs[0] == outs[1]
    assert outs[0][0] == outs[0][1] and outs[0][0] != outs[0][2]
