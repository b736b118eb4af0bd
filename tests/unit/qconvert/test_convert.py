import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.formats import dequantize_4bit, from_entries, quantization_config, quantize_4bit, spec
from qlora_kit.qconvert.convert import convert
from qlora_kit.qconvert.errors import InvalidOption
from qlora_kit.qconvert.options import ConvertConfig

from .tiny import CONFIG, tiny_state, write_tiny

pytestmark = pytest.mark.unit


def test_tiny_convert_layout_config_and_copied_files(tiny_src, tiny_out):
    assert sorted(p.name for p in tiny_out.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]
    config = json.loads((tiny_out / "config.json").read_text())
    assert config["quantization_config"] == quantization_config("nf4", True, torch.bfloat16, None)
    assert {k: v for k, v in config.items() if k != "quantization_config"} == dict(sorted(CONFIG.items()))
    out = load_file(str(tiny_out / "model.safetensors"))
    state = tiny_state()
    for name, w in state.items():
        if name.endswith("proj.weight"):
            ours = from_entries(name, out)
            ref = quantize_4bit(w, "nf4", 64, True, name)
            assert torch.equal(ours.data, ref.data) and torch.equal(ours.state.absmax, ref.state.absmax), name
        else:
            assert torch.equal(out[name], w), name  # embeddings, lm_head and norms kept as is


def test_options_reach_the_tensors(tiny_src, tmp_path):
    cfg = ConvertConfig(quant_type="fp4", blocksize=128, double_quant=False, compute_dtype="float16",
                        skip_modules=("mlp.down_proj",), max_shard_size=20_000)
    convert(str(tiny_src), tmp_path / "o", cfg, progress=False)
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    out = {}
    for f in files:
        out |= load_file(str(tmp_path / "o" / f))
    assert out["model.layers.0.mlp.down_proj.weight"].dtype == torch.float16  # skipped, cast to compute dtype
    assert out["model.norm.weight"].dtype == torch.float16
    packed = from_entries("model.layers.1.mlp.up_proj.weight", out)
    assert (packed.state.quant_type, packed.state.blocksize, packed.state.nested) == ("fp4", 128, None)
    assert packed.state.dtype == torch.float16
    w = tiny_state()["model.layers.1.mlp.up_proj.weight"].half()
    assert torch.equal(dequantize_4bit(packed), dequantize_4bit(quantize_4bit(w, "fp4", 128, False)))
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["mlp.down_proj"] and qc["bnb_4bit_compute_dtype"] == "float16"


def test_float32_bin_source_equals_bf16_safetensors_source(tmp_path):
    state = tiny_state(torch.float32)
    a = write_tiny(tmp_path / "a", state, bin_format=True)
    b = write_tiny(tmp_path / "b", {k: v.bfloat16() for k, v in state.items()})
    convert(str(a), tmp_path / "oa", progress=False)
    convert(str(b), tmp_path / "ob", progress=False)
    assert (tmp_path / "oa" / "model.safetensors").read_bytes() != b""
    ta, tb = load_file(str(tmp_path / "oa" / "model.safetensors")), load_file(str(tmp_path / "ob" / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_overwrite_replaces_existing_output(tiny_src, tiny_out):
    (tiny_out / "stale.txt").write_text("old")
    convert(str(tiny_src), tiny_out, ConvertConfig(overwrite=True), progress=False)
    assert not (tiny_out / "stale.txt").exists() and (tiny_out / "model.safetensors").exists()
    assert [p.name for p in tiny_out.parent.iterdir() if p.name.startswith(".")] == []


def test_out_may_not_be_src(tiny_src):
    with pytest.raises(InvalidOption, match="OUT must not be SRC"):
        convert(str(tiny_src), tiny_src, ConvertConfig(overwrite=True), progress=False)
    with pytest.raises(InvalidOption, match="OUT must not be SRC"):
        convert(str(tiny_src), tiny_src / "q", progress=False)
    assert (tiny_src / "model.safetensors").exists() and not (tiny_src / "q").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_device_without_cuda_is_an_error():
    with pytest.raises(InvalidOption, match="--device cuda: no CUDA device is visible"):
        ConvertConfig(device="cuda")


def test_threads_setting_is_restored(tiny_src, tmp_path):
    before = torch.get_num_threads()
    result = convert(str(tiny_src), tmp_path / "o", ConvertConfig(threads=1), progress=False)
    assert torch.get_num_threads() == before
    assert (result.quantized, result.kept) == (14, 7)
    with pytest.raises(InvalidOption, match="--threads 0"):
        ConvertConfig(threads=0)
