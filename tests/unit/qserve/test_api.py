"""HTTP layer on a tiny model over loopback: SSE streaming, usage, /v1/models, admin load/unload, error JSON."""
import json

import httpx
import pytest

from qlora_kit.qserve.config import ServeConfig
from qlora_kit.qserve.engine.engine import Engine
from qlora_kit.qserve.server import start

from ._tiny_serve import CharTokenizer, make_adapter, tiny_model

pytestmark = pytest.mark.unit
ADMIN, USER = "sk-admin-123", "sk-user-1234"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    folder, model = tiny_model(root)
    make_adapter(model, root / "allowed" / "a1", 4, 1)
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": ADMIN, "admin": True}, {"key": USER, "adapters": ["a*"]}]}))
    cfg = ServeConfig(str(folder), port=0, api_keys=str(keys), allowed_root=str(root / "allowed"), max_model_len=64,
                      kv_cache_tokens=512, block_size=4, max_tokens_limit=32, max_body_bytes=2048)
    handle = start(cfg, Engine(model, CharTokenizer(), cfg, base_names=("llama",)).start())
    yield handle
    handle.stop()


def _post(server, path, body, key=USER, **kw):
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60, **kw)


def test_completion_stream_and_usage(server):
    body = {"model": "llama", "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0}
    full = _post(server, "/v1/completions", body).json()
    assert full["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True,
                      "stream_options": {"include_usage": True}}, headers={"Authorization": f"Bearer {USER}"}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == full["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_admin_load_use_unload(server):
    assert _post(server, "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": "a1"}).status_code == 403
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": "a1"}, key=ADMIN)
    assert r.status_code == 200, r.text
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {USER}"}).json()["data"]]
    assert ids == ["llama", "a1"]
    r = _post(server, "/v1/chat/completions", {"model": "a1", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]  # CharTokenizer has none
    assert _post(server, "/v1/completions", {"model": "a1", "prompt": [4, 5], "max_tokens": 3}).status_code == 200
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "a1"}, key=ADMIN).json()["unloaded"] is True
    r = _post(server, "/v1/completions", {"model": "a1", "prompt": [4, 5], "max_tokens": 3})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "llama", "prompt": [1], "top_p": 0}, 400, "top_p"),
    ({"model": "llama", "prompt": [1], "n": 2}, 400, "n"),
    ({"model": "llama", "prompt": [1], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "llama", "prompt": [999]}, 400, "token ids"),
    ({"model": "llama", "prompt": list(range(64))}, 413, "prompt"),
    ({"model": "llama", "prompt": "A" * 3000}, 413, "limit is 2048"),
    ({"model": "zzz", "prompt": [1]}, 403, "may not use"),
])
def test_errors(server, body, status, needle):
    r = _post(server, "/v1/completions", body)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text


def test_health_and_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/metrics").status_code == 401  # keys on: /metrics is for the admin key
    r = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {USER}"})
    assert r.status_code == 403 and "reading /metrics needs an admin key" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and "qserve:engine_steps_total" in r.text


def test_cli_adapters_commands(server):
    from click.testing import CliRunner

    from qlora_kit.qserve.cli import main

    run = CliRunner()
    out = run.invoke(main, ["adapters", "load", "a2", "a1", "--url", server.url, "--api-key", ADMIN])
    assert out.exit_code == 0 and "added successfully" in out.output, out.output
    out = run.invoke(main, ["adapters", "list", "--url", server.url, "--api-key", ADMIN])
    assert out.exit_code == 0 and "a2\t" in out.output and "slots free" in out.output, out.output
    out = run.invoke(main, ["adapters", "unload", "a2", "--url", server.url, "--api-key", USER])
    assert out.exit_code == 1 and "HTTP 403" in out.output
    out = run.invoke(main, ["adapters", "unload", "a2", "--url", server.url, "--api-key", ADMIN])
    assert out.exit_code == 0 and "unloaded" in out.output


def test_disconnected_stream_is_cancelled(server):
    body = {"model": "llama", "prompt": [1, 2], "max_tokens": 32, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {USER}"}) as r:
        next(r.iter_lines())
    import time

    for _ in range(200):
        if not server.engine.scheduler.has_unfinished:
            break
        time.sleep(0.02)
    assert not server.engine.scheduler.has_unfinished
    assert server.engine.metrics.value("vllm:request_success_total", finished_reason="abort") >= 1  # vLLM's name
