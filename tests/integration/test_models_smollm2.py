"""The bundled SmolLM2 in NF4: our runtime vs transformers + bitsandbytes (+ PEFT) on the same file.

Run with -s to see the measured max |logit difference| lines.
"""
import shutil

import pytest
import torch

from qlora_kit.models import Batch, SamplingParams, Tokenizer, generate, load_model, load_peft_adapter
from tests.conftest import linked_copy
from tests.tolerances import tol

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "Once upon a time, a little robot", "The three primary colors are"]


def _bnb_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu").eval()


@pytest.fixture(scope="module")
def nf4_dir(smollm2, smollm2_bnb_nf4, tmp_path_factory):
    """SmolLM2 quantized to NF4 + double quant by transformers + bitsandbytes, saved in the shared layout (the
    session's copy, linked), with the tokenizer beside it."""
    out = linked_copy(smollm2_bnb_nf4, tmp_path_factory.mktemp("smollm2") / "nf4")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(smollm2 / name, out / name)
    return out


@pytest.fixture(scope="module")
def hf_bnb(nf4_dir):
    return _bnb_model(nf4_dir)


@pytest.fixture(scope="module")
def ours(nf4_dir):
    return load_model(nf4_dir)


@pytest.fixture(scope="module")
def prompt_ids(nf4_dir):
    tok = Tokenizer(nf4_dir)
    return [tok.encode(p) for p in PROMPTS]


@torch.no_grad()
def test_logits_equal_transformers_bitsandbytes(ours, hf_bnb, prompt_ids):
    worst = 0.0
    for ids in prompt_ids:
        x = torch.tensor([ids])
        ref, got = hf_bnb(x).logits.float(), ours(Batch(x)).float()
        worst = max(worst, (ref - got).abs().max().item())
        torch.testing.assert_close(got, ref, **tol("smollm2_vs_bnb_logits", torch.bfloat16))
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    print(f"\nSmolLM2 NF4 logits, ours vs transformers+bitsandbytes: max |diff| = {worst:.4f}")


@pytest.fixture(scope="module")
def hf_dequant(nf4_dir, smollm2):
    """transformers' bf16 decoder holding bitsandbytes' dequantized NF4 weights (from a freshly loaded
    bitsandbytes model: its CPU path repacks the codes at the first forward)."""
    import bitsandbytes.functional as bf
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).eval()
    q_modules = dict(_bnb_model(nf4_dir).named_modules())
    with torch.no_grad():
        for name, m in dense.named_modules():
            if name.endswith("_proj"):
                q = q_modules[name]
                m.weight.copy_(bf.dequantize_4bit(q.weight.data, q.weight.quant_state).to(torch.bfloat16))
    return dense


@pytest.fixture(scope="module")
def ours_fp32(nf4_dir):
    return load_model(nf4_dir, compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_fp32(ours_fp32, smollm2):
    """transformers' fp32 decoder holding exactly our fp32-decoded NF4 weights: the decoders' math compared
    without 16-bit rounding, which our CPU kernels and torch's emulated bf16 GEMM do in different orders."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in dense.named_modules():
            if name.endswith("_proj"):
                m.weight.copy_(ours_fp32.get_submodule(name).base.dequantized(torch.float32))
    return dense


@torch.no_grad()
def test_decoder_equals_transformers_on_the_same_dequantized_weights(ours, hf_dequant, ours_fp32, hf_fp32, prompt_ids):
    """Isolates the decoder from bitsandbytes' CPU GEMM: same NF4 weights, bit for bit, same decoder output."""
    for name, m in hf_dequant.named_modules():
        if name.endswith("_proj"):
            assert torch.equal(m.weight, ours.get_submodule(name).base.dequantized(torch.bfloat16))
    x = torch.tensor([prompt_ids[0]])
    ref, got = hf_fp32(x).logits, ours_fp32(Batch(x))
    print(f"\nSmolLM2, ours vs transformers fp32 on the same dequantized weights: max |diff| = {(ref - got).abs().max():.6f}")
    torch.testing.assert_close(got, ref, **tol("smollm2_vs_hf_dequant_logits", torch.float32))


# Five prompts of equal token length (5), so neither runtime pads and both run the same GEMM shapes.
GREEDY_PROMPTS = ["The capital of France is", "The three primary colors are", "The quick brown fox jumps",
                  "The sun rises in the", "Photosynthesis converts sunlight into"]


@torch.no_grad()
def test_greedy_continuations_identical_for_32_tokens(ours, ours_fp32, hf_fp32, hf_bnb, nf4_dir):
    tok = Tokenizer(nf4_dir)
    ids = torch.tensor([tok.encode(p) for p in GREEDY_PROMPTS])
    sampling = SamplingParams(max_tokens=32, ignore_eos=True)
    got = generate(ours_fp32, ids.tolist(), sampling)
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = hf_fp32.generate(ids, **kw)[:, ids.shape[1]:].tolist()
    bnb = hf_bnb.generate(ids, **kw)[:, ids.shape[1]:].tolist()
    ours_bf16 = generate(ours, ids.tolist(), sampling)  # the default compute dtype, against bitsandbytes
    agree = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), 32) for g, r in zip(ours_bf16, bnb)]
    print(f"\ngreedy, leading tokens equal to transformers+bitsandbytes (of 32): {agree}")
    for p, g, r in zip(GREEDY_PROMPTS, got, ref):
        assert g == r, f"{p!r}: ours {tok.decode(g)!r} vs transformers {tok.decode(r)!r}"
    assert "Paris" in tok.decode(got[0]) and "Paris" in tok.decode(ours_bf16[0])
    assert min(agree) >= 8


@torch.no_grad()
def test_peft_adapter_logits_equal_peft(ours, nf4_dir, prompt_ids, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(_bnb_model(nf4_dir), PeftLoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], lora_dropout=0.0, init_lora_weights=True))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.2)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    load_peft_adapter(ours, tmp_path / "adapter", 7)
    try:
        x = torch.tensor([prompt_ids[1]])
        ref = peft_model(x).logits.float()
        got = ours(Batch(x, adapter_ids=torch.tensor([7]))).float()
        base = ours(Batch(x)).float()
        print(f"\nSmolLM2 + LoRA r=8, ours vs PEFT: max |diff| = {(ref - got).abs().max():.4f} "
              f"(adapter moves logits by {(got - base).abs().max():.2f})")
        assert (got - base).abs().max() > 5 * tol("smollm2_vs_peft_logits", torch.bfloat16)["atol"]
        torch.testing.assert_close(got, ref, **tol("smollm2_vs_peft_logits", torch.bfloat16))
    finally:
        from qlora_kit.models import remove_adapter
        remove_adapter(ours, 7)
