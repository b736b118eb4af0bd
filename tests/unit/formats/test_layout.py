import json

import bitsandbytes.functional as bnbf
import pytest
import torch

from qlora_kit.formats import (
    CorruptQuantState,
    MissingTensor,
    ShapeMismatch,
    UnsupportedBlocksize,
    UnsupportedDtype,
    dequantize_4bit,
    from_entries,
    quantize_4bit,
    quantized_weight_names,
    should_quantize,
    to_entries,
)
from qlora_kit.formats.layout import encode_state_json

pytestmark = pytest.mark.unit
NAME = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def entries():
    return to_entries(NAME, quantize_4bit(torch.randn(96, 320).to(torch.bfloat16), "nf4", 64, True))


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("double_quant", (True, False))
def test_entries_are_what_bitsandbytes_serializes(quant_type, double_quant):
    w = torch.randn(96, 320).to(torch.bfloat16)
    ours = to_entries(NAME, quantize_4bit(w, quant_type, 64, double_quant))
    q, st = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    theirs = {f"{NAME}.{k}": v for k, v in st.as_dict(packed=True).items()}
    theirs[NAME] = q
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        if not key.endswith(".absmax") or not double_quant:
            assert torch.equal(ours[key], value), key
    blob = bytes(ours[f"{NAME}.quant_state.bitsandbytes__{quant_type}"].tolist())
    assert blob == bytes(theirs[f"{NAME}.quant_state.bitsandbytes__{quant_type}"].tolist())


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_our_entries_dequantize_in_bitsandbytes_to_our_values(quant_type):
    w = torch.randn(64, 256).to(torch.bfloat16)
    ours = to_entries(NAME, quantize_4bit(w, quant_type, 64, True))
    state = bnbf.QuantState.from_dict({k[len(NAME) + 1:]: v for k, v in ours.items() if k != NAME}, torch.device("cpu"))
    assert torch.equal(bnbf.dequantize_4bit(ours[NAME], state), dequantize_4bit(from_entries(NAME, ours)))


def test_round_trip_through_entries(entries):
    packed = from_entries(NAME, entries)
    assert packed.state.shape == (96, 320) and packed.state.dtype == torch.bfloat16
    assert torch.equal(to_entries(NAME, packed)[NAME], entries[NAME])
    assert quantized_weight_names(entries) == [NAME]


def _with_json(entries, text):
    out = dict(entries)
    out[f"{NAME}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(text.encode()), dtype=torch.uint8)
    return out


def _fields(entries):
    return json.loads(bytes(entries[f"{NAME}.quant_state.bitsandbytes__nf4"].tolist()))


def test_truncated_quant_state_names_the_tensor(entries):
    blob = entries[f"{NAME}.quant_state.bitsandbytes__nf4"]
    broken = dict(entries)
    broken[f"{NAME}.quant_state.bitsandbytes__nf4"] = blob[: len(blob) // 2]
    with pytest.raises(CorruptQuantState, match=rf"{NAME}\.quant_state\.bitsandbytes__nf4: not valid UTF-8 JSON"):
        from_entries(NAME, broken)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda f: f.pop("shape"), CorruptQuantState, r"missing key\(s\) \['shape'\]"),
        (lambda f: f.update(quant_type="fp4"), CorruptQuantState, "quant_type 'fp4' disagrees"),
        (lambda f: f.update(shape=[96, -320]), CorruptQuantState, "must be a non-empty list of positive integers"),
        (lambda f: f.update(blocksize=100), UnsupportedBlocksize, "blocksize=100 is not supported"),
        (lambda f: f.update(dtype="int8"), UnsupportedDtype, "dtype 'int8' is not one of"),
        (lambda f: f.pop("nested_offset"), CorruptQuantState, "incomplete double-quant fields"),
        (lambda f: f.update(nested_offset="x"), CorruptQuantState, "nested_offset 'x' is not a finite number"),
        (lambda f: f.update(shape=[96, 321]), ShapeMismatch, rf"{NAME}: expected torch.uint8 \(15408, 1\)"),
    ],
)
def test_inconsistent_quant_state_is_refused(entries, change, error, message):
    fields = _fields(entries)
    change(fields)
    with pytest.raises(error, match=message):
        from_entries(NAME, _with_json(entries, json.dumps(fields)))


def test_json_that_is_not_an_object(entries):
    with pytest.raises(CorruptQuantState, match="JSON is a list"):
        from_entries(NAME, _with_json(entries, "[1, 2]"))


def test_missing_companion_tensor_and_wrong_shapes(entries):
    broken = {k: v for k, v in entries.items() if not k.endswith("nested_absmax")}
    with pytest.raises(MissingTensor, match=rf"{NAME}\.nested_absmax: required"):
        from_entries(NAME, broken)
    broken = dict(entries)
    broken[f"{NAME}.absmax"] = entries[f"{NAME}.absmax"][:-1]
    with pytest.raises(ShapeMismatch, match=rf"{NAME}\.absmax: expected torch.uint8 \(480,\)"):
        from_entries(NAME, broken)
    broken = dict(entries)
    broken[NAME] = entries[NAME][:-10]
    with pytest.raises(ShapeMismatch, match=rf"{NAME}: expected torch.uint8 \(15360, 1\), found torch.uint8 \(15350, 1\)"):
        from_entries(NAME, broken)
    with pytest.raises(MissingTensor, match="expected exactly one quant_state"):
        from_entries(NAME, {NAME: entries[NAME]})


def test_state_json_matches_bitsandbytes_key_order():
    p = quantize_4bit(torch.randn(8, 64), "nf4", 64, True)
    assert list(json.loads(encode_state_json(p.state))) == [
        "quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"]


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("model.layers.0.mlp.down_proj.weight", (8, 4), True),
        ("model.embed_tokens.weight", (8, 4), False),
        ("lm_head.weight", (8, 4), False),
        ("model.layers.0.input_layernorm.weight", (4,), False),
        ("model.layers.0.self_attn.q_norm.weight", (4, 4), False),
        ("model.layers.0.self_attn.q_proj.bias", (4,), False),
    ],
)
def test_should_quantize(name, shape, expected):
    assert should_quantize(name, torch.zeros(shape)) is expected
