"""/metrics over HTTP, parsed by prometheus_client's own parser: vLLM's metric names with the model_name label (the
--served-model-name), and qserve's per-adapter / per-tenant counters adding up to vLLM's totals (two independent
records: the engine counts vllm:*, the HTTP app qserve:*) after requests to 2 adapters and the base, by 2 tenants,
streamed and not."""
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qlora_kit.qserve.config import ServeConfig
from qlora_kit.qserve.engine.engine import Engine
from qlora_kit.qserve.metrics import Metrics
from qlora_kit.qserve.server import start

from ._tiny_serve import CharTokenizer, make_adapter, tiny_model

pytestmark = pytest.mark.unit
ADMIN, ACME, GLOBEX = "sk-admin-123", "sk-acme-1234", "sk-globex-12"
SERVED = "tiny-base"
VLLM_NAMES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prompt_tokens",
              "vllm:generation_tokens", "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
              "vllm:request_success", "vllm:time_per_output_token_seconds", "vllm:kv_cache_usage_perc",
              "vllm:num_preemptions", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
              "vllm:request_prompt_tokens", "vllm:request_generation_tokens")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    folder, model = tiny_model(root)
    a1 = make_adapter(model, root / "a1", 4, 1)
    a2 = make_adapter(model, root / "a2", 8, 2)
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": ADMIN, "admin": True, "tenant": "ops"},
                                         {"key": ACME, "tenant": "acme", "adapters": ["a1", "a2"]},
                                         {"key": GLOBEX, "tenant": "globex", "adapters": ["a2"]}]}))
    cfg = ServeConfig(str(folder), adapters=(("a1", str(a1)), ("a2", str(a2))), port=0, api_keys=str(keys),
                      served_model_name=SERVED, max_model_len=64, kv_cache_tokens=512, block_size=4,
                      max_tokens_limit=32)
    engine = Engine(model, CharTokenizer(), cfg, base_names=("llama",)).start()
    for name, path in cfg.adapters:
        engine.registry.add(name, path, trusted=True)
    handle = start(cfg, engine)
    yield handle
    handle.stop()


def _post(server, body, key):
    return httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60)


def _stream_usage(server, body, key) -> dict:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return chunks[-1]["usage"]


def _scrape(server) -> dict[str, list]:
    r = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def _total(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_vllm_names_and_per_adapter_tenant_counters_add_up(server):
    models = [m["id"] for m in httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {ACME}"})
              .json()["data"]]
    assert models == [SERVED, "a1", "a2"]  # --served-model-name names the base
    sent = [(SERVED, ACME, 3), ("a1", ACME, 5), ("a2", ACME, 4), ("a2", GLOBEX, 6), ("a1", ACME, 2), (SERVED, ACME, 7)]
    usage = {}
    for i, (model, key, n) in enumerate(sent):
        body = {"model": model, "prompt": list(range(1, 2 + i)), "max_tokens": n, "temperature": 0, "ignore_eos": True}
        u = _stream_usage(server, body, key) if i % 2 else _post(server, body, key).json()["usage"]
        assert u["completion_tokens"] == n
        tenant = "acme" if key == ACME else "globex"
        got = usage.setdefault((model if model != SERVED else "", tenant), [0, 0, 0])
        got[0], got[1], got[2] = got[0] + 1, got[1] + u["prompt_tokens"], got[2] + n
    assert _post(server, {"model": "a1", "prompt": [1], "max_tokens": 33}, ACME).status_code == 400  # refused early

    fam = _scrape(server)
    for name in VLLM_NAMES:
        assert name in fam, name
        assert {s.labels["model_name"] for s in fam[name]} == {SERVED}, name
    n, prompt, gen = len(sent), sum(u[1] for u in usage.values()), sum(u[2] for u in usage.values())
    assert _total(fam["vllm:request_success"], "vllm:request_success_total", finished_reason="length") == n
    assert _total(fam["vllm:prompt_tokens"], "vllm:prompt_tokens_total") == prompt
    assert _total(fam["vllm:generation_tokens"], "vllm:generation_tokens_total") == gen
    assert _total(fam["vllm:e2e_request_latency_seconds"], "vllm:e2e_request_latency_seconds_count") == n
    assert _total(fam["vllm:time_per_output_token_seconds"], "vllm:time_per_output_token_seconds_count") == gen - n

    reqs = fam["qserve:requests"]
    for (adapter, tenant), (count, p, g) in usage.items():  # each adapter x tenant, as sent
        assert _total(reqs, "qserve:requests_total", adapter=adapter, tenant=tenant, status="length") == count
        assert _total(fam["qserve:prompt_tokens"], "qserve:prompt_tokens_total", adapter=adapter, tenant=tenant) == p
        assert _total(fam["qserve:generation_tokens"], "qserve:generation_tokens_total", adapter=adapter,
                      tenant=tenant) == g
    # the per-adapter / per-tenant series add up to vLLM's totals
    assert _total(reqs, "qserve:requests_total", status="length") == n
    assert _total(fam["qserve:prompt_tokens"], "qserve:prompt_tokens_total") == prompt
    assert _total(fam["qserve:generation_tokens"], "qserve:generation_tokens_total") == gen
    assert sum(_total(reqs, "qserve:requests_total", adapter=a, status="length") for a in ("", "a1", "a2")) == n
    assert _total(reqs, "qserve:requests_total", adapter="a1", tenant="acme", status="rejected") == 1
    assert _total(fam["qserve:e2e_request_latency_seconds"], "qserve:e2e_request_latency_seconds_count") == n + 1
    assert _total(fam["qserve:adapters_registered"], "qserve:adapters_registered") == 2


def test_another_module_adds_its_own_families_to_the_registry():
    m = Metrics("base")
    hits = m.counter("qserve:adapter_cache_hits", "Adapter cache hits by tier", ("tier",))
    m.labels(hits, "gpu").inc(3)
    m.on_scrape(lambda: [m.family("gauge", "qserve:adapter_cache_bytes", "Bytes held", 1024, tier="cpu")])
    fam = {f.name: f for f in text_string_to_metric_families(m.render())}
    assert fam["qserve:adapter_cache_hits"].samples[0].labels == {"model_name": "base", "tier": "gpu"}
    assert m.value("qserve:adapter_cache_hits_total", tier="gpu") == 3
    assert fam["qserve:adapter_cache_bytes"].samples[0].value == 1024
