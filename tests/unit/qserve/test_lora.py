"""Adapter validation against the served base: each refusal names what is wrong; ranks are kept unpadded."""
import json

import pytest
import torch

from qlora_kit.formats import LoraConfig, save_adapter
from qlora_kit.formats.peft import KEY_PREFIX, LORA_A, LORA_B
from qlora_kit.models import MAX_RANK
from qlora_kit.qserve.engine.lora import evict, install, read_adapter
from qlora_kit.qserve.errors import AdapterRefused

from ._tiny_serve import make_adapter, tiny_model

pytestmark = pytest.mark.unit
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("lora"))[1]


def _save(tmp_path, module, a, b, targets=("q_proj",), base="llama"):
    cfg = LoraConfig(r=a.shape[0], lora_alpha=8, target_modules=targets, base_model_name_or_path=base)
    save_adapter(tmp_path / "ad", cfg, {f"{KEY_PREFIX}{module}.{LORA_A}": a, f"{KEY_PREFIX}{module}.{LORA_B}": b})
    return str(tmp_path / "ad")


@pytest.mark.parametrize("module,a_shape,b_shape,targets,base,msg", [
    (Q, (4, 32), (64, 4), ("q_proj",), "llama", "do not fit"),
    ("model.layers.9.self_attn.q_proj", (4, 64), (64, 4), ("q_proj",), "llama", "not a projection of the base"),
    (Q, (4, 64), (64, 4), ("qkv_proj",), "llama", r"target_modules \['qkv_proj'\] are not projections"),
    (Q, (4, 64), (64, 4), ("v_proj",), "llama", "not in target_modules"),
    (Q, (4, 64), (64, 4), ("q_proj",), "meta-llama/Llama-3-8B", "trained for base model"),
    (Q, (MAX_RANK + 1, 64), (64, MAX_RANK + 1), ("q_proj",), "llama", "rank 257 outside"),
])
def test_refusals(model, tmp_path, module, a_shape, b_shape, targets, base, msg):
    path = _save(tmp_path, module, torch.randn(a_shape), torch.randn(b_shape), targets, base)
    with pytest.raises(AdapterRefused, match=msg):
        read_adapter(model, "x", path, base_names=("llama",))


def test_non_finite_and_not_safetensors(model, tmp_path):
    path = _save(tmp_path, Q, torch.full((4, 64), float("nan")), torch.randn(64, 4))
    with pytest.raises(AdapterRefused, match="NaN"):
        read_adapter(model, "x", path)
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(AdapterRefused, match="adapter 'x'"):
        read_adapter(model, "x", path)


def test_ranks_unpadded_and_install_evict(model, tmp_path):
    small, _ = read_adapter(model, "s", str(make_adapter(model, tmp_path / "s", 2, 1)))
    big, nbytes = read_adapter(model, "b", str(make_adapter(model, tmp_path / "b", 64, 2)))
    install(model, small, 0)
    install(model, big, 1)
    q = model.lora_layers()[Q]
    assert q.lora_a["0"].shape[0] == 2 and q.lora_a["1"].shape[0] == 64
    assert nbytes == sum(a.nbytes + b.nbytes for a, b, _ in big.layers.values())
    evict(model, 0)
    evict(model, 1)
    assert q.adapter_ids == []


def test_install_rewrites_a_slot_of_the_same_shape_in_place(model, tmp_path):
    one, _ = read_adapter(model, "one", str(make_adapter(model, tmp_path / "one", 4, 3)))
    two, _ = read_adapter(model, "two", str(make_adapter(model, tmp_path / "two", 4, 4)))
    big, _ = read_adapter(model, "big", str(make_adapter(model, tmp_path / "big", 8, 5)))
    q = model.lora_layers()[Q]
    assert install(model, one, 0) is False  # an empty slot: created
    pa = q.lora_a["0"]
    assert install(model, two, 0) is True and q.lora_a["0"] is pa  # same modules and ranks: written in place
    assert all(torch.equal(model.lora_layers()[m].lora_a["0"], a) and torch.equal(model.lora_layers()[m].lora_b["0"], b)
               for m, (a, b, _) in two.layers.items())
    assert install(model, big, 0) is False and q.lora_a["0"].shape[0] == 8  # another rank: created afresh
    evict(model, 0)
    assert q.adapter_ids == []
