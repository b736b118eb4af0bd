"""What merging cost at the logits: the merged checkpoint against base + adapter, both run by our runtime.

Each prompt is encoded as a one-turn chat (as `qtrain ask` does; plain text when the tokenizer has no chat
template) and run once, full sequence, through three forwards in the compare dtype:

    L_ref  = base (4-bit) + adapter (models/lora.py, the LoRA branch in the adapter's fp32)
    L_base = base alone                     (the scale of what the adapter changes)
    L_mrg  = the merged checkpoint (dense bf16, or 4-bit for "nf4")

Reported per prompt and over all positions: max |L_mrg − L_ref|, the fraction of positions whose argmax
(top-1 token) agrees, and max |L_ref − L_base| (the adapter's own effect, for scale). The two models are
loaded one after the other, so peak memory is one model plus the logits.

fp32 compute (the default) isolates what the stored weights cost: in bf16 compute two runtimes holding the
very same weights already differ (on SmolLM2, the 4-bit path and the dense path of identical bf16 weights:
max |diff| ~1.1 on logits of magnitude ~38, 97% top-1 agreement), and that noise would hide the merge's own.
"""
import os
from dataclasses import dataclass

import torch

from qlora_kit.models import AdapterPayload, Batch, Tokenizer, install_adapter, load_model

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Write a Python function that reverses a string.",
    "Explain in one sentence why the sky is blue.",
    "List three primary colors.",
    "What should I pack for a weekend of hiking in the mountains?",
)
ADAPTER_ID = 0


@dataclass(frozen=True, slots=True)
class PromptCost:
    prompt: str
    tokens: int
    max_abs_diff: float
    top1_agreement: float
    adapter_effect: float


@dataclass(frozen=True, slots=True)
class LogitCost:
    """Over all prompts: max |diff|, top-1 agreement (positions agreeing / positions), adapter effect."""

    prompts: list[PromptCost]
    max_abs_diff: float
    top1_agreement: float
    adapter_effect: float
    compute_dtype: str


def _encode(tok: Tokenizer, prompt: str) -> torch.Tensor:
    ids = tok.encode_chat([{"role": "user", "content": prompt}]) if tok.chat_template else tok.encode(prompt)
    return torch.tensor([ids])


@torch.no_grad()
def compare_logits(base: str | os.PathLike, payload: AdapterPayload, merged: str | os.PathLike, fmt: str,
                   prompts: tuple[str, ...] = DEFAULT_PROMPTS, dtype: torch.dtype = torch.float32) -> LogitCost:
    """Run `prompts` through base + adapter and through the merged checkpoint in compute dtype `dtype`; see the
    module docstring."""
    tok = Tokenizer(base)
    inputs = [_encode(tok, p) for p in prompts]
    model = load_model(base, compute_dtype=dtype)
    install_adapter(model, payload, ADAPTER_ID)
    refs, effects = [], []
    for x in inputs:
        ref = model(Batch(x, adapter_ids=torch.tensor([ADAPTER_ID]))).float()[0]
        refs.append(ref)
        effects.append(float((ref - model(Batch(x)).float()[0]).abs().max()))
    del model
    model = load_model(merged, quantize=fmt == "nf4", compute_dtype=dtype)
    rows, agree, total = [], 0, 0
    for p, x, ref, effect in zip(prompts, inputs, refs, effects):
        got = model(Batch(x)).float()[0]
        same = int((got.argmax(-1) == ref.argmax(-1)).sum())
        rows.append(PromptCost(p, x.shape[1], float((got - ref).abs().max()), same / x.shape[1], effect))
        agree, total = agree + same, total + x.shape[1]
    return LogitCost(rows, max(r.max_abs_diff for r in rows), agree / max(total, 1),
                     max(r.adapter_effect for r in rows), str(dtype).removeprefix("torch."))
