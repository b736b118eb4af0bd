"""qtrain CLI end to end on a tiny random model: config file + flags, outputs, one-line errors with exit code 2."""
import json

import pytest
from click.testing import CliRunner

from qlora_kit.trainer.cli import main
from tests.unit.trainer._tiny import chat, write_jsonl
from tests.unit.trainer.conftest import chat_data, tiny_chat  # noqa: F401  (shared fixtures)

pytestmark = pytest.mark.integration


def test_help_documents_the_qlora_preset():
    out = CliRunner().invoke(main, ["train", "--help"]).output
    for text in ("QLoRA paper", "r 64, lora_alpha 16", "lr 2e-4, constant schedule, warmup 3%",
                 "max_grad_norm 0.3, paged AdamW", "[default: 64]", "[default: 'paged_adamw']"):
        assert text in " ".join(out.split()), text


def test_config_file_and_flags_train_an_adapter(tiny_chat, chat_data, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'base = "{tiny_chat}"\ndata = "{chat_data}"\nr = 4\nmax_steps = 2\nbatch_size = 2\n'
                   'grad_accum = 1\ncompute_dtype = "float32"\nmax_seq_len = 128\n')
    res = CliRunner().invoke(main, ["train", "--config", str(cfg), "--out", str(tmp_path / "o"), "--r", "2",
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "2 steps" in res.output
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["r"] == 2


@pytest.mark.parametrize("records, extra, message", [
    (['{"messages": [}'], [], "bad.jsonl:1: not valid JSON"),
    ([], [], "bad.jsonl: no examples"),
    ([chat("q", "word " * 300)], [], "bad.jsonl:1: "),
    ([chat("q", "a")], ["--target-modules", "c_attn"], "target_modules: c_attn not in this model"),
])
def test_bad_input_is_one_red_line_and_exit_2(tiny_chat, tmp_path, records, extra, message):
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    res = CliRunner().invoke(main, ["train", "--base", str(tiny_chat), "--data", str(data), "--out",
                                    str(tmp_path / "o"), "--max-seq-len", "128", "--no-progress", *extra])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_existing_out_exit_2(tiny_chat, chat_data, tmp_path):
    (tmp_path / "o").mkdir()
    res = CliRunner().invoke(main, ["train", "--base", str(tiny_chat), "--data", str(chat_data), "--out",
                                    str(tmp_path / "o")])
    assert res.exit_code == 2 and "already exists" in res.output


def test_ask_prints_base_and_adapter_answers(tiny_chat, chat_data, tmp_path):
    out = tmp_path / "o"
    res = CliRunner().invoke(main, ["train", "--base", str(tiny_chat), "--data", str(chat_data), "--out", str(out),
                                    "--r", "2", "--max-steps", "1", "--max-seq-len", "128", "--no-progress"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["ask", "--base", str(tiny_chat), "--adapter", str(out), "--max-tokens", "3",
                                    "What is fact number 3?"])
    assert res.exit_code == 0, res.output
    assert "Q: What is fact number 3?" in res.output and "base" in res.output and "adapter:" in res.output
