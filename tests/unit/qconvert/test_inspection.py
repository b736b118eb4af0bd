import json

import pytest

from qlora_kit.qconvert.inspection import as_json, inspect_checkpoint

pytestmark = pytest.mark.unit


def test_rows_totals_and_bits(tiny_out):
    ins = inspect_checkpoint(tiny_out)
    rows = {r.name: r for r in ins.rows}
    assert len(rows) == 21
    up = rows["model.layers.0.mlp.up_proj.weight"]
    assert (up.shape, up.stored, up.params, up.blocksize, up.double_quant, up.dtype) == (
        (160, 64), "nf4", 10240, 64, True, "bfloat16")
    # codes 5120 B + absmax 160 B (U8) + quant_map 64 B + nested_absmax 4 B + nested_quant_map 1024 B + JSON
    state_json = len(b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [160, 64], '
                     b'"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": ')
    assert 5120 + 160 + 64 + 4 + 1024 + state_json < up.nbytes < 5120 + 160 + 64 + 4 + 1024 + state_json + 30
    norm = rows["model.norm.weight"]
    assert (norm.stored, norm.nbytes, norm.bits_per_param) == ("BF16", 128, 16.0)
    assert ins.params == 2 * 96 * 64 + 64 + 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 160 * 64 + 2 * 64)
    assert ins.bf16_bytes == 2 * ins.params
    data = json.loads(as_json(ins))
    assert data["quantization_config"]["bnb_4bit_quant_type"] == "nf4" and len(data["tensors"]) == 21
