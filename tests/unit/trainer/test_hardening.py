"""Issue 13, training: non-finite hyper-parameters refused, one non-finite loss/gradient policy (the last good
state kept as a checkpoint), and a double Ctrl-C that leaves OUT rerunnable or resumable and says which."""
import os
import signal

import click
import pytest
from click.testing import CliRunner

from qlora_kit._cli import cli_errors
from qlora_kit.trainer import ConfigError, build_config, train
from qlora_kit.trainer.checkpoint import find_checkpoint
from qlora_kit.trainer.cli import main as qtrain

pytestmark = pytest.mark.unit


def _cfg(tiny_chat, data, out, **kw):
    base = dict(base=str(tiny_chat), data=str(data), out=str(out), r=4, lora_alpha=8.0, max_seq_len=128,
                batch_size=2, grad_accum=1, compute_dtype="float32", learning_rate=1e-2,
                progress=False, lora_dropout=0.0, max_steps=3)
    base.update(kw)
    return build_config(None, **base)


@pytest.mark.parametrize("key,value", [("learning_rate", float("nan")), ("learning_rate", float("inf")),
                                       ("max_grad_norm", float("nan")), ("weight_decay", float("inf"))])
def test_item16_non_finite_hyper_parameters_are_refused(tiny_chat, chat_data, tmp_path, key, value):
    with pytest.raises(ConfigError) as e:
        _cfg(tiny_chat, chat_data, tmp_path / "run", **{key: value})
    assert f"{key}={value}: must be a finite number (--{key.replace('_', '-')})" in str(e.value)


def test_item16_non_finite_loss_stops_with_the_last_good_state_kept(tiny_chat, chat_data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--base", tiny_chat, "--data", chat_data, "--out", out, "--r", "4", "--max-seq-len", "128",
            "--batch-size", "2", "--grad-accum", "1", "--compute-dtype", "float32", "--max-steps", "3", "--lora-alpha", "8",
            "--no-progress", "--lora-dropout", "0.0", "--max-grad-norm", "0", "--learning-rate", "1e30"]
    r = CliRunner().invoke(qtrain, [str(a) for a in args])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert ": loss is nan; training stopped, the last good state (step 1) is kept at" in lines[0] \
        or "gradient norm is" in lines[0], lines[0]
    assert f"continue with --resume {out}" in lines[0]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "loss_curve.png").exists()
    assert find_checkpoint(out).name == "step-000001"  # the state before the step that went non-finite


def _double_ctrl_c(at_step):
    def hook(step, loss):
        if step == at_step:
            os.kill(os.getpid(), signal.SIGINT)  # first: stop after this step
            os.kill(os.getpid(), signal.SIGINT)  # second: abort now
    return hook


def test_item17_double_ctrl_c_without_checkpoint_leaves_nothing_and_a_rerun_works(tiny_chat, chat_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt) as e:
        train(_cfg(tiny_chat, chat_data, out), on_step=_double_ctrl_c(1))
    assert str(e.value) == f"aborted: no output was left behind ({out} removed: it held no checkpoint yet)"
    assert not out.exists()
    assert train(_cfg(tiny_chat, chat_data, out, max_steps=2)).steps == 2  # not "output folder already exists"


def test_item17_double_ctrl_c_after_a_checkpoint_keeps_out_resumable(tiny_chat, chat_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt) as e:
        train(_cfg(tiny_chat, chat_data, out, save_every=1), on_step=_double_ctrl_c(2))
    assert str(e.value) == f"aborted: {out} kept; continue from its latest checkpoint with --resume {out}"
    res = train(_cfg(tiny_chat, chat_data, out, save_every=1, resume=str(out)))
    assert res.steps == 3 and (out / "adapter_model.safetensors").is_file()


def test_item17_the_cli_prints_the_interrupt_message_it_is_given():
    @click.command()
    @cli_errors
    def cmd():
        raise KeyboardInterrupt("aborted: /x kept; continue from its latest checkpoint with --resume /x")

    r = CliRunner().invoke(cmd, [])
    assert r.exit_code == 130
    assert r.stderr.strip() == "interrupted: aborted: /x kept; continue from its latest checkpoint with --resume /x"
