import json

import pytest
import torch

from qlora_kit.formats import FormatError
from qlora_kit.qconvert.errors import SourceNotFound, UnsupportedArchitecture, UnsupportedSourceDtype
from qlora_kit.qconvert.source import SourceWeights, read_config, resolve
from tests.hf_cache import offline_hub_cache

from .tiny import CONFIG, tiny_state, write_tiny

pytestmark = pytest.mark.unit


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(SourceNotFound, match=f"{tmp_path / 'nope'}: no such folder"):
        resolve(str(tmp_path / "nope"))


def test_hub_id_offline_uses_the_cache_and_honours_revision(tmp_path, monkeypatch):
    snapshot = offline_hub_cache(monkeypatch, tmp_path, "org/tiny", write_tiny(tmp_path / "src"), sha="a" * 40)
    folder = resolve("org/tiny")
    assert folder == snapshot and (folder / "model.safetensors").exists()
    with pytest.raises(SourceNotFound, match="org/tiny: not a local folder, and HF_HUB_OFFLINE=1 but it is not in the "
                                             r"Hugging Face cache .*, revision v2\); fetch it once online"):
        resolve("org/tiny", revision="v2")
    with pytest.raises(SourceNotFound, match="org/other"):
        resolve("org/other")


@pytest.mark.parametrize("model_type,arch", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForSequenceClassification")])
def test_unknown_architecture(tmp_path, model_type, arch):
    folder = write_tiny(tmp_path / "s", config=CONFIG | {"model_type": model_type, "architectures": [arch]})
    with pytest.raises(UnsupportedArchitecture, match=f"config.json: model_type='{model_type}'"):
        read_config(folder)


def test_already_quantized_source(tmp_path):
    folder = write_tiny(tmp_path / "s", config=CONFIG | {"quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(UnsupportedSourceDtype, match="already quantized"):
        read_config(folder)


@pytest.mark.parametrize("dtype,name", [(torch.int8, "I8"), (torch.float64, "F64")])
def test_unsupported_tensor_dtype_names_tensor_and_file(tmp_path, dtype, name):
    state = tiny_state()
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(dtype)
    folder = write_tiny(tmp_path / "s", state)
    with pytest.raises(UnsupportedSourceDtype, match=f"model.safetensors: tensor model.layers.0.mlp.up_proj.weight "
                                                     f"has dtype {name}"):
        SourceWeights(folder)


def test_truncated_safetensors_names_file(tmp_path):
    folder = write_tiny(tmp_path / "s")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FormatError, match="model.safetensors: .*truncated"):
        SourceWeights(folder)


def test_bin_and_sharded_index_sources(tmp_path):
    state = tiny_state()
    bin_folder = write_tiny(tmp_path / "b", state, bin_format=True)
    got = {i.name: t for i, t in SourceWeights(bin_folder)}
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    sharded = write_tiny(tmp_path / "sh", state)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(state, "x.safetensors")}))
    with pytest.raises(FormatError, match="names shard x.safetensors, which is missing"):
        SourceWeights(sharded)


def test_corrupt_bin_names_file(tmp_path):
    folder = write_tiny(tmp_path / "b", bin_format=True)
    (folder / "pytorch_model.bin").write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="pytorch_model.bin: cannot be read"):
        SourceWeights(folder)
