"""qtrain merge on the bundled SmolLM2 in NF4 (issue 15): the bf16 merge against base + adapter run by our runtime
and against PEFT's merge_and_unload on the dequantized base; the merged folder in transformers; the nf4 merge's
error table, qconvert verify, and loading by our runtime and by transformers + bitsandbytes.

The adapter has random nonzero B (as tests/integration/test_models_smollm2.py builds its PEFT adapter), per-module
alpha (alpha_pattern) and leaves down_proj out. Run with -s to see the measured differences.
"""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from qlora_kit.formats import LoraConfig
from qlora_kit.models import (Batch, Tokenizer, adapter_params, add_adapter, load_model, load_peft_adapter,
                              save_peft_adapter)
from qlora_kit.qconvert.cli import main as qconvert
from qlora_kit.trainer.cli import main as qtrain
from qlora_kit.trainer.merge import DEFAULT_PROMPTS
from tests.tolerances import tol

pytestmark = [pytest.mark.slow, pytest.mark.integration]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


def _cli(cli, *args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def nf4(smollm2_nf4):
    return smollm2_nf4


@pytest.fixture(scope="module")
def deq(nf4, tmp_path_factory):
    """The dequantized base as qconvert writes it: the weights the adapter was trained against, in bf16."""
    from qlora_kit.qconvert.dequantize import dequantize

    out = tmp_path_factory.mktemp("merge") / "smollm2-deq"
    dequantize(nf4, out, "bfloat16", progress=False)
    return out


@pytest.fixture(scope="module")
def adapter(nf4, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "adapter"
    torch.manual_seed(0)  # module fixtures are set up before the autouse per-test seed
    model = load_model(nf4)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, base_model_name_or_path=str(nf4),
                     alpha_pattern={"v_proj": 32})
    add_adapter(model, 0, cfg)
    with torch.no_grad():
        for name, p in adapter_params(model, 0).items():
            if ".lora_b." in name:
                p.normal_(0, 0.02)
    save_peft_adapter(model, 0, out, cfg)
    return out


@pytest.fixture(scope="module")
def merged(nf4, adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "merged-bf16"
    result = _cli(qtrain, "merge", "--base", nf4, "--adapter", adapter, "--out", out, "--json", "--quiet")
    return out, json.loads(result.stdout)


@pytest.fixture(scope="module")
def prompt_ids(nf4):
    tok = Tokenizer(nf4)
    return [torch.tensor([tok.encode_chat([{"role": "user", "content": p}])]) for p in DEFAULT_PROMPTS]


@torch.no_grad()
def _run(model, prompt_ids, adapter_id=None):
    ids = None if adapter_id is None else torch.tensor([adapter_id])
    return [model(Batch(x, adapter_ids=ids)).float()[0] for x in prompt_ids]


def test_bf16_merge_logits_equal_base_plus_adapter_within_bf16_rounding(nf4, deq, adapter, merged, prompt_ids):
    out, report = merged
    f32 = torch.float32
    ref_model = load_model(nf4, compute_dtype=f32)
    load_peft_adapter(ref_model, adapter, 0)
    ref, base = _run(ref_model, prompt_ids, 0), _run(ref_model, prompt_ids)
    del ref_model
    floor = _run(load_model(deq, quantize=False, compute_dtype=f32), prompt_ids)
    got = _run(load_model(out, quantize=False, compute_dtype=f32), prompt_ids)
    d_merge = torch.cat([(g - r).abs().flatten() for g, r in zip(got, ref)])
    d_floor = torch.cat([(f - b).abs().flatten() for f, b in zip(floor, base)])
    effect = max(float((r - b).abs().max()) for r, b in zip(ref, base))
    agree = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, ref)) / sum(r.shape[0] for r in ref)
    print(f"\nbf16 merge vs base + adapter (fp32 compute, 5 prompts): max {d_merge.max():.4f} mean {d_merge.mean():.5f}; "
          f"one bf16 rounding of the base alone: max {d_floor.max():.4f} mean {d_floor.mean():.5f}; "
          f"adapter effect {effect:.2f}; top-1 agreement {agree:.3f}")
    ratio = tol("merge_vs_adapter_over_bf16_floor")["atol"]
    assert d_merge.max() <= ratio * d_floor.max() and d_merge.mean() <= ratio * d_floor.mean()
    assert effect > 5 * d_merge.max()  # the adapter is in the merged weights: without it the gap would be `effect`
    assert agree >= 0.99
    assert report["logits"]["max_abs_diff"] == pytest.approx(float(d_merge.max()), abs=1e-4)  # the report is this
    assert report["logits"]["top1_agreement"] == pytest.approx(agree)


@torch.no_grad()
def test_bf16_merge_equals_peft_merge_and_unload_and_loads_in_transformers(deq, adapter, merged, prompt_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = merged
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(deq, dtype=torch.bfloat16), adapter)
    peft = peft.merge_and_unload().eval()
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()  # the merged folder in transformers
    theirs_sd, ours_sd = peft.state_dict(), ours.state_dict()
    assert theirs_sd.keys() == ours_sd.keys()
    differing = [k for k in ours_sd if not torch.equal(ours_sd[k], theirs_sd[k])]
    # Both compute bf16(W_deq + (B A) s) from the same bf16 W_deq and fp32 A, B: the same bits.
    assert differing == [], f"{len(differing)} tensors differ from PEFT's merge, e.g. {differing[:3]}"
    name = "model.layers.3.self_attn.v_proj.weight"
    assert not torch.equal(load_file(str(out / "model.safetensors"))[name], load_file(str(deq / "model.safetensors"))[name])
    for x in prompt_ids:
        assert torch.equal(ours(x).logits, peft(x).logits)


@torch.no_grad()
def test_nf4_merge_prints_its_error_table_verifies_and_loads(nf4, adapter, merged, prompt_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged-nf4"
    shown = _cli(qtrain, "merge", "--base", nf4, "--adapter", adapter, "--out", out, "--format", "nf4", "--quiet").stdout
    print("\n" + shown)
    assert "nf4 merge: worst 10 of 180 merged tensors" in shown and "rel. to update" in shown
    assert "logits: max |diff|" in shown and "top-1 agreement" in shown
    assert "ok: " in _cli(qconvert, "verify", out).stdout  # exit 0 checked by _cli
    nf4_report = json.loads((out / "merge_report.json").read_text())
    bf16 = {t["name"]: t for t in merged[1]["tensors"]}
    assert all(t["rel_error"] > bf16[t["name"]]["rel_error"] for t in nf4_report["tensors"])
    assert nf4_report["logits"]["max_abs_diff"] > merged[1]["logits"]["max_abs_diff"]
    import bitsandbytes.functional as bnbf

    from qlora_kit.kernels import dequant
    from qlora_kit.formats import Checkpoint

    bnb = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map="cpu").eval()
    name = "model.layers.3.self_attn.v_proj"  # a re-quantized projection: bitsandbytes decodes our bytes as we do
    w = bnb.get_submodule(name).weight
    with Checkpoint(out) as ckpt:
        assert torch.equal(bnbf.dequantize_4bit(w.data, w.quant_state).view(w.quant_state.shape),
                           dequant(ckpt.packed(name + ".weight"), torch.bfloat16))
    ours = _run(load_model(out), prompt_ids)
    theirs = [bnb(x).logits.float()[0] for x in prompt_ids]
    diff = torch.cat([(o - t).abs().flatten() for o, t in zip(ours, theirs)])
    agree = sum(int((o.argmax(-1) == t.argmax(-1)).sum()) for o, t in zip(ours, theirs)) / sum(o.shape[0] for o in ours)
    print(f"nf4 merge, ours vs transformers + bitsandbytes (bf16 compute): max |diff| {diff.max():.3f} "
          f"mean {diff.mean():.4f}, top-1 agreement {agree:.3f}")
    # Same decoded weights; bitsandbytes' CPU 4-bit GEMM rounds differently from dequant + matmul in bf16 and its
    # kernels differ by CPU (tests/integration/test_qconvert_smollm2.py: mean 0.10-0.20 there), so the mean and the
    # argmax are checked, not the max (1.91 measured here, on logits of magnitude ~40; AVX2-only CPUs differ more).
    assert diff.mean() <= 0.35 and agree >= 0.95  # measured mean 0.213, top-1 1.000
