"""Every row shape qtrain accepts (trainer/records.py), one committed sample file each (tests/data/formats/):
each trains 2 steps, and on its first row the loss mask is checked token by token against an independent oracle.

The oracle is transformers: its tokenizer renders the conversation (apply_chat_template, its own jinja
renderer, tools passed as `tools=`) and tokenizes the whole text with character offsets; the tokens that
must carry loss are those whose first character lies in an assistant turn's content or end-of-turn text
("<|im_end|>\\n"), in the completion, or (plain text) anywhere. Our Example must have the same ids, and labels
(shifted: label t-1 is token t) not IGNORE exactly at those positions.
"""
import json
import shutil
from pathlib import Path

import pytest

from qlora_kit.trainer import build_config, train
from qlora_kit.trainer.data import IGNORE, load_examples
from qlora_kit.trainer.records import SHAREGPT_ROLES

pytestmark = pytest.mark.unit

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "formats"
FORMATS = ["text", "prompt_completion", "prompt_completion_chat", "messages_trl", "sharegpt", "content_parts", "tools"]
HEAD, END = "<|im_start|>assistant\n", "<|im_end|>\n"


@pytest.fixture(scope="module")
def tools_model(tiny_chat, tmp_path_factory):
    """The tiny model with a chat template that renders the tools column."""
    folder = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(tiny_chat, folder)
    shutil.copy(SAMPLES / "tools_template.jinja", folder / "chat_template.jinja")
    return folder


def _messages(row: dict) -> list[dict]:
    """The conversation as plain {role, content} messages, converted here independently of records.py."""
    if "conversations" in row:
        return [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in row["conversations"]]
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "\n".join(p["text"] for p in m["content"])} for m in row["messages"]]


def _oracle(hf, row: dict) -> tuple[list[int], set[int]]:
    """(token ids, positions that carry loss) of one row, from transformers' rendering and offsets."""
    eos = hf.eos_token
    if "text" in row:
        text, specials, spans = row["text"] + eos, True, None
    elif isinstance(row.get("prompt"), str):
        text, specials = row["prompt"] + row["completion"] + eos, True
        spans = [(len(row["prompt"]), len(text))]
    elif "prompt" in row:
        head = hf.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        text, specials = hf.apply_chat_template(row["prompt"] + row["completion"], tokenize=False), False
        assert text.startswith(head)
        spans = [(len(head), len(text))]
    else:
        msgs = _messages(row)
        text = hf.apply_chat_template(msgs, tools=row.get("tools"), tokenize=False)
        specials, spans, cursor = False, [], 0
        for m in msgs:
            if m["role"] == "assistant":
                at = text.index(HEAD + m["content"] + END, cursor) + len(HEAD)
                cursor = at + len(m["content"] + END)
                spans.append((at, cursor))
    enc = hf(text, add_special_tokens=specials, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if spans is None:  # plain text: every token is a target (the first has no predecessor)
        return ids, set(range(1, len(ids)))
    return ids, {t for t, (s, _) in enumerate(enc["offset_mapping"]) if t and any(a <= s < b for a, b in spans)}


@pytest.mark.parametrize("name", FORMATS)
def test_format_masks_exactly_the_trained_tokens_and_trains(name, tiny_chat, tools_model, tmp_path):
    from transformers import AutoTokenizer

    from qlora_kit.models import Tokenizer

    base = tools_model if name == "tools" else tiny_chat
    path = SAMPLES / f"{name}.jsonl"
    examples = load_examples(path, Tokenizer(base), 256)
    assert len(examples) == 4
    row = json.loads(path.read_text().splitlines()[0])
    ids, loss = _oracle(AutoTokenizer.from_pretrained(base), row)
    ex = examples[0]
    assert list(ex.input_ids) == ids
    ours = {t for t in range(1, len(ex)) if ex.labels[t - 1] != IGNORE}
    assert ours == loss and loss
    for t in loss:  # the label at t - 1 is the token at t
        assert ex.labels[t - 1] == ex.input_ids[t]
    if name == "tools":
        assert "lookup_fact" in AutoTokenizer.from_pretrained(base).decode(ids)

    res = train(build_config(None, base=str(base), data=str(path), out=str(tmp_path / "run"), r=4, lora_alpha=8.0,
                             max_seq_len=256, batch_size=2, grad_accum=1, compute_dtype="float32", max_steps=2,
                             progress=False, target_modules=("q_proj",)))
    assert res.steps == 2 and len(res.losses) == 2 and all(0 < x < 20 for x in res.losses)
