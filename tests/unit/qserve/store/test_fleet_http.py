"""Adapters from --adapter-store over real HTTP on the tiny model: 100 concurrent first requests for one cold
adapter read it once; a tenant's forbidden name is 403 before any disk access; /v1/adapters and /metrics show
tiers, loads and last use."""
import asyncio
import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qlora_kit.qserve.config import ServeConfig
from qlora_kit.qserve.engine.engine import Engine
from qlora_kit.qserve.server import start

from .._tiny_serve import CharTokenizer, make_adapter, tiny_model

pytestmark = pytest.mark.unit
ADMIN, ACME, GLOBEX = "sk-admin-123", "sk-acme-1234", "sk-globex-12"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    folder, model = tiny_model(root)
    store = root / "store"
    for i, name in enumerate(["acme-cold", "acme-x", "globex-y", "acme-slow"]):
        make_adapter(model, store / name, 4, 10 + i)
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": ADMIN, "admin": True}, {"key": ACME, "adapters": ["acme-*"]},
                                         {"key": GLOBEX, "adapters": ["globex-*"]}]}))
    cfg = ServeConfig(str(folder), api_keys=str(keys), adapter_store=str(store), max_loras=2,
                      cpu_adapter_budget="1MiB", max_model_len=64, kv_cache_tokens=4096, block_size=4,
                      max_tokens_limit=32, max_num_seqs=32, port=0)
    handle = start(cfg, Engine(model, CharTokenizer(), cfg, base_names=("llama",)).start())
    yield handle
    handle.stop()


def _post(server, body, key):
    return httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60)


def test_100_concurrent_first_requests_load_once(server):
    reg, store = server.engine.registry, server.engine.registry.store
    assert "acme-cold" not in reg and store.total_reads == 0

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     headers={"Authorization": f"Bearer {ACME}"}) as client:
            body = {"model": "acme-cold", "prompt": [3, 1, 4, 1, 5], "max_tokens": 4, "temperature": 0}
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(100)))

    replies = asyncio.run(burst())
    assert [r.status_code for r in replies] == [200] * 100, replies[0].text
    texts = {r.json()["choices"][0]["text"] for r in replies}
    assert len(texts) == 1 and len(texts.pop()) == 4  # greedy: one answer for one prompt
    assert store.reads == {"acme-cold": 1} and reg.stats.loads["host"] == 1 and reg.loads == 1
    assert reg.stats.requests["store"] + reg.stats.requests["loading"] + reg.stats.requests["host"] \
        + reg.stats.requests["resident"] == 100


def test_forbidden_unknown_and_malformed_names_cost_no_disk_access(server):
    reg, store = server.engine.registry, server.engine.registry.store
    probes, reads = store.probes, store.total_reads
    r = _post(server, {"model": "globex-y", "prompt": [1, 2], "max_tokens": 2}, ACME)
    assert r.status_code == 403 and "may not use adapter 'globex-y'" in r.json()["error"]["message"]
    assert (store.probes, store.total_reads) == (probes, reads) and "globex-y" not in reg
    r = _post(server, {"model": "../../etc", "prompt": [1, 2], "max_tokens": 2}, ADMIN)
    assert r.status_code == 404 and store.probes == probes  # malformed: no lookup at all
    r = _post(server, {"model": "acme-missing", "prompt": [1, 2], "max_tokens": 2}, ACME)
    assert r.status_code == 404 and "no such model or adapter" in r.json()["error"]["message"]
    assert store.probes == probes + 1 and store.total_reads == reads  # one lstat inside the store
    r = _post(server, {"model": "globex-y", "prompt": [1, 2], "max_tokens": 2}, GLOBEX)
    assert r.status_code == 200 and store.reads["globex-y"] == 1


def test_adapters_listing_and_metrics(server):
    _post(server, {"model": "acme-x", "prompt": [2, 7], "max_tokens": 2}, ACME)
    rows = {a["name"]: a for a in httpx.get(server.url + "/v1/adapters",
                                            headers={"Authorization": f"Bearer {ADMIN}"}).json()["adapters"]}
    assert {"acme-cold", "acme-x"} <= set(rows)
    x = rows["acme-x"]
    assert x["tier"] in ("resident", "host") and x["bytes"] > 0 and x["in_flight"] == 0 and x["last_use"] > 0
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    samples = {(s.name, s.labels.get("tier", s.labels.get("source"))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.labels.get("model_name") == "llama"}
    reads = server.engine.registry.store.total_reads  # acme-cold, globex-y (tests above) and acme-x: one each
    assert reads == 3 and samples[("qserve:adapter_loads_total", "host")] == reads
    assert samples[("qserve:adapter_load_seconds_count", "store")] == reads  # no Hub loads on this server
    assert samples[("qserve:adapter_load_seconds_count", "hub")] == 0
    assert samples[("qserve:adapter_requests_waiting", None)] == 0
    assert ("qserve:adapter_evictions_total", "resident") in samples
    assert samples[("qserve:adapter_host_budget_bytes", None)] == 1048576


def test_a_request_waiting_for_its_adapter_does_not_block_the_batch(server):
    """While one adapter's read is held up (its loader waits on a gate), base and resident-adapter requests are
    served; the waiting request is served once the read finishes."""
    reg = server.engine.registry
    gate, inner = threading.Event(), reg._loader

    def held(name, path):
        if name == "acme-slow":
            gate.wait(60)
        return inner(name, path)

    reg._loader = held
    try:
        slow = {}
        t = threading.Thread(target=lambda: slow.update(r=_post(server, {"model": "acme-slow", "prompt": [1, 2],
                                                                         "max_tokens": 3}, ACME)))
        t.start()
        deadline = time.monotonic() + 30
        while reg.tier("acme-slow") != "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reg.tier("acme-slow") == "loading"
        for model in ("llama", "acme-cold", "llama"):
            assert _post(server, {"model": model, "prompt": [5, 6], "max_tokens": 3}, ACME).status_code == 200
        assert reg.tier("acme-slow") == "loading" and t.is_alive()
        gate.set()
        t.join(60)
        assert slow["r"].status_code == 200 and len(slow["r"].json()["choices"][0]["text"]) == 3
    finally:
        gate.set()
        reg._loader = inner
