"""Writes the crafted files of tests/hostile/ (issue 13): every file here is bad input that a CLI must refuse
with exit code 2 and one line naming the file and the field. EXPECTED maps each file to that field or rule.

Regenerate (deterministic):  PYTHONPATH=. python -m tests.hostile.make
"""
import json
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent

# the tiny Llama every kind shares: head_dim 4, one layer
SOURCE_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 8,
                 "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                 "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                 "torch_dtype": "float32"}
Q = "model.layers.0.self_attn.q_proj.weight"


def _st(header, body: bytes = b"", hlen: int | None = None) -> bytes:
    """A safetensors file from a header (dict, or raw JSON bytes) and a body, optionally lying about N."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if hlen is None else hlen) + text + body


def _t(offsets, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


SAFETENSORS = {  # name -> (file bytes, what the one error line must name)
    "overlap": (_st({"a": _t([0, 8]), "b": _t([0, 8])}, bytes(8)), "overlaps the previous tensor"),
    "hole": (_st({"a": _t([0, 8]), "b": _t([16, 24])}, bytes(24)), "leaves a hole of 8 bytes"),
    "junk_before": (_st({"a": _t([8, 16])}, bytes(16)), "leaves a hole of 8 bytes before it"),
    "metadata_int": (_st({"__metadata__": {"format": 1}, "a": _t([0, 8])}, bytes(8)),
                     "__metadata__ must map strings to strings"),
    "offsets_string": (_st({"a": _t(["0", "8"])}, bytes(8)), "data_offsets"),
    "offsets_float": (_st({"a": _t([0.0, 8.0])}, bytes(8)), "data_offsets"),
    "offsets_three": (_st({"a": _t([0, 4, 8])}, bytes(8)), "data_offsets"),
    "shape_negative": (_st({"a": _t([0, 8], shape=(-2,))}, bytes(8)), "shape"),
    "shape_float": (_st({"a": _t([0, 8], shape=(2.0,))}, bytes(8)), "shape"),
    "shape_string": (_st({"a": _t([0, 8], shape=("2",))}, bytes(8)), "shape"),
    "dtype_list": (_st({"a": _t([0, 8], dtype=["F32"])}, bytes(8)), "unknown dtype"),
    "extra_field": (_st({"a": {**_t([0, 8]), "x": 1}}, bytes(8)), "entry must be exactly"),
    "duplicate_key": (_st(b'{"a":' + json.dumps(_t([0, 8])).encode() + b',"a":' + json.dumps(_t([0, 8])).encode()
                          + b"}", bytes(8)), "duplicate key 'a'"),
    "header_too_long": (_st({"a": _t([0, 8])}, bytes(8), hlen=10**6), "header length"),
    "not_json": (_st(b"{not json}   ", bytes(8)), "not valid JSON"),
    "deep_json": (_st(b"{" + b'"a":[' * 2000 + b"]" * 2000 + b"}"), "not valid JSON"),
    "trailing_bytes": (_st({"a": _t([0, 8])}, bytes(12)), "trailing bytes"),
    "size_mismatch": (_st({"a": _t([0, 4])}, bytes(4)), "do not fit F32 [2]"),
}

CONFIGS = {  # source config.json variants -> the field the line names (convert and serve alike)
    "list": ([], "must be a JSON object"),
    "quantization_config_string": ({**SOURCE_CONFIG, "quantization_config": "bnb"}, "quantization_config"),
    "missing_hidden_size": ({k: v for k, v in SOURCE_CONFIG.items() if k != "hidden_size"}, "hidden_size"),
    "zero_heads": ({**SOURCE_CONFIG, "num_attention_heads": 0}, "num_attention_heads"),
    "hidden_size_bool": ({**SOURCE_CONFIG, "hidden_size": True}, "hidden_size"),
    "vocab_size_string": ({**SOURCE_CONFIG, "vocab_size": "16"}, "vocab_size"),
    "kv_heads_not_divisor": ({**SOURCE_CONFIG, "num_key_value_heads": 3}, "num_key_value_heads"),
    "model_type_gpt2": ({**SOURCE_CONFIG, "model_type": "gpt2"}, "gpt2"),
}
RAW_CONFIGS = {"not_json": (b"{", "not valid JSON"), "deep": (b"[" * 20000 + b"]" * 20000, "not valid JSON")}

QUANT_STATES = {  # edits of the valid 4-bit checkpoint's tensors -> what the line names
    "quant_map_zero": (lambda t: t.__setitem__(f"{Q}.quant_map", torch.zeros(16)), f"{Q}.quant_map"),
    "nested_absmax_nan": (lambda t: t[f"{Q}.nested_absmax"].fill_(float("nan")), f"{Q}.nested_absmax"),
    "nested_quant_map_zero": (lambda t: t[f"{Q}.nested_quant_map"].zero_(), f"{Q}.nested_quant_map"),
    "nested_offset_negative": (lambda t: _blob(t, nested_offset=-1e6), f"{Q}.absmax: decoded absmax"),
    "shape_bool": (lambda t: _blob(t, shape=[True, 8]), "shape [True, 8]"),
    "dtype_list": (lambda t: _blob(t, dtype=["bfloat16"]), "dtype ['bfloat16']"),
    "nested_blocksize_huge": (lambda t: _blob(t, nested_blocksize=2**70), "nested_blocksize"),
    "blocksize_string": (lambda t: _blob(t, blocksize="64"), "blocksize '64'"),
    "quant_type_mismatch": (lambda t: _blob(t, quant_type="fp4"), "quant_type 'fp4' disagrees"),
    "blob_truncated": (lambda t: t.__setitem__(f"{Q}.quant_state.bitsandbytes__nf4",
                                               t[f"{Q}.quant_state.bitsandbytes__nf4"][:10].clone()), "not valid UTF-8 JSON"),
    "blob_list": (lambda t: t.__setitem__(f"{Q}.quant_state.bitsandbytes__nf4", torch.tensor(list(b"[1]"), dtype=torch.uint8)),
                  "JSON is a list"),
    "absmax_short": (lambda t: t.__setitem__(f"{Q}.absmax", t[f"{Q}.absmax"][:0].clone()), f"{Q}.absmax: expected"),
    "nested_quant_map_missing": (lambda t: t.pop(f"{Q}.nested_quant_map"), f"{Q}.nested_quant_map: required"),
}

ADAPTER_CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "model", "r": 1,
                  "lora_alpha": 2, "lora_dropout": 0.0, "target_modules": ["q_proj"], "bias": "none"}
ADAPTER_CONFIGS = {
    "alpha_null": ({"lora_alpha": None}, "lora_alpha=None"),
    "alpha_nan": ({"lora_alpha": float("nan")}, "lora_alpha=nan"),
    "alpha_string": ({"lora_alpha": "2"}, "lora_alpha='2'"),
    "r_zero": ({"r": 0}, "r=0"),
    "r_bool": ({"r": True}, "r=True"),
    "rank_pattern_list": ({"rank_pattern": [1, 2]}, "rank_pattern=[1, 2]"),
    "rank_pattern_value_string": ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern="),
    "alpha_pattern_bad_regex": ({"alpha_pattern": {"q_proj(": 2.0}}, "alpha_pattern: key 'q_proj('"),
    "alpha_pattern_lookahead": ({"alpha_pattern": {"(?=q)q_proj": 2.0}}, "alpha_pattern: key '(?=q)q_proj'"),
    "alpha_pattern_key_too_long": ({"alpha_pattern": {"a" * 300: 2.0}}, "at most 256 characters"),
    "targets_int": ({"target_modules": 5}, "target_modules=5"),
    "targets_list_int": ({"target_modules": [5]}, "target_modules=(5,)"),
    "rslora_string": ({"use_rslora": "false"}, "use_rslora='false'"),
    "dropout_string": ({"lora_dropout": "0.1"}, "lora_dropout='0.1'"),
    "base_name_int": ({"base_model_name_or_path": 5}, "base_model_name_or_path=5"),
    "peft_type_prefix": ({"peft_type": "PREFIX_TUNING"}, "peft_type 'PREFIX_TUNING'"),
}
RAW_ADAPTER_CONFIGS = {"not_json": (b'{"r": ', "not valid JSON"), "list": (b"[1, 2]", "expected a JSON object")}

KEY_FILES = {  # --api-keys files -> the field named
    "admin_string": ({"keys": [{"key": "sk-hostile-1", "admin": "false"}]}, "keys[0].admin='false'"),
    "base_string": ({"keys": [{"key": "sk-hostile-1", "base": "false"}]}, "keys[0].base='false'"),
    "admin_int": ({"keys": [{"key": "sk-hostile-1", "admin": 1}]}, "keys[0].admin=1"),
    "unknown_field": ({"keys": [{"key": "sk-hostile-1", "role": "admin"}]}, "unknown field(s) ['role']"),
    "entry_string": ({"keys": ["sk-hostile-1"]}, "keys[0]: must be an object"),
    "short_key": ({"keys": [{"key": "short"}]}, "keys[0].key must be a string of at least 8"),
    "key_int": ({"keys": [{"key": 123456789}]}, "keys[0].key=123456789"),
    "duplicate_key": ({"keys": [{"key": "sk-hostile-1"}, {"key": "sk-hostile-1"}]}, "keys[1] repeats"),
    "empty_keys": ({"keys": []}, "non-empty list under 'keys'"),
    "extra_top_level": ({"keys": [{"key": "sk-hostile-1"}], "admin": True}, "exactly one field, 'keys'"),
    "tenant_int": ({"keys": [{"key": "sk-hostile-1", "tenant": 7}]}, "keys[0].tenant=7"),
    "adapters_string": ({"keys": [{"key": "sk-hostile-1", "adapters": "acme*"}]}, "keys[0].adapters='acme*'"),
}
RAW_KEY_FILES = {"not_json": (b"{", "cannot read the API key file"),
                 "non_utf8": (b'{"keys": [{"key": "sk-\xff\xfe-hostile"}]}', "cannot read the API key file"),
                 "deep": (b"[" * 20000 + b"]" * 20000, "cannot read the API key file")}

JSONL = {  # --data files -> what the line names (with the line number)
    "non_utf8": (b'{"text": "caf\xe9"}\n', ":1: not valid UTF-8"),
    "not_json": (b'{"text": \n', ":1: not valid JSON"),
    "deep": (b"[" * 20000 + b"]" * 20000 + b"\n", ":1: not valid JSON"),
    "huge_int": (b'{"text": ' + b"9" * 5000 + b"}\n", ":1: not valid JSON"),
    "second_line": (b'{"text": "fine"}\n{"txet": "typo"}\n', ":2: expected"),
    "messages_not_list": (b'{"messages": "hi"}\n', "field messages: must be a non-empty list"),
    "bad_role": (b'{"messages": [{"role": "root", "content": "x"}]}\n', "field messages[0].role: must be one of"),
    "record_list": (b"[1, 2]\n", ":1: expected a JSON object"),
    "empty": (b"", "no examples"),
    "blank_only": (b"\n  \n", "no examples"),
}

TRAIN_CONFIGS = {  # --config files (TOML) -> the field named
    "lr_nan": ("learning_rate = nan\n", "learning_rate=nan: must be a finite number"),
    "lr_inf": ("learning_rate = inf\n", "learning_rate=inf: must be a finite number"),
    "grad_norm_nan": ("max_grad_norm = nan\n", "max_grad_norm=nan"),
    "targets_int": ("target_modules = 5\n", "target_modules=5"),
    "seed_huge": ("seed = 18446744073709551616\n", "seed=18446744073709551616"),
    "r_bool": ("r = true\n", "r=True"),
    "unknown_key": ("learning_rat = 1e-4\n", "unknown key 'learning_rat'"),
    "not_toml": ("learning_rate = \n", "Invalid value"),
    "non_utf8": (b"# caf\xe9\nr = 8\n", "not valid UTF-8"),
}


def _blob(tensors, **changes):
    key = f"{Q}.quant_state.bitsandbytes__nf4"
    fields = {**json.loads(bytes(tensors[key].tolist())), **changes}
    tensors[key] = torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)


def source_tensors(cfg: dict) -> dict[str, torch.Tensor]:
    """Seeded float32 weights of a one-layer Llama of `cfg` (tied embeddings: no lm_head)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // n
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
              "model.layers.0.input_layernorm.weight": (h,), "model.layers.0.post_attention_layernorm.weight": (h,),
              Q: (n * d, h), "model.layers.0.self_attn.k_proj.weight": (k * d, h),
              "model.layers.0.self_attn.v_proj.weight": (k * d, h), "model.layers.0.self_attn.o_proj.weight": (h, n * d),
              "model.layers.0.mlp.gate_proj.weight": (i, h), "model.layers.0.mlp.up_proj.weight": (i, h),
              "model.layers.0.mlp.down_proj.weight": (h, i)}
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def _source(folder: Path) -> Path:
    """A valid float32 source checkpoint of SOURCE_CONFIG (seeded)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SOURCE_CONFIG, indent=1))
    save_file(source_tensors(SOURCE_CONFIG), str(folder / "model.safetensors"))
    return folder


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def main() -> None:
    from qlora_kit.qconvert.convert import convert

    for sub in ("source", "safetensors", "config", "quant_state", "adapter_config", "keys", "jsonl", "train_config"):
        shutil.rmtree(HERE / sub, ignore_errors=True)
    (HERE / "adapter_config").mkdir()
    expected = {}
    src = _source(HERE / "source")
    for name, (data, needle) in SAFETENSORS.items():
        _write(HERE / "safetensors" / f"{name}.safetensors", data)
        expected[f"safetensors/{name}.safetensors"] = needle
    for name, (cfg, needle) in CONFIGS.items():
        _write(HERE / "config" / f"{name}.json", json.dumps(cfg, indent=1))
        expected[f"config/{name}.json"] = needle
    for name, (raw, needle) in RAW_CONFIGS.items():
        _write(HERE / "config" / f"{name}.json", raw)
        expected[f"config/{name}.json"] = needle
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "nf4"
        convert(str(src), out, progress=False)
        (HERE / "quant_state").mkdir()
        shutil.copy(out / "config.json", HERE / "quant_state" / "config.json")
        for name, (edit, needle) in QUANT_STATES.items():
            tensors = load_file(str(out / "model.safetensors"))
            edit(tensors)
            save_file(tensors, str(HERE / "quant_state" / f"{name}.safetensors"))
            expected[f"quant_state/{name}.safetensors"] = needle
    g = torch.Generator().manual_seed(1)  # a valid rank-1 q_proj adapter for a hidden-64 model (the tensors)
    save_file({f"base_model.model.{Q[:-7]}.lora_A.weight": torch.randn(1, 64, generator=g),
               f"base_model.model.{Q[:-7]}.lora_B.weight": torch.randn(64, 1, generator=g)},
              str(HERE / "adapter_model.safetensors"))
    for name, (edit, needle) in ADAPTER_CONFIGS.items():
        _write(HERE / "adapter_config" / f"{name}.json", json.dumps({**ADAPTER_CONFIG, **edit}, indent=1))
        expected[f"adapter_config/{name}.json"] = needle
    for name, (raw, needle) in RAW_ADAPTER_CONFIGS.items():
        _write(HERE / "adapter_config" / f"{name}.json", raw)
        expected[f"adapter_config/{name}.json"] = needle
    for name, (obj, needle) in KEY_FILES.items():
        _write(HERE / "keys" / f"{name}.json", json.dumps(obj, indent=1))
        expected[f"keys/{name}.json"] = needle
    for name, (raw, needle) in RAW_KEY_FILES.items():
        _write(HERE / "keys" / f"{name}.json", raw)
        expected[f"keys/{name}.json"] = needle
    for name, (raw, needle) in JSONL.items():
        _write(HERE / "jsonl" / f"{name}.jsonl", raw)
        expected[f"jsonl/{name}.jsonl"] = needle
    for name, (text, needle) in TRAIN_CONFIGS.items():
        _write(HERE / "train_config" / f"{name}.toml", text)
        expected[f"train_config/{name}.toml"] = needle
    (HERE / "expected.json").write_text(json.dumps(dict(sorted(expected.items())), indent=1) + "\n")


if __name__ == "__main__":
    main()
