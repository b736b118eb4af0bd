"""Fixtures for trainer tests: a tiny chat model (SmolLM2 tokenizer) and a small chat dataset."""
import pytest

from tests.unit.trainer._tiny import chat, write_jsonl, write_tiny_chat_model


@pytest.fixture(scope="session")
def tiny_chat(smollm2, tmp_path_factory):
    return write_tiny_chat_model(smollm2, tmp_path_factory.mktemp("tiny_chat") / "model")


@pytest.fixture(scope="session")
def tiny_tok(tiny_chat):
    from qlora_kit.models import Tokenizer

    return Tokenizer(tiny_chat)


@pytest.fixture
def chat_data(tmp_path):
    qa = [(f"What is fact number {i}?", f"Fact {i} is that the kettle sings at {i * 7} degrees.") for i in range(24)]
    return write_jsonl(tmp_path / "chat.jsonl", [chat(q, a) for q, a in qa])
