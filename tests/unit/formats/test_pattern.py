"""rank_pattern / alpha_pattern keys matched PEFT's way without backtracking (issue 13 item 4).

PEFT itself (peft.utils.other.get_pattern_key) is the oracle for which key matches which module name."""
import re
import threading
import time

import pytest
from peft.utils.other import get_pattern_key

from qlora_kit.formats._pattern import MAX_KEY_CHARS, PatternError, PatternTable
from qlora_kit.formats.errors import AdapterFormatError
from qlora_kit.formats.peft import LoraConfig

pytestmark = pytest.mark.unit

NAMES = [f"model.layers.{i}.{m}" for i in (0, 1, 3, 11, 12) for m in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")]
NAMES += ["lm_head", "x", "model.layers.1.self_attn.q_proj_extra"]
KEYS = ["q_proj", r"layers\.1\.self_attn\.q_proj", "layers.1.self_attn.q_proj", r"layers\.\d+\.self_attn\.(q|v)_proj",
        "^model.layers.3.*", "(k|o)_proj$", r"mlp\..*", "self_attn.[a-z]_proj", r"layers\.1[0-9]\..*", "[^.]+_proj",
        ".*", "(?:lm_)?head", "x?", r"lay.{2,4}\.\d\.self_attn\.q_proj", r"\w+", "q_proj|down_proj",
        "1.self_attn.q_proj", "a{0}model.layers.0.mlp.down_proj"]


@pytest.mark.parametrize("key", KEYS)
def test_matches_like_peft(key):
    table = PatternTable({key: 1})
    for name in NAMES:
        theirs = get_pattern_key([key], name) == key and re.match(rf"(.*\.)?({key})$", name) is not None
        assert (table.lookup(name, None) is not None) == theirs, (key, name)


def test_first_matching_key_wins_in_order():
    table = PatternTable({"v_proj": 4, r"layers\.1\..*": 2, "q_proj": 3})
    assert [table.lookup(n, 8) for n in ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                                          "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj")] == [4, 2, 3, 8]


@pytest.mark.parametrize("key", ["(.|.)*!", "(a*)*b", "(a|aa)+x", "(.*)*" * 10 + "!", "((a+)+)+!"])
def test_redos_patterns_return_promptly(key):
    """`re` needs exponential time for these on a long name; the NFA finishes in milliseconds."""
    name = "model.layers.0.self_attn.q_proj" * 3 + "a" * 40
    result = []
    t = threading.Thread(target=lambda: result.append(PatternTable({key: 1.0}).lookup(name, None)), daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(10)
    assert not t.is_alive() and result == [None], key
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("key,msg", [
    ("q_proj(", "an unclosed '('"), ("a**", "a quantifier on a quantifier"), (r"(a)\1", r"the escape \1"),
    ("(?=a)", "a group extension '(?'"), ("a{1,999}", "a repeat count over 64"), ("a^b", "'^' in this place"),
    ("x" * (MAX_KEY_CHARS + 1), f"at most {MAX_KEY_CHARS} characters"), ("[a-", "an unclosed '['"),
    ("(a{64}){64}", "more than 2048 states"), ("a{2", "'{' that is not a {m}"),
])
def test_unsupported_keys_are_refused_by_name(key, msg):
    with pytest.raises(PatternError) as e:
        PatternTable({key: 1})
    assert f"key {key!r}" in str(e.value) and msg in str(e.value), str(e.value)


def test_lora_config_refuses_bad_patterns_and_values():
    with pytest.raises(AdapterFormatError, match=r"alpha_pattern: key 'q_proj\(': an unclosed '\('"):
        LoraConfig.from_json({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "alpha_pattern": {"q_proj(": 2}})
    with pytest.raises(AdapterFormatError, match="rank_pattern=.*must map module-name patterns to integers >= 1"):
        LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj",), rank_pattern={"q_proj": True})
    with pytest.raises(AdapterFormatError, match="alpha_pattern=.*finite numbers"):
        LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj",), alpha_pattern={"q_proj": float("nan")})
