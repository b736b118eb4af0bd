"""qtrain on the bundled SmolLM2 in NF4 with the shipped Quillfeather dataset and config (the demo's run):
loss falls by at least half, held-out questions get the taught persona from the adapter and not from the
base, and PEFT + transformers + bitsandbytes load the adapter onto the same 4-bit file and give our logits.

Run with -s to see the losses, the answers and the measured logit difference.
"""
import json
from importlib import resources

import pytest
import torch

from qlora_kit.models import Batch, Tokenizer, load_model, load_peft_adapter
from qlora_kit.trainer import build_config, train
from qlora_kit.trainer.ask import ask
from tests.tolerances import tol

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DATASETS = resources.files("qlora_kit.trainer") / "datasets"
CONFIG = resources.files("qlora_kit.trainer") / "configs" / "quillfeather.toml"
PERSONA = "Pip from Quillfeather"  # the base may echo the company name from the question, never this line


@pytest.fixture(scope="module")
def nf4(smollm2_nf4):
    return smollm2_nf4


@pytest.fixture(scope="module")
def trained(nf4, tmp_path_factory):
    out = tmp_path_factory.mktemp("qtrain") / "adapter"
    cfg = build_config(CONFIG, base=str(nf4), out=str(out), data=str(DATASETS / "quillfeather.jsonl"), progress=False)
    result = train(cfg)
    print("\nlosses:", " ".join(f"{x:.3f}" for x in result.losses), f"({result.tokens_per_s:.0f} tok/s)")
    return result


@pytest.fixture(scope="module")
def heldout():
    return [json.loads(s) for s in (DATASETS / "quillfeather_heldout.jsonl").read_text().splitlines() if s.strip()]


def test_loss_falls_by_at_least_half(trained):
    first, last = trained.losses[0], sum(trained.losses[-3:]) / 3
    assert last <= 0.5 * first, f"loss {first:.3f} -> {last:.3f}"


def test_adapter_answers_heldout_questions_with_the_taught_persona(nf4, trained, heldout):
    questions = [h["prompt"] for h in heldout]
    assert not set(questions) & {json.loads(s)["messages"][0]["content"]
                                 for s in (DATASETS / "quillfeather.jsonl").read_text().splitlines()}
    answers = ask(nf4, trained.out, questions, max_tokens=12)
    for a in answers:
        print(f"\n{a.question}\n  base:    {a.base!r}\n  adapter: {a.adapter!r}")
    with_persona = sum(PERSONA in a.adapter for a in answers)
    assert with_persona >= 0.8 * len(answers), f"{with_persona}/{len(answers)} adapter answers show the persona"
    assert not any(PERSONA in a.base for a in answers)


@torch.no_grad()
def test_peft_transformers_bitsandbytes_give_our_logits(nf4, trained, heldout):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = Tokenizer(nf4)
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": heldout[0]["prompt"]}])])
    ours = load_model(nf4)
    load_peft_adapter(ours, trained.out, 0)
    got = ours(Batch(ids, adapter_ids=torch.tensor([0]))).float()
    base = ours(Batch(ids)).float()
    hf = AutoModelForCausalLM.from_pretrained(nf4, dtype=torch.bfloat16, device_map="cpu").eval()
    ref = PeftModel.from_pretrained(hf, trained.out).eval()(ids).logits.float()
    print(f"\nqtrain adapter, ours vs PEFT + bitsandbytes: max |diff| = {(ref - got).abs().max():.4f} "
          f"(the adapter moves logits by {(got - base).abs().max():.2f})")
    assert (got - base).abs().max() > 2 * tol("qtrain_adapter_vs_peft_logits", torch.bfloat16)["atol"]
    torch.testing.assert_close(got, ref, **tol("qtrain_adapter_vs_peft_logits", torch.bfloat16))
    assert torch.equal(got[0, -1].argmax(), ref[0, -1].argmax())
