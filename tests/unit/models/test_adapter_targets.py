"""PEFT's target semantics on load (models/adapters.py read_peft_adapter, formats/_targets.py), PEFT as the oracle:
an adapter PEFT builds on a transformers Llama with a regex target_modules, exclude_modules, layers_to_transform /
layers_pattern must load onto exactly the modules PEFT put LoRA on, and a use_rslora adapter must give PEFT's logits.
"""
import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_kit.formats.peft import LoraConfig
from qlora_kit.models import AdapterError, Batch, load_model
from qlora_kit.models.adapters import load_peft_adapter, projection_shapes, read_peft_adapter, select_modules
from tests.tolerances import tol

pytestmark = pytest.mark.unit

CASES = {
    "regex_and_regex_exclude": dict(target_modules=r".*\.(q|v|down)_proj", exclude_modules=r"model\.layers\.1\..*"),
    "regex_and_list_exclude": dict(target_modules=r"model\.layers\.[0-2]\.(self_attn\.(k|o)_proj|mlp\.\w+_proj)",
                                   exclude_modules=["down_proj", "model.layers.0.mlp.up_proj"]),
    "layers_to_transform": dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1, 3]),
    "layers_pattern": dict(target_modules=["self_attn.v_proj", "gate_proj"], layers_to_transform=2,
                           layers_pattern="layers", exclude_modules=["model.layers.2.mlp.gate_proj"]),
    "all_linear_exclude": dict(target_modules="all-linear", exclude_modules=["o_proj", "k_proj"]),
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 4-layer random transformers Llama in fp32 (the base both sides load)."""
    folder = tmp_path_factory.mktemp("targets") / "llama"
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _peft(base, tmp_path, **cfg):
    """PEFT on transformers: the adapter (random B, so it changes the output), saved; and PEFT's LoRA module set."""
    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base).eval(),
                           PeftLoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM", **cfg))
    chosen = {name for name, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter", chosen


@pytest.mark.parametrize("case", list(CASES))
def test_loads_onto_the_modules_peft_selects(tiny_llama, tmp_path, case):
    _, folder, theirs = _peft(tiny_llama, tmp_path, **CASES[case])
    ours = load_model(tiny_llama, quantize=False, compute_dtype=torch.float32)
    payload = read_peft_adapter(folder, projection_shapes(ours))
    assert set(payload.layers) == theirs and 0 < len(theirs) < len(ours.lora_layers())
    assert set(select_modules(ours.lora_layers(), payload.config)) == theirs  # the rule the trainer uses too


@torch.no_grad()
def test_rslora_regex_adapter_gives_peft_logits(tiny_llama, tmp_path):
    peft_model, folder, _ = _peft(tiny_llama, tmp_path, target_modules=r".*\.(q|o|gate)_proj",
                                  exclude_modules=["model.layers.3.self_attn.o_proj"], use_rslora=True)
    assert json.loads((folder / "adapter_config.json").read_text())["use_rslora"] is True
    ours = load_model(tiny_llama, quantize=False, compute_dtype=torch.float32)
    config = load_peft_adapter(ours, folder, 0)
    assert config.use_rslora and config.scale() == 8 / 4 ** 0.5
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = peft_model(ids).logits
    with peft_model.disable_adapter():
        base = peft_model(ids).logits
    got = ours(Batch(ids, adapter_ids=torch.tensor([0, 0])))
    print(f"rsLoRA adapter, ours vs PEFT: max |logit diff| {(got - expected).abs().max().item():.2e}")
    torch.testing.assert_close(got, expected, **tol("dense_lora_vs_peft_logits"))
    assert (got - base).abs().max() > 100 * tol("dense_lora_vs_peft_logits")["atol"]  # the adapter matters


@pytest.mark.parametrize("key, value, message", [
    ("target_parameters", ["mlp.down_proj.weight"], "target_parameters=['mlp.down_proj.weight'] is not supported"),
    ("modules_to_save", ["lm_head"], "modules_to_save=['lm_head'] is not supported"),
    ("init_lora_weights", "pissa", "init_lora_weights='pissa' is not supported"),
    ("layer_replication", [[0, 2]], "layer_replication=[[0, 2]] is not supported"),
    ("lora_bias", True, "lora_bias=True is not supported"),
    ("target_modules", r".*_proj|lm_head", "selects lm_head, which qlora-kit cannot adapt"),
    # PEFT itself refuses this one ("Target module SiLUActivation() is not supported")
    ("target_modules", r"model\.layers\.0\.mlp\..*", "selects model.layers.0.mlp.act_fn, which qlora-kit cannot"),
    ("exclude_modules", "(a", "exclude_modules '(a': an unclosed '('"),
])
def test_what_peft_would_do_differently_is_refused_by_name(tiny_llama, tmp_path, key, value, message):
    _, folder, _ = _peft(tiny_llama, tmp_path, target_modules=["q_proj"])
    raw = json.loads((folder / "adapter_config.json").read_text())
    raw[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    ours = load_model(tiny_llama, quantize=False, compute_dtype=torch.float32)
    with pytest.raises(AdapterError) as e:
        read_peft_adapter(folder, projection_shapes(ours))
    assert message in str(e.value) and str(folder) in str(e.value)


def test_peft_defaults_and_loadable_inits_are_accepted():
    base = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "modules_to_save": None, "use_dora": False,
            "target_parameters": [], "loftq_config": {}, "layer_replication": None, "runtime_config": {}}
    for init in (True, False, "gaussian"):
        assert LoraConfig.from_json({**base, "init_lora_weights": init}).target_modules == ("q_proj",)
