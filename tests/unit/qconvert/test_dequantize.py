import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.formats import dequantize_4bit, quantize_4bit
from qlora_kit.qconvert.dequantize import dequantize

from .tiny import CONFIG, tiny_state

pytestmark = pytest.mark.unit


def test_dequantize_decodes_every_weight(tiny_out, tmp_path):
    dequantize(tiny_out, tmp_path / "bf16", progress=False)
    out = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    state = tiny_state()
    assert out.keys() == state.keys()
    for name, w in state.items():
        expect = dequantize_4bit(quantize_4bit(w, "nf4", 64, True)) if name.endswith("proj.weight") else w
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], expect), name
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config == dict(sorted(CONFIG.items()))


def test_dequantize_to_float32(tiny_out, tmp_path):
    dequantize(tiny_out, tmp_path / "f32", dtype="float32", progress=False)
    out = load_file(str(tmp_path / "f32" / "model.safetensors"))
    assert {t.dtype for t in out.values()} == {torch.float32}
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
