"""A fleet on the bundled SmolLM2 (NF4 via qconvert): 200 adapters in an --adapter-store, 600 requests spread
Zipf-like over them at concurrency 32, 8 resident slots and a host budget of 40 adapters' bytes.

Every reply is checked against models.generate() run offline for its adapter (same prompt per adapter, so one
reference per adapter actually requested; the adapters sharing a prompt run as one batch, a row each); the host
tier's peak bytes (recorded under the registry lock at every insertion) never pass the budget; each adapter is read
from the store once per host eviction (the store's read counter against the registry's per-name eviction counter);
and a cross-tenant request is 403 with no disk access.
Kept small for the suite (2 new tokens: a prefill and a decode step; prompts of a few tokens; rank-2 adapters on
q_proj and v_proj)."""
import asyncio
import json
import random

import httpx
import pytest
import torch

from qlora_kit.formats import LoraConfig
from qlora_kit.models import SamplingParams as ModelSampling
from qlora_kit.models import (add_adapter, adapter_params, generate, load_peft_adapter, projection_shapes,
                              read_peft_adapter, remove_adapter, save_peft_adapter)
from qlora_kit.qserve.config import ServeConfig
from qlora_kit.qserve.server import start
from tests.conftest import linked_copy

pytestmark = [pytest.mark.slow, pytest.mark.integration]

FLEET, OTHER = "sk-fleet-0000", "sk-other-0000"
N_ADAPTERS, N_REQUESTS, CONCURRENCY, SLOTS, HOST_ADAPTERS, NEW_TOKENS = 200, 600, 32, 8, 40, 2
PROMPTS = ["The capital of France is", "List three colors:", "Water boils at", "My favourite animal is"]


def _names():
    return [f"f{i:03d}" for i in range(N_ADAPTERS)]


def _zipf_trace(n, k, s=1.1, seed=0):
    rnd = random.Random(seed)
    weights = [1 / (i + 1) ** s for i in range(k)]
    return rnd.choices(range(k), weights=weights, k=n)


@pytest.fixture(scope="module")
def fleet(smollm2_nf4, tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    ckpt = linked_copy(smollm2_nf4, root / "smollm2-135m-instruct")
    store = root / "store"
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": FLEET, "tenant": "fleet", "adapters": ["f*"]},
                                         {"key": OTHER, "tenant": "other", "adapters": ["g*"]}]}))
    from qlora_kit.models import load_model

    model = load_model(ckpt, compute_dtype=torch.float32)
    for i, name in enumerate(_names()):  # rank 2, random non-zero B: each adapter changes the output
        torch.manual_seed(1000 + i)
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "v_proj"),
                         base_model_name_or_path=ckpt.name)
        add_adapter(model, 999, cfg)
        with torch.no_grad():
            for key, p in adapter_params(model, 999).items():
                if ".lora_b." in key:
                    p.copy_(0.2 * torch.randn_like(p))
        save_peft_adapter(model, 999, store / name, cfg)
        remove_adapter(model, 999)
    nbytes = read_peft_adapter(store / "f000", projection_shapes(model), (), torch.float32).nbytes
    del model
    config = ServeConfig(str(ckpt), port=0, api_keys=str(keys), adapter_store=str(store), dtype="float32",
                         dequantize_base=True, max_loras=SLOTS, cpu_adapter_budget=str(HOST_ADAPTERS * nbytes),
                         max_num_seqs=CONCURRENCY, max_num_batched_tokens=512, max_model_len=128,
                         kv_cache_tokens=8192, max_waiting=1024, max_tokens_limit=16)
    handle = start(config)
    handle.nbytes, handle.store_dir = nbytes, store
    yield handle
    handle.stop()


def _offline(handle, folders, prompt_ids):
    """models.generate of one prompt under each adapter in `folders`, one row each in one batch (adapter j in
    scratch slot 500 + j, not a serving slot); the decoded texts in the order of `folders`."""
    model, tok = handle.engine.model, handle.engine.tokenizer
    slots = []
    with handle.engine.runner.lock:
        try:
            for j, folder in enumerate(folders):
                load_peft_adapter(model, folder, 500 + j, dtype=handle.engine.lora_dtype)
                slots.append(500 + j)
            outs = generate(model, [prompt_ids] * len(slots), ModelSampling(max_tokens=NEW_TOKENS), adapter_ids=slots,
                            stop_token_ids=tok.stop_token_ids)
        finally:
            for slot in slots:
                remove_adapter(model, slot)
    return [tok.decode(out) for out in outs]


async def _run(url, trace, names):
    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers={"Authorization": f"Bearer {FLEET}"}) as client:
        async def one(k):
            async with sem:
                body = {"model": names[k], "prompt": PROMPTS[k % 4], "max_tokens": NEW_TOKENS, "temperature": 0}
                r = await client.post("/v1/completions", json=body)
                return k, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

        return await asyncio.gather(*(one(k) for k in trace))


def test_fleet_of_200_adapters_zipf_over_8_slots_and_40_in_host_memory(fleet):
    reg, store, names = fleet.engine.registry, fleet.engine.registry.store, _names()
    probes = store.probes
    r = httpx.post(fleet.url + "/v1/completions", json={"model": "f001", "prompt": "Hi", "max_tokens": 2},
                   headers={"Authorization": f"Bearer {OTHER}"}, timeout=60)
    assert r.status_code == 403 and "tenant 'other' may not use adapter 'f001'" in r.json()["error"]["message"]
    assert store.probes == probes and store.total_reads == 0 and "f001" not in reg  # no disk access at all

    trace = _zipf_trace(N_REQUESTS, N_ADAPTERS)
    replies = asyncio.run(_run(fleet.url, trace, names))
    fails = [(names[k], code, text) for k, code, text in replies if code != 200]
    assert not fails, fails[:3]

    stats = reg.stats.snapshot()
    budget = HOST_ADAPTERS * fleet.nbytes
    assert 0 < stats["host_peak_bytes"] <= budget and stats["host_budget_bytes"] == budget
    assert stats["evictions"]["host"] > 0 and stats["evictions"]["resident"] > 0  # the tiers were exercised
    used = sorted(set(trace))
    drops = reg.stats.host_drops
    for k in range(N_ADAPTERS):  # one read per first use and per re-use after each eviction, no more
        name = names[k]
        held = reg.tier(name) in ("host", "resident")
        expect = drops[name] + held if k in used else 0
        assert store.reads[name] == expect, (name, store.reads[name], drops[name], reg.tier(name))
    assert store.total_reads == stats["loads"]["host"]

    tok = fleet.engine.tokenizer
    refs = {}
    for p, prompt in enumerate(PROMPTS):
        ks = [k for k in used if k % 4 == p]
        refs.update(zip(ks, _offline(fleet, [fleet.store_dir / names[k] for k in ks], tok.encode(prompt))))
    wrong = [(names[k], text, refs[k]) for k, _, text in replies if text != refs[k]]
    assert not wrong, wrong[:3]
    assert len(set(refs.values())) > 1  # the adapters do change the output
    print(f"\nfleet: {len(used)} of {N_ADAPTERS} adapters used by {N_REQUESTS} requests; loads {stats['loads']}, "
          f"evictions {stats['evictions']}, requests by tier {stats['requests']}, "
          f"host peak {stats['host_peak_bytes']} of {budget} bytes")
