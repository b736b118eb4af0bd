"""publish: the dry-run file list, the upload call sequence against an in-process Hub, refusal to upload
a broken checkpoint. No network: HF_ENDPOINT points at tests/unit/qconvert/fake_hub.py."""
import base64
import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from qlora_kit.qconvert.cli import main
from qlora_kit.qconvert.convert import convert

from .fake_hub import FakeHub

pytestmark = pytest.mark.unit
FILES = ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json",
         "README.md"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_dry_run_lists_files_and_card(tiny_out):
    result = _run("publish", tiny_out, "me/tiny-nf4", "--dry-run", "--base-model", "org/tiny")
    assert result.exit_code == 0, result.output
    listed = [line.split("\t")[0].strip() for line in result.stdout.splitlines() if line.startswith("  ")
              and "\t" in line]
    assert listed == FILES
    sizes = dict(line.strip().split("\t") for line in result.stdout.splitlines() if line.startswith("  ") and "\t" in line)
    assert int(sizes["model.safetensors"]) == (tiny_out / "model.safetensors").stat().st_size
    assert "base_model: org/tiny\nbase_model_relation: quantized" in result.stdout


def _online(monkeypatch):
    """The suite runs with HF_HUB_OFFLINE=1 (no test reaches a hub); these tests reach only the in-process one."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_upload_call_sequence(tiny_out, monkeypatch):
    _online(monkeypatch)
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = _run("publish", tiny_out, "me/tiny-nf4", "--private", "--revision", "v1", "--token", "hf_x")
    assert result.exit_code == 0, result.output
    calls = [(m, p) for m, p, _ in hub.requests if p != "/api/agent-harnesses"]
    assert [p for _, p in calls] == ["/api/repos/create", "/api/models/me/tiny-nf4/branch/v1", "/api/validate-yaml",
                                     "/api/models/me/tiny-nf4/preupload/v1", "/api/models/me/tiny-nf4/commit/v1"]
    bodies = {p: b for _, p, b in hub.requests}
    assert json.loads(bodies["/api/repos/create"]) == {"name": "tiny-nf4", "organization": "me",
                                                       "visibility": "private"}
    lines = [json.loads(line) for line in bodies["/api/models/me/tiny-nf4/commit/v1"].splitlines()]
    files = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
    assert sorted(files) == sorted(FILES)
    assert files["model.safetensors"] == (tiny_out / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- bitsandbytes\n- 4-bit\n- nf4\n- qlora-kit\n---")
    assert "uploaded 6 files" in result.stdout


def test_base_model_recorded_by_convert_and_error_table(tiny_src, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "snapshots").mkdir()
    tiny_src.rename(repo / "snapshots" / ("a" * 40))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    convert("org/tiny", tmp_path / "out", progress=False)
    result = _run("publish", tmp_path / "out", "me/tiny-nf4", "--dry-run", "--against", "org/tiny")
    assert result.exit_code == 0, result.output
    card = result.stdout.split("--- README.md ---\n", 1)[1]
    assert card.startswith("---\nbase_model: org/tiny\nbase_model_relation: quantized\nlibrary_name: transformers\n"
                           "tags:\n- bitsandbytes\n- 4-bit\n- nf4\n- qlora-kit\n---\n")
    assert "SQNR over 14 quantized tensors: min " in card
    assert "| quantized linear weights (14 tensors) | 86,016 | 0.2 MiB |" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-nf4"' in card and "qserve serve me/tiny-nf4" in card


def test_broken_checkpoint_is_not_uploaded(tiny_out, monkeypatch):
    _online(monkeypatch)
    path = tiny_out / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.up_proj.weight.absmax"]
    save_file(tensors, str(path))
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = _run("publish", tiny_out, "me/tiny-nf4")
    assert result.exit_code == 2
    assert "nothing uploaded; first: " in result.stderr
    assert "model.safetensors: model.layers.1.mlp.up_proj.weight.absmax: required" in result.stderr
    assert [p for _, p, _ in hub.requests if p != "/api/agent-harnesses"] == []


def test_bad_repo_id(tiny_out):
    result = _run("publish", tiny_out, "not a repo", "--dry-run")
    assert result.exit_code == 2 and "'not a repo': not a Hub repo id" in result.stderr
