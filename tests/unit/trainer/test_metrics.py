"""trainer/metrics.py and the loss curve in a real run: `--report-to tensorboard` event files read back with
TensorBoard's own EventAccumulator hold the same loss/lr/eval-loss as metrics.jsonl; unknown --report-to values
are refused by name; without matplotlib the run succeeds and says the plot was skipped."""
import json

import pytest
from click.testing import CliRunner

from qlora_kit.trainer import ConfigError, build_config, plot, train
from qlora_kit.trainer.cli import main as qtrain

pytestmark = pytest.mark.unit


def _cfg(tiny_chat, data, out, **kw):
    base = dict(base=str(tiny_chat), data=str(data), out=str(out), r=4, lora_alpha=8.0, max_seq_len=128,
                batch_size=2, grad_accum=1, compute_dtype="float32", progress=False, max_steps=3)
    return build_config(None, **(base | kw))


def _args(tiny_chat, data, out, *extra):
    return [str(a) for a in ("train", "--base", tiny_chat, "--data", data, "--out", out, "--r", "4", "--max-seq-len",
                             "128", "--batch-size", "2", "--grad-accum", "1", "--compute-dtype", "float32",
                             "--max-steps", "2", "--no-progress", *extra)]


def test_tensorboard_events_hold_the_logged_scalars(tiny_chat, chat_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(_cfg(tiny_chat, chat_data, out, report_to="tensorboard", eval_fraction=0.25, eval_every=2))
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "runs"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss"} <= set(acc.Tags()["scalars"])
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("eval_loss", "eval/loss")):
        want = [(r["step"], r[key]) for r in records if key in r]
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want] and want
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as float32


def test_unknown_report_to_is_refused_by_name(tiny_chat, chat_data, tmp_path):
    r = CliRunner().invoke(qtrain, _args(tiny_chat, chat_data, tmp_path / "run", "--report-to", "wandb"))
    assert r.exit_code == 2 and "'wandb' is not one of 'none', 'tensorboard'" in r.output
    with pytest.raises(ConfigError, match=r"report_to='wandb': choose one of none, tensorboard \(--report-to\)"):
        _cfg(tiny_chat, chat_data, tmp_path / "run", report_to="wandb")  # as from a --config file
    assert not (tmp_path / "run").exists()


def test_without_matplotlib_training_succeeds_and_says_the_plot_was_skipped(tiny_chat, chat_data, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(plot, "HAS_MATPLOTLIB", False)
    out = tmp_path / "run"
    r = CliRunner().invoke(qtrain, _args(tiny_chat, chat_data, out))
    assert r.exit_code == 0, r.output
    assert plot.SKIPPED + "\n" in r.stderr  # one line
    assert (out / "adapter_model.safetensors").is_file() and not (out / "loss_curve.png").exists()

