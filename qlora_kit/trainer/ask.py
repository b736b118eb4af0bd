"""Greedy answers of the base model and of a trained adapter to the same chat questions, side by side."""
import os
from dataclasses import dataclass

from qlora_kit._cli.hub import resolve_checkpoint
from qlora_kit.models import SamplingParams, Tokenizer, base_names, generate, load_model, load_peft_adapter

ADAPTER_ID = 0


@dataclass(frozen=True, slots=True)
class Answer:
    question: str
    base: str
    adapter: str


def ask(base: str | os.PathLike, adapter: str | os.PathLike, questions: list[str], max_tokens: int = 48) -> list[Answer]:
    """Answer each question as a one-turn chat, greedily, once with the base model and once with the adapter.

    Raises:
        models/formats errors for a bad checkpoint or adapter folder.
    """
    given, base = str(base), resolve_checkpoint(base)  # a folder, or a Hub id's snapshot in the HF cache
    names = base_names(base) + ((given,) if given != str(base) else ())
    tok = Tokenizer(base)
    model = load_model(base)
    load_peft_adapter(model, adapter, ADAPTER_ID, base=names)  # the adapter boundary, as qserve's
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(max_tokens=max_tokens)
    outs = {}
    for label, aid in (("base", -1), ("adapter", ADAPTER_ID)):
        gen = generate(model, prompts, params, adapter_ids=[aid] * len(prompts), stop_token_ids=tok.stop_token_ids,
                       pad_id=tok.pad_token_id)
        outs[label] = [tok.decode(g).strip() for g in gen]
    return [Answer(q, b, a) for q, b, a in zip(questions, outs["base"], outs["adapter"])]
