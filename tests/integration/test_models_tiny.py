"""Tiny random checkpoints written by transformers' classes: our decoder gives transformers' logits."""
import json

import pytest
import torch

from qlora_kit.formats import FormatError, LoraConfig, dequantize_4bit, quantize_4bit
from qlora_kit.models import (Batch, CheckpointError, SamplingParams, adapter_ids, adapter_state, add_adapter, generate,
                    load_model, load_peft_adapter, save_peft_adapter)
from tests.tolerances import tol
from tests.unit.models._tiny import VARIANTS, load_hf, write_tiny

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {v: write_tiny(v, root / v) for v in VARIANTS}


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_dense_logits_equal_transformers(tiny_dir, variant):
    hf = load_hf(tiny_dir[variant])
    ours = load_model(tiny_dir[variant], quantize=False, compute_dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 12))
    ref, got = hf(ids).logits, ours(Batch(ids))
    print(f"{variant}: max |ours - transformers| = {(ref - got).abs().max().item():.3g}")
    torch.testing.assert_close(got, ref, **tol("model_vs_hf_dense"))


@pytest.mark.parametrize("variant", ["qwen2", "qwen3"])
@torch.no_grad()
def test_quantized_while_loading_equals_transformers_on_nf4_weights(tiny_dir, variant):
    """bf16 -> NF4 at load; transformers given the same NF4-rounded weights (our codec = bitsandbytes bytes)."""
    hf = load_hf(tiny_dir[variant])
    ours = load_model(tiny_dir[variant], quantize=True, compute_dtype=torch.float32)
    for name, m in hf.named_modules():
        if name.endswith("_proj"):
            m.weight.copy_(dequantize_4bit(quantize_4bit(m.weight.data), torch.float32))
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(ours(Batch(ids)), hf(ids).logits, **tol("model_vs_hf_dense"))


@torch.no_grad()
def test_greedy_generate_with_cache_equals_transformers(tiny_dir):
    hf = load_hf(tiny_dir["qwen3"])
    ours = load_model(tiny_dir["qwen3"], quantize=False, compute_dtype=torch.float32)
    prompts = [[5, 9, 33, 2], [7, 1]]
    got = generate(ours, prompts, SamplingParams(max_tokens=10))
    for p, g in zip(prompts, got):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert g == ref[0, len(p):].tolist()


@torch.no_grad()
def test_mixed_batch_of_three_adapters_equals_each_row_alone(tiny_dir):
    model = load_model(tiny_dir["llama"], quantize=True, compute_dtype=torch.float32)
    specs = {1: (2, ("q_proj", "v_proj")), 2: (8, ("o_proj", "gate_proj", "down_proj")), 3: (4, ("q_proj", "k_proj",
                                                                                               "up_proj"))}
    for i, (r, targets) in specs.items():
        add_adapter(model, i, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
        for name, p in model.named_parameters():
            if name.endswith(f"lora_b.{i}"):
                p.normal_(0, 0.5)
    assert adapter_ids(model) == [1, 2, 3]
    ids = torch.randint(0, 128, (4, 9))
    rows = torch.tensor([1, -1, 3, 2])
    mixed = model(Batch(ids, adapter_ids=rows))
    for row, i in enumerate(rows.tolist()):
        alone = model(Batch(ids[row:row + 1], adapter_ids=torch.tensor([i])))
        torch.testing.assert_close(mixed[row:row + 1], alone, **tol("mixed_batch"))
    base = model(Batch(ids))
    assert torch.equal(mixed[1], base[1])
    assert all((mixed[r] - base[r]).abs().max() > 1e-3 for r in (0, 2, 3))
    # generate() takes per-row adapters too and equals per-row generation
    together = generate(model, [[3, 4, 5], [3, 4, 5]], SamplingParams(max_tokens=6), adapter_ids=[2, -1])
    assert together[0] == generate(model, [[3, 4, 5]], SamplingParams(max_tokens=6), adapter_ids=[2])[0]
    assert together[1] == generate(model, [[3, 4, 5]], SamplingParams(max_tokens=6))[0]


@torch.no_grad()
def test_peft_adapter_round_trip(tiny_dir, tmp_path):
    model = load_model(tiny_dir["llama"], quantize=True, compute_dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "down_proj"), use_rslora=True)
    add_adapter(model, 0, cfg)
    for name, p in model.named_parameters():
        if "lora_b" in name:
            p.normal_()
    save_peft_adapter(model, 0, tmp_path / "ad", cfg)
    keys = set(adapter_state(model, 0))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 8
    load_peft_adapter(model, tmp_path / "ad", 5)
    ids = torch.randint(0, 128, (1, 6))
    assert torch.equal(model(Batch(ids, adapter_ids=torch.tensor([0]))), model(Batch(ids, adapter_ids=torch.tensor([5]))))
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["use_rslora"] is True


def test_loading_errors(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_dir["llama"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks model\.layers\.1\.mlp\.up_proj"):
        load_model(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(FormatError, match="no model.safetensors"):
        load_model(bad)
