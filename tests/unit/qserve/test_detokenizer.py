"""engine/detokenizer.py: the streamed text equals the full decode (SmolLM2's real tokenizer: multi-byte UTF-8
split over tokens, special tokens, random ids that never form valid UTF-8), stop strings cut it, and the work per
step stays flat over a 2,000-token stream (tokens passed to decode counted, not timed)."""
import random

import pytest

from qlora_kit.models import Tokenizer
from qlora_kit.qserve.engine.detokenizer import Detokenizer

from ._tiny_serve import CharTokenizer

pytestmark = pytest.mark.unit

# French accents, CJK (3-byte UTF-8), emoji (4-byte, split over 2-3 byte-level tokens), a ZWJ sequence, Cyrillic
TEXTS = ["Le thé vert coûte 4,50 € — très bon ! Ça va ?", "我们今天去喝茶，好吗？绿茶和乌龙茶都很好喝。",
         "Tea time 🍵🍰 with friends 👩‍👩‍👧 and cake", "Привет, как дела? Всё хорошо.", "plain ASCII, no surprises"]


@pytest.fixture(scope="module")
def tok(smollm2):
    return Tokenizer(smollm2)


def _stream(tok, ids, stops=(), chunk=1):
    d = Detokenizer(tok, stops)
    parts, stopped = [], False
    for i in range(0, len(ids), chunk):
        final = i + chunk >= len(ids)
        delta, hit = d.step(ids[i:i + chunk], final)
        parts.append(delta)
        if hit:
            stopped = True
            break
    return "".join(parts), stopped, d


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert any(tok.decode([t]).endswith("\ufffd") for t in ids) or text.isascii()  # really split characters
    for chunk in (1, 3):
        assert _stream(tok, ids, chunk=chunk)[0] == tok.decode(ids) == text


def test_special_tokens_are_skipped_as_in_the_full_decode(tok):
    ids = tok.encode_chat([{"role": "user", "content": "Ça va ? 🍵"}])  # <|im_start|> ... tokens inside
    assert any(tok.decode([t], skip_special_tokens=False) != tok.decode([t]) for t in ids)
    assert _stream(tok, ids)[0] == tok.decode(ids)


def test_random_ids_invalid_utf8_included_equal_full_decode(tok):
    rng = random.Random(0)
    vocab = tok.vocab_size
    bytes_tokens = [t for t in range(vocab) if tok.decode([t]) == "\ufffd"][:400]  # lone UTF-8 pieces
    assert len(bytes_tokens) > 50
    for trial in range(30):
        ids = [rng.choice(bytes_tokens) if rng.random() < 0.4 else rng.randrange(vocab) for _ in range(60)]
        assert _stream(tok, ids)[0] == tok.decode(ids), trial


@pytest.mark.parametrize("text,stop", [(TEXTS[0], "€"), (TEXTS[1], "乌龙茶"), (TEXTS[2], "🍰 with"),
                                       (TEXTS[4], "no sur")])
def test_stop_string_cuts_the_text_before_it(tok, text, stop):
    ids = tok.encode(text, add_special_tokens=False)
    out, stopped, _ = _stream(tok, ids, (stop, "never-seen-XYZ"))
    assert stopped and out == text[:text.index(stop)]


def test_partial_stop_is_held_back_until_it_cannot_be_one():
    d = Detokenizer(CharTokenizer(), ("STOP",))  # token t decodes to chr(65 + t % 26)
    a, b, c, s, t, o, p = (ord(ch) - 65 for ch in "ABCSTOP")
    assert d.step([a, b, c, s, t], False) == ("AB", False)  # "CST" could still start "STOP": 3 chars held
    assert d.step([o, p, a], False) == ("C", True)
    d = Detokenizer(CharTokenizer(), ("STOP",))
    assert d.step([s, t, o], False) == ("", False)
    assert d.step([a], True) == ("STOA", False)  # final: everything held is sent


def test_work_per_token_stays_flat_over_a_2000_token_stream(tok):
    ids = tok.encode(" ".join(TEXTS * 40), add_special_tokens=False)[:2000]
    assert len(ids) == 2000
    d = Detokenizer(tok)
    per_step, parts = [], []
    for i, t in enumerate(ids):
        before = d.tokens_decoded
        parts.append(d.step([t], i == len(ids) - 1)[0])
        per_step.append(d.tokens_decoded - before)
    assert "".join(parts) == tok.decode(ids)
    first, last = sum(per_step[:100]), sum(per_step[-100:])
    assert last <= 1.5 * first, (first, last)  # a full re-decode per step would be ~20x (1,950 vs 50 tokens a step)
    assert max(per_step) <= 16  # the window: tokens since the last emitted character plus one emitted segment
