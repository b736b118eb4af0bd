"""qtrain publish: the adapter card (parsed back with huggingface_hub) links the base, summarizes data, settings
and losses, shows the loss curve; the upload against an in-process Hub commits exactly the adapter files."""
import base64
import hashlib
import json

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard, ModelCardData

from qlora_kit.trainer import build_config, train
from qlora_kit.trainer.cli import main as qtrain
from tests.unit.qconvert.fake_hub import FakeHub
from tests.unit.trainer._tiny import chat, write_jsonl

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def adapter(tiny_chat, tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    data = write_jsonl(root / "facts.jsonl", [chat(f"Fact {i}?", f"Fact {i} is {i * 7}.") for i in range(16)])
    out = root / "adapter"
    train(build_config(None, base=str(tiny_chat), data=str(data), out=str(out), r=4, lora_alpha=8.0, max_seq_len=64,
                       batch_size=2, grad_accum=1, compute_dtype="float32", progress=False, max_steps=2,
                       eval_fraction=0.25, eval_every=1))
    return out, data


def _run(*args):
    return CliRunner().invoke(qtrain, ["publish", *map(str, args)], catch_exceptions=False)


def test_dry_run_card(adapter, tmp_path):
    out, data = adapter
    r = _run(out, "me/facts-lora", "--dry-run", "--base-model", "org/tiny-nf4")
    assert r.exit_code == 0, r.output
    listed = [line.split("\t")[0].strip() for line in r.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["adapter_config.json", "adapter_model.safetensors", "loss_curve.png", "README.md"]
    (tmp_path / "README.md").write_text(r.stdout.split("--- README.md ---\n", 1)[1])
    card = ModelCard.load(tmp_path / "README.md")
    meta = ModelCardData(**card.data.to_dict())
    assert (meta.base_model, meta.base_model_relation, meta.library_name, meta.pipeline_tag) == \
        ("org/tiny-nf4", "adapter", "peft", "text-generation")
    metrics = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    last_eval = [m for m in metrics if "eval_loss" in m][-1]
    steps = [m for m in metrics if "loss" in m]
    text = card.text
    assert f"- eval loss: {last_eval['eval_loss']:.4f} (step {last_eval['step']})" in text
    assert f"- train loss: {steps[0]['loss']:.4f} (step 1) -> {steps[-1]['loss']:.4f} (step 2)" in text
    assert f"- training data: `facts.jsonl`, 16 rows, sha256 `{hashlib.sha256(data.read_bytes()).hexdigest()}`" in text
    assert "- eval split: 25% of the training data held out" in text
    assert "| `r` | `4` |" in text and "| `learning_rate` | `0.0002` |" in text
    assert "![loss curve](loss_curve.png)" in text
    assert 'PeftModel.from_pretrained(model, "me/facts-lora")' in text
    assert str(data.parent) not in text  # local paths stay private


def test_upload_commits_the_adapter_files(adapter, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    out, _ = adapter
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        r = _run(out, "me/facts-lora", "--base-model", "org/tiny-nf4", "--token", "hf_x")
    assert r.exit_code == 0, r.output
    body = next(b for _, p, b in hub.requests if p == "/api/models/me/facts-lora/commit/main")
    files = {v["value"]["path"]: base64.b64decode(v["value"]["content"])
             for v in map(json.loads, body.splitlines()) if v["key"] == "file"}
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "loss_curve.png"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss_curve.png"):
        assert files[name] == (out / name).read_bytes()
    assert ModelCard(files["README.md"].decode()).data.base_model == "org/tiny-nf4"


def test_not_an_adapter_folder_is_one_line(tmp_path):
    r = _run(tmp_path, "me/x", "--dry-run")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert f"{tmp_path / 'adapter_config.json'}: missing; not a PEFT adapter folder" in r.stderr


def test_bad_repo_id(adapter):
    r = _run(adapter[0], "not a repo", "--dry-run")
    assert r.exit_code == 2 and "'not a repo': not a Hub repo id" in r.stderr
