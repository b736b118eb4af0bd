"""Our tokenizer + jinja2 chat template vs transformers' AutoTokenizer on the bundled SmolLM2 folder."""
import pytest

from qlora_kit.models import Tokenizer, TokenizerError

pytestmark = pytest.mark.slow

TEXTS = ["The capital of France is", "  spaces\tand\nnewlines  ", "émoji 🙂 and 中文", "<|im_start|>user"]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
]


@pytest.fixture(scope="module")
def pair(smollm2):
    from transformers import AutoTokenizer

    return Tokenizer(smollm2), AutoTokenizer.from_pretrained(smollm2)


def test_encode_decode_match_transformers(pair):
    ours, hf = pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids)


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(pair, gen):
    ours, hf = pair
    for chat in CHATS:
        assert ours.render_chat(chat, add_generation_prompt=gen) == hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=gen)
        assert ours.encode_chat(chat, gen) == list(hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen,
                                                                          return_dict=False))


def test_special_and_stop_tokens(pair):
    ours, hf = pair
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    assert hf.eos_token_id in ours.stop_token_ids and 2 in ours.stop_token_ids  # generation_config eos_token_id
    assert ours.pad_token_id == hf.pad_token_id


def test_missing_files_and_template_errors(tmp_path, smollm2):
    with pytest.raises(TokenizerError, match="tokenizer.json: missing"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((smollm2 / "tokenizer.json").read_bytes())
    tok = Tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.render_chat([{"role": "user", "content": "x"}])
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TokenizerError, match="roles must alternate"):
        tok.render_chat([{"role": "user", "content": "x"}])
