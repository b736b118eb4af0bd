"""One adapter, three verdicts: the same good and bad adapters through the trainer (`qtrain ask`), the native
engine's HTTP admin API and the vLLM front's (its own app and registry; the vLLM server itself is never reached,
since a bad adapter is refused before it is asked) get the same acceptance or the same reason.

The reason text comes from the one boundary, models.read_peft_adapter; the trainer reports it as
"<folder>: <reason>", both servers as "adapter '<name>' (<folder>): <reason>", the same HTTP status and body.
"""
import json

import httpx
import pytest
import torch
import uvicorn

from qlora_kit.formats import LoraConfig, save_adapter
from qlora_kit.formats.peft import KEY_PREFIX, LORA_A, LORA_B
from qlora_kit.models import MAX_RANK, AdapterError
from qlora_kit.qserve._socket import bind_listener, run_in_thread
from qlora_kit.qserve.api.auth import KeyStore
from qlora_kit.qserve.config import ServeConfig
from qlora_kit.qserve.server import start
from qlora_kit.qserve.vllm_backend.front import create_front, front_registry
from qlora_kit.trainer.ask import ask
from tests.unit.trainer._tiny import write_tiny_chat_model

pytestmark = pytest.mark.unit
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"  # (64 -> 64), (64 -> 32)


def _save(folder, pairs: dict, targets=("q_proj", "v_proj"), base="model", **cfg):
    r = next(iter(pairs.values()))[0].shape[0]
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, base_model_name_or_path=base, **cfg)
    tensors = {}
    for module, (a, b) in pairs.items():
        tensors[f"{KEY_PREFIX}{module}.{LORA_A}"], tensors[f"{KEY_PREFIX}{module}.{LORA_B}"] = a, b
    save_adapter(folder, config, tensors)
    return folder


def _adapters(root):
    """name -> (folder, the reason it is refused for, or None when it is good)."""
    ok = {Q: (torch.randn(4, 64), torch.randn(64, 4)), V: (torch.randn(4, 64), torch.randn(32, 4))}
    cases = {
        "good": (ok, {}, None),
        "other-base": (ok, {"base": "meta-llama/Llama-3-8B"}, "trained for base model 'meta-llama/Llama-3-8B'"),
        "no-base": (ok, {"base": None}, "has no base_model_name_or_path"),
        "wrong-shape": ({Q: (torch.randn(4, 32), torch.randn(64, 4))}, {}, "do not fit the base's (64, 64) weight"),
        "no-such-layer": ({"model.layers.7.self_attn.q_proj": (torch.randn(4, 64), torch.randn(64, 4))}, {},
                          "not a projection of the base"),
        "unknown-target": (ok, {"targets": ("q_proj", "qkv_proj")}, "target_modules ['qkv_proj'] are not projections"),
        "outside-targets": (ok, {"targets": ("q_proj",)}, "has weights but is not in target_modules"),
        "rank-too-big": ({Q: (torch.randn(MAX_RANK + 1, 64), torch.randn(64, MAX_RANK + 1))}, {},
                         f"rank {MAX_RANK + 1} outside [1, {MAX_RANK}]"),
        "nan": ({Q: (torch.full((4, 64), float("nan")), torch.randn(64, 4))}, {}, "weights hold NaN or inf"),
    }
    out = {}
    for name, (pairs, cfg, reason) in cases.items():
        targets = cfg.pop("targets", ("q_proj", "v_proj"))
        out[name] = (_save(root / name, pairs, targets, **cfg), reason)
    _save(root / "bad-config", ok)  # then broken: formats/ refuses it, the same text reaches every consumer
    cfg = json.loads((root / "bad-config" / "adapter_config.json").read_text())
    (root / "bad-config" / "adapter_config.json").write_text(json.dumps({**cfg, "lora_dropout": "0.1"}))
    out["bad-config"] = (root / "bad-config", "lora_dropout='0.1'")
    return out


@pytest.fixture(scope="module")
def setup(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("verdicts")
    base = write_tiny_chat_model(smollm2, root / "model")
    allowed = root / "allowed"
    adapters = _adapters(allowed)
    config = ServeConfig(str(base), port=0, allowed_root=str(allowed), dtype="float32", max_model_len=64,
                         kv_cache_tokens=256, max_body_bytes=4096)
    native = start(config)

    registry = front_registry(config, MAX_RANK)
    app = create_front(config, registry, "http://127.0.0.1:9", "sk-unused", KeyStore.from_file(None))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    _, vllm_url = run_in_thread(server, bind_listener("127.0.0.1", 0), "verdicts-vllm-front")
    yield base, adapters, native.url, vllm_url, registry
    server.should_exit = True
    native.stop()


def _load(url, name):
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name}, timeout=60)
    return r.status_code, r.json()


def test_same_adapter_same_verdict_everywhere(setup):
    base, adapters, native_url, vllm_url, _ = setup
    for name, (folder, reason) in adapters.items():
        if reason is None:
            assert ask(base, folder, ["hi"], max_tokens=1)[0].question == "hi"
            status, body = _load(native_url, name)
            assert status == 200 and body["adapter"]["name"] == name, body
            continue
        with pytest.raises(AdapterError) as trainer:
            ask(base, folder, ["hi"], max_tokens=1)
        assert reason in trainer.value.reason and str(trainer.value) == f"{folder}: {trainer.value.reason}", name
        native, vllm = _load(native_url, name), _load(vllm_url, name)
        assert native == vllm, name  # same status code and error body
        assert native[0] == 400 and native[1]["error"]["message"] == \
            f"adapter {name!r} ({folder.resolve()}): {trainer.value.reason}", name


def test_vllm_front_accepts_the_good_adapter(setup):
    """Its registry (what the front's load route calls before asking vLLM) accepts what the others accept."""
    _, _, _, _, registry = setup
    assert registry.add("good", "good").name == "good" and "good" in registry
