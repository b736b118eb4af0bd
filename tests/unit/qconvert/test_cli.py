"""Bad input through the real CLI: one line on stderr, non-zero exit, no OUT and no temporary left."""
import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qlora_kit.formats import shards as shards_module
from qlora_kit.qconvert import convert as convert_module
from qlora_kit.qconvert.cli import main

from .tiny import CONFIG, tiny_state, write_tiny

pytestmark = pytest.mark.unit


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _assert_failed(result, out, code, *fragments):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_missing_src(tmp_path):
    _assert_failed(_run("convert", tmp_path / "nope", tmp_path / "out"), tmp_path / "out", 2,
                   "error:", f"{tmp_path / 'nope'}: no such folder")


def test_truncated_safetensors(tiny_src, tmp_path):
    path = tiny_src / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _assert_failed(_run("convert", tiny_src, tmp_path / "out"), tmp_path / "out", 2, "model.safetensors", "truncated")


def test_corrupt_safetensors_header(tiny_src, tmp_path):
    path = tiny_src / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:20] = b"#" * 12
    path.write_bytes(bytes(raw))
    _assert_failed(_run("convert", tiny_src, tmp_path / "out"), tmp_path / "out", 2, "model.safetensors",
                   "header is not valid JSON")


def test_unknown_architecture(tmp_path):
    src = write_tiny(tmp_path / "src", config=CONFIG | {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})
    _assert_failed(_run("convert", src, tmp_path / "out"), tmp_path / "out", 2, "model_type='gpt_neox'",
                   "is not supported")


def test_unknown_dtype(tmp_path):
    import torch

    state = tiny_state()
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].to(torch.float8_e4m3fn)
    src = write_tiny(tmp_path / "src", state)
    _assert_failed(_run("convert", src, tmp_path / "out"), tmp_path / "out", 2,
                   "tensor model.embed_tokens.weight has dtype F8_E4M3")


def test_existing_out_without_overwrite(tiny_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _run("convert", tiny_src, out)
    assert result.exit_code == 2 and "already exists (pass --overwrite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_disk_full_mid_way(tiny_src, tmp_path, monkeypatch):
    budget = {"bytes": 20_000}

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            budget["bytes"] -= len(data)
            if budget["bytes"] < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(shards_module, "open", lambda *a, **k: FullDisk(open(*a, **k)), raising=False)
    _assert_failed(_run("convert", tiny_src, tmp_path / "out"), tmp_path / "out", 1,
                   "failed:", ".part: write failed (No space left on device)")


def test_ctrl_c_mid_way(tiny_src, tmp_path, monkeypatch):
    real, calls = convert_module.quantize_4bit, []

    def interrupted(*args, **kwargs):
        calls.append(args[-1])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "quantize_4bit", interrupted)
    _assert_failed(_run("convert", tiny_src, tmp_path / "out"), tmp_path / "out", 130, "interrupted")
    assert len(calls) == 5


def test_verify_failure_exit_code_and_json(tiny_src, tiny_out):
    result = _run("verify", tiny_out, "--against", tiny_src, "--min-sqnr", "40", "--json")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert not data["ok"] and len(data["problems"]) == 14
    assert result.stderr.strip().endswith("dB is below the threshold 40.00 dB")
    ok = _run("verify", tiny_out, "--against", tiny_src)
    assert ok.exit_code == 0 and "ok" in ok.stdout


def test_commands_print_tables(tiny_src, tiny_out, tmp_path):
    ins = _run("inspect", tiny_out)
    assert ins.exit_code == 0 and "total: 98,624 params" in ins.stdout.replace("\n", " ")
    deq = _run("dequantize", tiny_out, tmp_path / "deq", "--quiet")
    assert deq.exit_code == 0 and (tmp_path / "deq" / "model.safetensors").exists()
    again = _run("convert", tiny_src, tiny_out, "--overwrite", "--quiet", "--skip-modules", "mlp.down_proj,o_proj")
    assert again.exit_code == 0 and "10 quantized + 11 kept tensors" in again.stdout


def test_installed_entry_point_reports_missing_src(tmp_path):
    exe = Path(sys.executable).parent / "qconvert"
    proc = subprocess.run([str(exe), "convert", str(tmp_path / "x"), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such folder" in proc.stderr
