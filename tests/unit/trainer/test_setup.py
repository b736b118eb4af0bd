"""trainer/setup.py base_folder: `train-many --base org/name` (and `train`, the one-job run) from a pre-filled
Hugging Face cache in offline mode; the adapters keep the Hub id as their base_model_name_or_path."""
import json

import pytest

from qlora_kit.trainer.many import ManyConfig, train_many
from tests.hf_cache import offline_hub_cache
from tests.unit.trainer._tiny import chat, write_jsonl

pytestmark = pytest.mark.unit


def test_train_many_takes_a_hub_id_from_the_offline_cache(tiny_chat, tmp_path, monkeypatch):
    offline_hub_cache(monkeypatch, tmp_path, "org/tiny-chat", tiny_chat)
    write_jsonl(tmp_path / "d.jsonl", [chat(f"Q{i}?", f"A{i}.") for i in range(4)])
    (tmp_path / "jobs.toml").write_text('[defaults]\nmax_steps = 1\nr = 2\nmax_seq_len = 64\n\n'
                                        '[[jobs]]\nname = "a"\ndata = "d.jsonl"\n')
    res = train_many(ManyConfig(base="org/tiny-chat", jobs=str(tmp_path / "jobs.toml"), out=str(tmp_path / "many"),
                                compute_dtype="float32", progress=False))
    assert [r["status"] for r in res.jobs] == ["done"]
    config = json.loads((tmp_path / "many" / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-chat"
