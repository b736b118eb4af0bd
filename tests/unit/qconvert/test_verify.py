import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_kit.qconvert.verify import check_integrity, compare

pytestmark = pytest.mark.unit
Q = "model.layers.0.self_attn.q_proj.weight"


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _state_blob(tensors, **changes):
    """The quant_state JSON blob of Q with some fields replaced."""
    key = f"{Q}.quant_state.bitsandbytes__nf4"
    fields = {**json.loads(bytes(tensors[key].tolist())), **changes}
    return torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)


def test_clean_checkpoint_passes_and_measures_error(tiny_src, tiny_out):
    result = check_integrity(tiny_out)
    assert result.ok, result.problems
    assert result.checked == 14 + 7
    compare(tiny_out, str(tiny_src), result=result)
    assert result.ok
    quant = [e for e in result.errors if e.quantized]
    assert len(quant) == 14 and all(18 < e.sqnr_db < 23 for e in quant)  # NF4 on Gaussian weights: ~20 dB
    assert all(e.sqnr_db == float("inf") for e in result.errors if not e.quantized)


def test_threshold_and_missing_tensors_are_problems(tiny_src, tiny_out):
    result = compare(tiny_out, str(tiny_src), min_sqnr=30.0)
    assert len(result.problems) == 14 and f"{Q}: SQNR" in "".join(result.problems)
    _rewrite(tiny_out, lambda t: t.pop("model.norm.weight"))
    result = compare(tiny_out, str(tiny_src))
    assert result.problems == [f"model.norm.weight: in {tiny_src} but not in {tiny_out}"]


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(f"{Q}.nested_absmax"), f"{Q}.nested_absmax: required"),
    (lambda t: t.__setitem__(f"{Q}.quant_map", torch.linspace(-1, 1, 16)), f"{Q}.quant_map: is not the nf4 codebook"),
    (lambda t: t.__setitem__(f"{Q}.quant_state.bitsandbytes__nf4", torch.tensor(list(b'{"quant'), dtype=torch.uint8)),
     f"{Q}.quant_state.bitsandbytes__nf4: not valid UTF-8 JSON"),
    (lambda t: t.__setitem__(f"{Q}.nested_absmax", t[f"{Q}.nested_absmax"] * float("nan")),
     f"{Q}.nested_absmax: holds NaN/Inf (corrupt)"),
    (lambda t: t.__setitem__(f"{Q}.quant_map", torch.zeros(16)), f"{Q}.quant_map: is not the nf4 codebook"),
    (lambda t: t.__setitem__(f"{Q}.quant_state.bitsandbytes__nf4", _state_blob(t, shape=[True, 64])),  # issue 13 #11
     f"{Q}.quant_state.bitsandbytes__nf4: shape [True, 64] must be a non-empty list of positive integers"),
    (lambda t: t.__setitem__(f"{Q}.quant_state.bitsandbytes__nf4", _state_blob(t, dtype=["bfloat16"])),
     f"{Q}.quant_state.bitsandbytes__nf4: dtype ['bfloat16'] is not one of"),
    (lambda t: t.__setitem__(f"{Q}.quant_state.bitsandbytes__nf4", _state_blob(t, nested_blocksize=2**70)),
     f"{Q}.quant_state.bitsandbytes__nf4: nested_blocksize 1180591620717411303424 is invalid"),
    (lambda t: t["model.norm.weight"].__setitem__(3, float("inf")), "model.norm.weight: 1 NaN/Inf"),
    (lambda t: t.pop(f"{Q}.quant_state.bitsandbytes__nf4"), f"{Q}.absmax: state entry without a quant_state"),
])
def test_each_integrity_problem_is_named(tiny_out, edit, message):
    _rewrite(tiny_out, edit)
    problems = check_integrity(tiny_out).problems
    assert any(message in p for p in problems), problems


def test_config_and_index_consistency(tiny_out):
    config = json.loads((tiny_out / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (tiny_out / "config.json").write_text(json.dumps(config))
    (tiny_out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model.safetensors", "ghost.weight": "model.safetensors"}}))
    problems = check_integrity(tiny_out).problems
    assert any("quantization_config says fp4/True (quant type/double quant) but tensors are nf4/True" in p
               for p in problems)
    assert "ghost.weight: the index maps it to model.safetensors, which does not hold it" in problems
    assert f"model.safetensors: tensor {Q} is missing from the shard index" in problems
