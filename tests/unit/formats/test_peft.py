import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_kit.formats import AdapterFormatError, FormatError, LoraConfig, load_adapter, lora_pairs, save_adapter

pytestmark = pytest.mark.unit


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg).eval()


def _our_adapter(model, r=4, targets=("q_proj", "v_proj", "down_proj")):
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, module.in_features) * 0.1
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, r) * 0.1
    return LoraConfig(r=r, lora_alpha=8, target_modules=targets, base_model_name_or_path="tiny"), tensors


def test_peft_written_adapter_reads_with_our_code(tmp_path):
    peft_model = get_peft_model(_tiny_llama(), PeftLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"],
                                                               init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "a")
    config, tensors = load_adapter(tmp_path / "a")
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (8, 16, {"q_proj", "o_proj"})
    pairs = lora_pairs(tensors)
    assert sorted(pairs) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj"))
    a, b = pairs["model.layers.1.self_attn.o_proj"]
    assert a.shape == (8, 64) and b.shape == (64, 8)
    assert torch.equal(b, peft_model.base_model.model.model.layers[1].self_attn.o_proj.lora_B["default"].weight)


def test_our_adapter_loads_in_peft_with_the_same_update(tmp_path):
    model = _tiny_llama()
    config, tensors = _our_adapter(model)
    save_adapter(tmp_path / "ours", config, tensors)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        base = model(x).logits
        peft_logits = PeftModel.from_pretrained(model, tmp_path / "ours").eval()(x).logits
    # the update the adapter defines, applied by hand to one layer, must be what PEFT applied
    assert not torch.allclose(base, peft_logits)
    layer = model.model.layers[0].self_attn.q_proj
    h = torch.randn(3, 64)
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    with torch.no_grad():
        expected = layer.base_layer(h) + config.scale() * h @ a.T @ b.T
        assert torch.allclose(layer(h), expected, atol=1e-5)


def test_round_trip_keeps_unknown_keys(tmp_path):
    config, tensors = _our_adapter(_tiny_llama())
    save_adapter(tmp_path / "a", config, tensors)
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    raw["some_future_key"] = {"x": 1}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
    again, again_tensors = load_adapter(tmp_path / "a")
    assert again.extra["some_future_key"] == {"x": 1} and again.r == 4
    assert all(torch.equal(again_tensors[k], tensors[k]) for k in tensors)
    assert LoraConfig(r=16, lora_alpha=32, target_modules=("q_proj",), use_rslora=True).scale() == 8.0
    assert LoraConfig(r=4, lora_alpha=8, target_modules=("all-linear",)).to_json()["target_modules"] == "all-linear"
    assert PeftLoraConfig(target_modules=LoraConfig(r=4, lora_alpha=8, target_modules=("all-linear",))
                          .to_json()["target_modules"]).target_modules == "all-linear"


def test_bad_adapters_are_refused_with_the_file_named(tmp_path):
    config, tensors = _our_adapter(_tiny_llama())
    save_adapter(tmp_path / "a", config, tensors)
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="adapter_model.bin is pickle and is refused"):
        load_adapter(tmp_path / "a")
    with pytest.raises(AdapterFormatError, match="adapter_config.json: missing"):
        load_adapter(tmp_path / "nowhere")
    with pytest.raises(AdapterFormatError, match=r"r=0: must be an integer >= 1"):
        LoraConfig(r=0, lora_alpha=1, target_modules=("q_proj",))
    with pytest.raises(AdapterFormatError, match="use_dora=True is not supported"):
        LoraConfig.from_json({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True})
    unpaired = {k: v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_B" not in k}
    with pytest.raises(AdapterFormatError, match="model.layers.0.self_attn.q_proj has \\['lora_A'\\] but needs both"):
        lora_pairs(unpaired)
    save_adapter(tmp_path / "b", config, tensors)
    weights = tmp_path / "b" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(FormatError, match="adapter_model.safetensors: tensor .* do not fit"):
        load_adapter(tmp_path / "b")
    for bad in (b'\xff\xfe{"r": 4}', b"[" * 100_000 + b"]" * 100_000, b'{"r": '):  # not UTF-8, too deep, cut
        (tmp_path / "b" / "adapter_config.json").write_bytes(bad)
        with pytest.raises(AdapterFormatError, match="adapter_config.json: not valid JSON"):
            load_adapter(tmp_path / "b")


def test_rank_and_alpha_patterns_follow_peft():
    config = LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"),
                        rank_pattern={"v_proj": 4, r"layers\.1\.self_attn\.q_proj": 2}, alpha_pattern={"q_proj": 4})
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert config.alpha_for("model.layers.0.self_attn.q_proj") == 4.0
    assert config.scale_for("model.layers.0.self_attn.v_proj") == 16 / 4
    peft = PeftLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern=config.rank_pattern,
                          alpha_pattern=config.alpha_pattern)
    from peft.utils.other import get_pattern_key

    for path in ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.q_proj"):
        key = get_pattern_key(peft.rank_pattern.keys(), path)
        assert peft.rank_pattern.get(key, peft.r) == config.rank_for(path), path
