"""Issue 13: a seeded mutator over the four kinds of untrusted input (a safetensors header, a quant state, an
adapter config, a request body), a few hundred cases in all. Every case ends in the package's own error (or, for
the server, a 4xx) or in a result that is sound; never another exception, a 500, a hang, or a corrupt file
accepted. safetensors' own reader is the oracle for headers: a file it refuses must be refused here too.
"""
import copy
import json
import math
import random
import struct
import time

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from qlora_kit.formats import FormatError, LoraConfig, dequantize_4bit, from_entries, quantize_4bit, to_entries
from qlora_kit.formats.errors import QloraKitError
from qlora_kit.formats.io import read_header

pytestmark = pytest.mark.unit

ODD = [None, True, False, 0, -1, 1, 3, 2**64, -(2**63) - 1, 10**30, 1e-300, 1e308, float("nan"), float("inf"), "",
       "x", "5", "64", [], [1], [True], [-2], [1.5], {}, {"a": 1}, [[[]]], "(.|.)*!", "q_proj(", "a" * 300]


def _mutate(obj, rnd: random.Random, depth: int = 0):
    """One random structural edit of a JSON-like value (a copy)."""
    obj = copy.deepcopy(obj)
    if isinstance(obj, dict) and obj and depth < 3 and rnd.random() < 0.5:
        key = rnd.choice(list(obj))
        op = rnd.randrange(4)
        if op == 0:
            obj[key] = rnd.choice(ODD)
        elif op == 1:
            del obj[key]
        elif op == 2:
            obj[rnd.choice(["extra", "__metadata__", key + "_", "lora_alpha", "seed"])] = rnd.choice(ODD)
        else:
            obj[key] = _mutate(obj[key], rnd, depth + 1)
        return obj
    if isinstance(obj, list) and obj and rnd.random() < 0.7:
        i = rnd.randrange(len(obj))
        obj[i] = rnd.choice(ODD) if rnd.random() < 0.5 else _mutate(obj[i], rnd, depth + 1)
        return obj
    return rnd.choice(ODD + [[obj], {"k": obj}])


# -- safetensors headers -------------------------------------------------------------------------------------
def _valid_file() -> bytes:
    g = torch.Generator().manual_seed(0)
    return st_save({"a": torch.randn(4, 3, generator=g), "b": torch.arange(6, dtype=torch.int32),
                    "c": torch.randn(2, generator=g).to(torch.bfloat16)}, metadata={"format": "pt"})


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _header_cases(rnd: random.Random, n: int):
    raw = _valid_file()
    header, body = _split(raw)
    for _ in range(n):
        kind = rnd.randrange(3)
        if kind == 0:  # JSON-level edit of the header
            text = json.dumps(_mutate(header, rnd)).encode()
            yield struct.pack("<Q", len(text)) + text + body
        elif kind == 1:  # byte flips anywhere
            b = bytearray(raw)
            for _ in range(rnd.randint(1, 4)):
                b[rnd.randrange(len(b))] = rnd.randrange(256)
            yield bytes(b)
        else:  # truncation or junk appended
            yield raw[:rnd.randrange(len(raw))] if rnd.random() < 0.5 else raw + bytes(rnd.randint(1, 16))


def test_fuzz_safetensors_headers(tmp_path):
    rnd = random.Random(13)
    path = tmp_path / "f.safetensors"
    refused = 0
    for i, data in enumerate(_header_cases(rnd, 200)):
        path.write_bytes(data)
        try:
            st_load(data)
            theirs = True
        except Exception:  # safetensors raises its own SafetensorError (and others) on bad files
            theirs = False
        try:
            read_header(path)
            ours = True
        except FormatError:
            ours = False
        refused += not ours
        assert ours <= theirs, f"case {i}: safetensors refuses this file but read_header accepted it: {data[:200]!r}"
    assert refused > 100  # the mutator does produce corrupt files


# -- quant states --------------------------------------------------------------------------------------------
def test_fuzz_quant_states():
    rnd = random.Random(11)
    name = "w"
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    good = to_entries(name, quantize_4bit(w, "nf4", 64, True))
    blob_key = f"{name}.quant_state.bitsandbytes__nf4"
    fields = json.loads(bytes(good[blob_key].tolist()))
    accepted = 0
    for i in range(150):
        entries = {k: v.clone() for k, v in good.items()}
        if rnd.random() < 0.5:
            entries[blob_key] = torch.tensor(list(json.dumps(_mutate(fields, rnd)).encode()), dtype=torch.uint8)
        else:
            key = rnd.choice([k for k in entries if k != blob_key])
            t = entries[key]
            op = rnd.randrange(4)
            if op == 0 and t.is_floating_point():
                t.view(-1)[rnd.randrange(t.numel())] = rnd.choice([float("nan"), float("inf"), -1e30, 0.0])
            elif op == 1:
                entries[key] = torch.zeros_like(t)
            elif op == 2:
                entries[key] = t.view(-1)[: max(0, t.numel() - rnd.randint(1, 3))].clone()
            else:
                del entries[key]
        try:
            packed = from_entries(name, entries)
        except FormatError:
            continue
        accepted += 1
        out = dequantize_4bit(packed, torch.float32)
        assert tuple(out.shape) == tuple(packed.state.shape) and torch.isfinite(out).all(), f"case {i}"
    assert accepted < 150  # most mutations are refused; the accepted ones decode to finite weights


# -- adapter configs -----------------------------------------------------------------------------------------
MODULES = [f"model.layers.{i}.{m}" for i in range(4) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]


def test_fuzz_adapter_configs():
    rnd = random.Random(7)
    good = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
            "lora_dropout": 0.05, "use_rslora": False, "base_model_name_or_path": "base",
            "rank_pattern": {"q_proj": 4, r"layers\.1\..*": 2}, "alpha_pattern": {"v_proj": 8.0}}
    t0 = time.monotonic()
    for i in range(200):
        obj = _mutate(good, rnd)
        if rnd.random() < 0.3:  # random pattern keys, ReDoS shapes included
            key = "".join(rnd.choice("ab.()|*+?[]{}^$\\d1,") for _ in range(rnd.randint(1, 12)))
            obj = {**good, rnd.choice(["rank_pattern", "alpha_pattern"]): {key: 2, "(.|.)*!": 3}}
        try:
            cfg = LoraConfig.from_json(obj)
            for m in MODULES:
                assert math.isfinite(cfg.scale_for(m)) and cfg.rank_for(m) >= 1
        except QloraKitError:
            pass
    assert time.monotonic() - t0 < 30  # no case backtracks for long (each is milliseconds)


# -- request bodies ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from qlora_kit.qserve.config import ServeConfig
    from qlora_kit.qserve.engine.engine import Engine
    from qlora_kit.qserve.server import start
    from tests.unit.qserve._tiny_serve import CharTokenizer, tiny_model

    root = tmp_path_factory.mktemp("fuzz")
    folder, model = tiny_model(root)
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "sk-fuzz-0001", "adapters": ["x*"]}]}))
    cfg = ServeConfig(str(folder), port=0, api_keys=str(keys), max_model_len=64, kv_cache_tokens=1024, block_size=4,
                      max_tokens_limit=8, max_body_bytes=1 << 16)
    handle = start(cfg, Engine(model, CharTokenizer(), cfg, base_names=("llama",)).start())
    yield handle
    handle.stop()


def test_fuzz_request_bodies(server):
    rnd = random.Random(5)
    good = {"model": "llama", "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0.7, "top_p": 0.9, "seed": 3,
            "stop": ["Z"], "stream": False}
    statuses = []
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk-fuzz-0001"}, timeout=30) as client:
        for i in range(150):
            body = _mutate(good, rnd)
            if rnd.random() < 0.1:
                r = client.post("/v1/completions", content=json.dumps(body)[:rnd.randint(0, 40)],
                                headers={"Content-Type": "application/json"})
            else:
                r = client.post("/v1/completions", content=json.dumps(body, allow_nan=True),
                                headers={"Content-Type": "application/json"})
            statuses.append(r.status_code)
            assert r.status_code < 500, f"case {i}: {body!r} -> {r.status_code} {r.text[:300]}"
            if r.status_code >= 400:
                assert r.json()["error"]["message"], r.text
            elif body.get("stream") is not True:
                assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
        assert client.get("/health").json() == {"status": "ok"}  # the engine survived every case
    assert statuses.count(200) > 5 and sum(s == 400 for s in statuses) > 50
