"""trainer/data.py: record shapes, chat masking, line-numbered errors, length limits, eval split."""
import pytest

from qlora_kit.trainer.data import IGNORE, load_examples, split_eval, tokenize_record
from qlora_kit.trainer.errors import DataError
from tests.unit.trainer._tiny import chat, write_jsonl

pytestmark = pytest.mark.unit


def _loss_text(tok, ex):
    """The text of the tokens that carry loss (labels are shifted: label t is token t + 1)."""
    return tok.decode([y for y in ex.labels if y != IGNORE], skip_special_tokens=False)


def test_chat_loss_only_on_assistant_turns(tiny_tok):
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye?"},
                        {"role": "assistant", "content": "Goodbye."}]}
    ex = tokenize_record(tiny_tok, rec, "x:1")
    full = tiny_tok.encode_chat(rec["messages"], add_generation_prompt=False)
    assert list(ex.input_ids) == full  # piecewise tokenization == whole-text tokenization for this template
    assert _loss_text(tiny_tok, ex) == "Hello there.<|im_end|>\nGoodbye.<|im_end|>\n"
    assert ex.labels[-1] == IGNORE


def test_prompt_completion_and_text(tiny_tok):
    ex = tokenize_record(tiny_tok, {"prompt": "Q: two plus two? A:", "completion": " four"}, "x:1")
    assert _loss_text(tiny_tok, ex) == " four" + tiny_tok.eos_token
    ex = tokenize_record(tiny_tok, {"text": "plain text"}, "x:1")
    assert _loss_text(tiny_tok, ex) == tiny_tok.decode(list(ex.input_ids[1:]), skip_special_tokens=False)


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', "data.jsonl:3: not valid JSON"),
    ('{"question": "hi"}', "data.jsonl:3: expected {\"text\"}, {\"prompt\", \"completion\"}, {\"messages\"} or "
                           "{\"conversations\"} with values; got keys question"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "data.jsonl:3: field messages: no assistant"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "data.jsonl:3: field messages[0].role: must be one of"),
    ('[1, 2]', "data.jsonl:3: expected a JSON object, got list"),
    ('{"text": 5}', "data.jsonl:3: field text: must be a string, got 5"),
    ('{"text": "a", "messages": []}', "data.jsonl:3: holds both 'messages' and 'text'"),
    ('{"prompt": "a"}', "data.jsonl:3: field completion: missing"),
    ('{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}',
     "data.jsonl:3: fields prompt/completion: both strings or both lists of messages, got str and list"),
    ('{"conversations": [{"from": "bot", "value": "x"}]}',
     "data.jsonl:3: field conversations[0].from: must be one of human, gpt, system"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}',
     "data.jsonl:3: field messages[0].content[0]: content part of type 'image_url' is not supported"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}',
     "data.jsonl:3: field messages[0].content[0].text: must be a string"),
    ('{"messages": [{"role": "assistant", "content": "x"}], "tools": {"name": "f"}}',
     "data.jsonl:3: field tools: must be a list"),
    ('{"messages": [' + ", ".join(['{"role": "user", "content": "x"}'] * 513) + ']}',
     "data.jsonl:3: field messages: 513 messages; at most 512"),
])
def test_malformed_line_names_file_and_line(tiny_tok, tmp_path, line, message):
    path = write_jsonl(tmp_path / "data.jsonl", [chat("a", "b"), "", line, chat("c", "d")])
    with pytest.raises(DataError) as e:
        load_examples(path, tiny_tok, 128)
    assert message in str(e.value)


def test_empty_dataset(tiny_tok, tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no examples"):
        load_examples(path, tiny_tok, 128)
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "missing.jsonl", tiny_tok, 128)


def test_too_long_is_an_error_unless_truncate(tiny_tok, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [chat("short", "ok"), chat("long", "word " * 200)])
    with pytest.raises(DataError, match=r"long.jsonl:2: \d+ tokens exceed max_seq_len=64"):
        load_examples(path, tiny_tok, 64)
    ex = load_examples(path, tiny_tok, 64, truncate=True)
    assert len(ex[1]) == 64 and ex[1].labels[-1] == IGNORE and ex[1].line == 2


def test_split_eval_is_seeded_and_disjoint(tiny_tok, chat_data):
    ex = load_examples(chat_data, tiny_tok, 128)
    train, held = split_eval(ex, 0.25, seed=3)
    assert len(held) == 6 and len(train) == 18
    assert {e.line for e in train}.isdisjoint({e.line for e in held})
    assert [e.line for e in split_eval(ex, 0.25, seed=3)[1]] == [e.line for e in held]
    with pytest.raises(DataError, match="leaves no training examples"):
        split_eval(ex[:1], 0.5, seed=0)


def test_row_work_is_bounded_before_any_rendering(tiny_tok):
    """records.py's budgets: characters per row, and assistant turns x characters (one render per turn)."""
    from qlora_kit.trainer.records import MAX_RENDER_CHARS, MAX_ROW_CHARS

    big = {"messages": [{"role": "user", "content": "x" * (MAX_ROW_CHARS // 2)},
                        {"role": "assistant", "content": "y" * (MAX_ROW_CHARS // 2 + 1)}]}
    with pytest.raises(DataError, match=rf"x:1: field messages\[1\].content: the row's messages hold more than "
                                        rf"{MAX_ROW_CHARS} characters"):
        tokenize_record(tiny_tok, big, "x:1")
    turns = 100
    size = MAX_RENDER_CHARS // turns // (2 * turns) + 1
    many = {"messages": [{"role": r, "content": "z" * size} for _ in range(turns) for r in ("user", "assistant")]}
    assert turns * size * 2 * turns > MAX_RENDER_CHARS and size * 2 * turns <= MAX_ROW_CHARS
    with pytest.raises(DataError, match="x:1: field messages: 100 assistant turns over .* is too much to mask"):
        tokenize_record(tiny_tok, many, "x:1")


def test_assistant_first_conversation_is_refused_not_mis_masked(tiny_tok):
    """SmolLM2's template writes a default system prompt before the first message: with an assistant message first,
    that text would sit inside the first turn, so the row is refused (it used to train on the system prompt)."""
    rec = {"messages": [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Q?"},
                        {"role": "assistant", "content": "A."}]}
    with pytest.raises(DataError, match="x:1: .*opens with an assistant message"):
        tokenize_record(tiny_tok, rec, "x:1")


def test_loss_mask_options_put_loss_on_every_token(tiny_tok):
    """--no-assistant-only-loss / --no-completion-only-loss: the same ids, loss on every token after the first."""
    from qlora_kit.trainer.data import LossMask

    everything = LossMask(assistant_only=False, completion_only=False)
    rows = [chat("Hi?", "Hello."), {"prompt": "Q: two plus two? A:", "completion": " four"},
            {"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Yo."}]}]
    for row in rows:
        masked, full = tokenize_record(tiny_tok, row, "x:1"), tokenize_record(tiny_tok, row, "x:1", 1, everything)
        assert full.input_ids == masked.input_ids
        assert list(full.labels) == list(full.input_ids[1:]) + [IGNORE]
        assert sum(y != IGNORE for y in masked.labels) < len(masked) - 1
