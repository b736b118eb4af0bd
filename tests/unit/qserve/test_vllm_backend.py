"""qserve.vllm_backend without vLLM: the child's command line and environment, the max LoRA rank taken from the
adapters, option checks, the front's adapter checks (rank above the server's, another base model), and the front over a
stand-in for vLLM's OpenAI server: store and Hub adapters loaded into vLLM once, load metrics labelled by source."""
import asyncio
import contextlib
import json
import threading

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client.parser import text_string_to_metric_families

from qlora_kit.formats import LoraConfig, save_adapter
from qlora_kit.qserve._socket import bind_listener, run_in_thread
from qlora_kit.qserve.adapters import AdapterRegistry, RegistryConfig
from qlora_kit.qserve.api import KeyStore, create_app
from qlora_kit.qserve.config import ServeConfig
from qlora_kit.qserve.errors import AdapterRefused
from qlora_kit.qserve.metrics import Metrics
from qlora_kit.qserve.store import AdapterStore, HubSource
from qlora_kit.qserve.vllm_backend import VllmOptions, lora_rank, vllm_command
from qlora_kit.qserve.vllm_backend.front import VllmBackend, adapter_loader
from tests.hf_cache import offline_hub_cache

pytestmark = pytest.mark.unit
KEY = "base_model.model.model.layers.0.self_attn.q_proj."


def _ckpt(tmp_path):
    ckpt = tmp_path / "tiny-nf4"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "num_attention_heads": 9,
                                                  "num_key_value_heads": 3, "hidden_size": 576}))
    return ckpt


def _adapter(folder, rank, base="tiny-nf4", rank_pattern=None):
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=("q_proj",), base_model_name_or_path=base,
                     rank_pattern=rank_pattern or {})
    save_adapter(folder, cfg, {KEY + "lora_A.weight": torch.zeros(rank, 8), KEY + "lora_B.weight": torch.zeros(8, rank)})
    return folder


def test_command_has_plugin_lora_and_parallel_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    ckpt = _ckpt(tmp_path)
    a = _adapter(tmp_path / "a", 8)
    config = ServeConfig(str(ckpt), adapters=(("a", str(a)),), max_loras=3, max_cpu_loras=5, max_model_len=512,
                         kv_cache_tokens=100_000, dtype="bfloat16", dequantize_base=True)
    opts = VllmOptions(python="/x/python", tensor_parallel_size=2, pipeline_parallel_size=3, data_parallel_size=4)
    argv, env = vllm_command(config, opts, 8123, "sk-secret", "tiny-nf4", 8)
    line = " ".join(argv)
    assert argv[:3] == ["/x/python", "-m", "vllm.entrypoints.openai.api_server"]
    for want in ("--quantization qlora_nf4", "--load-format qlora_nf4", "--enable-lora", "--max-lora-rank 8",
                 "--max-loras 3", "--max-cpu-loras 5", "--tensor-parallel-size 2", "--pipeline-parallel-size 3",
                 "--data-parallel-size 4", f"--lora-modules a={a}", "--host 127.0.0.1", "--port 8123",
                 "--api-key sk-secret", "--served-model-name tiny-nf4", "--enforce-eager", "--dtype bfloat16"):
        assert want in line, want
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["QLORA_KIT_VLLM_DEQUANTIZE"] == "1"
    # 100k tokens * 2 (k, v) * 30 layers * 3 heads * 64 dims * 2 bytes = 2.15 GiB -> 3 whole GiB
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert "--lora-dtype" not in argv  # auto: vLLM's own default, the same rule as the native engine
    fp16 = ServeConfig(str(ckpt), lora_dtype="float16", kv_cache_tokens=100_000)
    assert " --lora-dtype float16" in " ".join(vllm_command(fp16, opts, 8123, "k", "tiny-nf4", 8)[0])


def test_served_model_name_and_chat_template_are_passed_on(tmp_path):
    ckpt = _ckpt(tmp_path)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    config = ServeConfig(str(ckpt), served_model_name="tea-base", chat_template=str(template))
    argv, _ = vllm_command(config, VllmOptions(), 8123, "k", config.served_name, 8)
    line = " ".join(argv)
    assert "--served-model-name tea-base" in line and f"--chat-template {template}" in line
    assert "--chat-template" not in vllm_command(ServeConfig(str(ckpt)), VllmOptions(), 8123, "k", "x", 8)[0]


def test_max_lora_rank_from_adapters_rounded_to_vllm_ranks(tmp_path):
    ckpt = _ckpt(tmp_path)
    root = tmp_path / "root"
    _adapter(root / "team" / "x", 8)
    _adapter(root / "y", 4, rank_pattern={"q_proj": 24})
    assert lora_rank(ServeConfig(str(ckpt), allowed_root=str(root)), VllmOptions()) == 32
    assert lora_rank(ServeConfig(str(ckpt)), VllmOptions()) == 16
    assert lora_rank(ServeConfig(str(ckpt)), VllmOptions(max_lora_rank=100)) == 128


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=0: must be an integer >= 1 \(flag --tensor-parallel-size\)"):
        VllmOptions(tensor_parallel_size=0)
    with pytest.raises(ValueError, match=r"max_lora_rank=1000: must be in \[1, 512\]"):
        VllmOptions(max_lora_rank=1000)


def test_front_refuses_rank_above_server_and_other_base(tmp_path):
    load = adapter_loader(("tiny-nf4",), 16)
    cfg, nbytes = load("ok", str(_adapter(tmp_path / "ok", 16)))
    assert cfg.r == 16 and nbytes == 2 * 16 * 8 * 4
    with pytest.raises(AdapterRefused, match=r"rank 32 is above the vLLM server's --max-lora-rank 16"):
        load("big", str(_adapter(tmp_path / "big", 32)))
    with pytest.raises(AdapterRefused, match="trained for base model 'other/Model-7B'"):
        load("other", str(_adapter(tmp_path / "other", 8, base="other/Model-7B")))


def test_child_that_dies_at_start_up_is_reported_with_its_log(tmp_path):
    import os
    import sys

    from qlora_kit.qserve.vllm_backend.launch import VllmProcess, free_port
    from qlora_kit.qserve.vllm_plugin.errors import BackendStartError

    argv = [sys.executable, "-c", "print('ValueError: bad flag --max-lora-rank 7'); raise SystemExit(3)"]
    proc = VllmProcess(argv, dict(os.environ), free_port(), "sk-x", tmp_path / "vllm.log")
    with pytest.raises(BackendStartError, match=r"vLLM exited with code 3 while starting \(log .*vllm.log: "
                                                r"ValueError: bad flag --max-lora-rank 7\)"):
        proc.start(timeout_s=60)


VLLM_METRICS = ('# HELP vllm:num_requests_running Number of requests in model execution batches.\n'
                '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="tiny-nf4"} 0.0\n')


@contextlib.contextmanager
def _front_over_stand_in(registry, keys, refuse=()):
    """The vLLM front (create_app over VllmBackend, on a real socket) over a stand-in for vLLM's OpenAI server: the
    routes the front calls (runtime LoRA load, completions, /metrics), answering a load of a name in `refuse` with
    vLLM's 400 error body. vLLM itself is run by tests/integration/test_vllm_*. Yields (the front's url, the load
    bodies the stand-in accepted, in order)."""
    loads, lock = [], threading.Lock()
    vllm = FastAPI()

    @vllm.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        body = await request.json()
        await asyncio.sleep(0.2)  # the first requests all arrive while this load runs
        if body["lora_name"] in refuse:
            return JSONResponse({"object": "error", "message": f"cannot load {body['lora_name']}",
                                 "type": "BadRequestError", "code": 400}, status_code=400)
        with lock:
            loads.append(body)
        return {"status": "ok"}

    @vllm.post("/v1/completions")
    async def complete(request: Request):
        model = (await request.json())["model"]
        known = model == "tiny-nf4" or any(x["lora_name"] == model for x in loads)
        return {"choices": [{"text": f"from {model}" if known else "NOT LOADED", "finish_reason": "length"}]}

    @vllm.get("/metrics")
    async def metrics():
        return PlainTextResponse(VLLM_METRICS)

    up = uvicorn.Server(uvicorn.Config(vllm, log_level="warning"))
    up_thread, up_url = run_in_thread(up, bind_listener("127.0.0.1", 0), "stand-in-vllm")
    app = create_app(VllmBackend(up_url, "sk-up", registry, 32, Metrics("tiny-nf4")), KeyStore.from_file(keys),
                     "tiny-nf4", 4096, 64)
    front = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    front_thread, url = run_in_thread(front, bind_listener("127.0.0.1", 0), "front")
    try:
        yield url, loads
    finally:
        front.should_exit = up.should_exit = True
        front_thread.join(timeout=10), up_thread.join(timeout=10)


def test_front_resolves_store_adapters_and_loads_each_into_vllm_once(tmp_path, monkeypatch):
    """The front over a stand-in for vLLM's OpenAI server: 40 concurrent first requests for a store adapter validate
    it once (one store read) and call vLLM's runtime load API once; a tenant's forbidden name is 403 with no store
    access. An allowed Hub id (from an offline Hugging Face cache) resolves the same way, with one Hub call, and
    vLLM is given its snapshot folder; a Hub id off the allow-list is 404 with none."""
    store = tmp_path / "store"
    _adapter(store / "acme-a", 8)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "sk-acme-000", "adapters": ["acme-*", "acme/*", "globex/hub-b"]}]}))
    registry = AdapterRegistry(RegistryConfig(max_loras=2), adapter_loader(("tiny-nf4",), 16),
                               store=AdapterStore(store), hub=HubSource(("acme/*",)))
    snapshot = offline_hub_cache(monkeypatch, tmp_path / "hf", "acme/hub-a", _adapter(tmp_path / "hub-a", 8))
    offline_hub_cache(monkeypatch, tmp_path / "hf", "globex/hub-b", _adapter(tmp_path / "hub-b", 8))
    with _front_over_stand_in(registry, keys) as (url, loads):
        async def burst(model, n):
            async with httpx.AsyncClient(base_url=url, timeout=60,
                                         headers={"Authorization": "Bearer sk-acme-000"}) as client:
                body = {"model": model, "prompt": "hi", "max_tokens": 2}
                return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(n)))

        replies = asyncio.run(burst("acme-a", 40))
        assert [r.status_code for r in replies] == [200] * 40, replies[0].text
        assert {r.json()["choices"][0]["text"] for r in replies} == {"from acme-a"}
        assert [x["lora_name"] for x in loads] == ["acme-a"] and loads[0]["lora_path"] == str(store / "acme-a")
        assert registry.store.reads == {"acme-a": 1}
        probes = registry.store.probes
        (r,) = asyncio.run(burst("globex-b", 1))
        assert r.status_code == 403 and registry.store.probes == probes
        (r,) = asyncio.run(burst("acme-missing", 1))
        assert r.status_code == 404 and len(loads) == 1
        replies = asyncio.run(burst("acme/hub-a", 20))
        assert [r.status_code for r in replies] == [200] * 20, replies[0].text
        assert {r.json()["choices"][0]["text"] for r in replies} == {"from acme/hub-a"}
        assert [x["lora_path"] for x in loads[1:]] == [str(snapshot.resolve())]
        assert registry.hub.fetches == {"acme/hub-a": 1}
        (r,) = asyncio.run(burst("globex/hub-b", 1))  # cached, but not allowed
        assert r.status_code == 404 and registry.hub.total_fetches == 1 and len(loads) == 2


def test_front_load_metrics_carry_the_adapter_source(tmp_path, monkeypatch):
    """qserve:adapter_load_seconds{source} and qserve:adapter_load_failures_total{source} on the vLLM front, read
    from its /metrics (vLLM's own text after qserve's): a store adapter's first request counts as a load from
    source store, an allowed Hub id's as one from hub, an admin load by path as one from store. A load the front's
    checks refuse (rank above the server's --max-lora-rank) and one vLLM refuses count as failures of that source."""
    store, root = tmp_path / "store", tmp_path / "root"
    for kind, rank in (("ok", 8), ("big", 32), ("vetoed", 8)):
        _adapter(store / f"acme-{kind}", rank)
        _adapter(root / f"admin-{kind}", rank)
        offline_hub_cache(monkeypatch, tmp_path / "hf", f"acme/hub-{kind}", _adapter(tmp_path / f"hub-{kind}", rank))
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "sk-admin-000", "admin": True}]}))
    registry = AdapterRegistry(RegistryConfig(allowed_root=str(root), max_loras=2), adapter_loader(("tiny-nf4",), 16),
                               store=AdapterStore(store), hub=HubSource(("acme/*",)))
    status = {"ok": 200, "big": 400, "vetoed": 400}
    refuse = {"acme-vetoed", "acme/hub-vetoed", "admin-vetoed"}  # vLLM answers 400
    with _front_over_stand_in(registry, keys, refuse) as (url, loads):
        client = httpx.Client(base_url=url, timeout=60, headers={"Authorization": "Bearer sk-admin-000"})

        def scrape() -> dict[tuple[str, str], float]:
            text = client.get("/metrics").text
            assert "vllm:num_requests_running" in text
            return {(s.name, s.labels["source"]): s.value for fam in text_string_to_metric_families(text)
                    for s in fam.samples if s.name in ("qserve:adapter_load_seconds_count",
                                                       "qserve:adapter_load_failures_total")}

        def moved(before, after):
            return {k: v - before[k] for k, v in after.items() if v != before[k]}

        start = scrape()
        assert start == {(n, s): 0 for n in ("qserve:adapter_load_seconds_count", "qserve:adapter_load_failures_total")
                         for s in ("store", "hub")}
        for kind in status:
            for model in (f"acme-{kind}", f"acme/hub-{kind}"):
                r = client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
                assert r.status_code == status[kind], (model, r.text)
        by_request = scrape()
        for kind in status:
            r = client.post("/v1/load_lora_adapter", json={"lora_name": f"admin-{kind}", "lora_path": f"admin-{kind}"})
            assert r.status_code == status[kind], (kind, r.text)
        by_admin = scrape()
        client.close()
    assert [x["lora_name"] for x in loads] == ["acme-ok", "acme/hub-ok", "admin-ok"]
    assert registry.get("acme/hub-big").source == "hub" and "admin-vetoed" not in registry
    assert moved(start, by_request) == {("qserve:adapter_load_seconds_count", "store"): 1,
                                        ("qserve:adapter_load_seconds_count", "hub"): 1,
                                        ("qserve:adapter_load_failures_total", "store"): 2,
                                        ("qserve:adapter_load_failures_total", "hub"): 2}
    assert moved(by_request, by_admin) == {("qserve:adapter_load_seconds_count", "store"): 1,
                                           ("qserve:adapter_load_failures_total", "store"): 2}
