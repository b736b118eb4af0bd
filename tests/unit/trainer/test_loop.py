"""trainer/loop.py on a tiny model: outputs, exact resume, Ctrl-C, eval loss, and bad input that leaves nothing behind."""
import json
import os
import signal

import pytest

from qlora_kit.formats import load_adapter
from qlora_kit.trainer import ConfigError, OutputExists, build_config, train
from qlora_kit.trainer.checkpoint import find_checkpoint

pytestmark = pytest.mark.unit


def _cfg(tiny_chat, data, out, **kw):
    base = dict(base=str(tiny_chat), data=str(data), out=str(out), r=4, lora_alpha=8.0, max_seq_len=128,
                batch_size=2, grad_accum=2, compute_dtype="float32", learning_rate=1e-2, max_steps=4,
                progress=False, lora_dropout=0.1, lr_scheduler="cosine", warmup_steps=2)
    base.update(kw)
    return build_config(None, **base)


def test_outputs_are_a_peft_adapter_plus_config_metrics_and_curve(tiny_chat, chat_data, tmp_path):
    out = tmp_path / "run"
    res = train(_cfg(tiny_chat, chat_data, out, eval_fraction=0.25, eval_every=2, target_modules=("q_proj", "v_proj")))
    assert res.steps == 4 and len(res.losses) == 4 and not res.interrupted
    lora, tensors = load_adapter(out)
    assert lora.r == 4 and lora.lora_alpha == 8.0 and lora.base_model_name_or_path == str(tiny_chat)
    assert sorted(lora.target_modules) == ["q_proj", "v_proj"] and len(tensors) == 2 * 2 * 2
    assert json.loads((out / "train_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if "eval_loss" in r] == [2, 4] and res.eval_loss == lines[-1]["eval_loss"]
    assert all({"lr", "grad_norm", "tokens_per_s", "peak_memory_mb"} <= set(r) for r in lines if "loss" in r)
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stop_and_resume_equals_uninterrupted_exactly(tiny_chat, chat_data, tmp_path):
    optimizer = "paged_adamw8bit"  # with r=64 the tiny model's A/B reach min_8bit_size: codes + absmax round-trip
    full = train(_cfg(tiny_chat, chat_data, tmp_path / "full", optimizer=optimizer, save_every=2, r=64))
    first = train(_cfg(tiny_chat, chat_data, tmp_path / "cut", optimizer=optimizer, save_every=2, stop_after=2, r=64))
    assert first.interrupted and first.steps == 2 and first.checkpoint.name == "step-000002"
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    rest = train(_cfg(tiny_chat, chat_data, tmp_path / "cut", optimizer=optimizer, save_every=2, r=64,
                      resume=str(tmp_path / "cut")))
    assert first.losses + rest.losses == full.losses  # bitwise on CPU
    _, a = load_adapter(tmp_path / "full")
    _, b = load_adapter(tmp_path / "cut")
    assert all(a[k].equal(b[k]) for k in a)
    steps = [json.loads(s)["step"] for s in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_ctrl_c_saves_a_resumable_checkpoint(tiny_chat, chat_data, tmp_path):
    out = tmp_path / "run"

    def press_ctrl_c(step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    res = train(_cfg(tiny_chat, chat_data, out), on_step=press_ctrl_c)
    assert res.interrupted and res.steps == 2 and find_checkpoint(out) == res.checkpoint
    rest = train(_cfg(tiny_chat, chat_data, out, resume=str(out)))
    assert rest.steps == 4 and len(rest.losses) == 2 and (out / "adapter_model.safetensors").is_file()


def test_existing_output_is_refused_and_untouched(tiny_chat, chat_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExists, match="run: output folder already exists"):
        train(_cfg(tiny_chat, chat_data, out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("kw, message", [
    (dict(target_modules=("q_proj", "qkv_proj")), "target_modules: qkv_proj not in this model; its projections are "
                                                  "down_proj, gate_proj"),
    (dict(max_seq_len=1024), "max_seq_len=1024 exceeds the model's context of 256 tokens"),
])
def test_bad_settings_fail_before_writing_anything(tiny_chat, chat_data, tmp_path, kw, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        train(_cfg(tiny_chat, chat_data, out, **kw))
    assert message in str(e.value)
    assert not out.exists()
