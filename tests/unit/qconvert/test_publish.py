"""publish: the dry-run file list, the model card's metadata (parsed back with huggingface_hub), the licence
carried from source to Hub, the upload call sequence (one commit, and the resumable large-folder path)
against an in-process Hub, refusal to upload a broken checkpoint. No network: HF_ENDPOINT points at
tests/unit/qconvert/fake_hub.py."""
import base64
import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from huggingface_hub import ModelCard, ModelCardData

from qlora_kit.qconvert.cli import main
from qlora_kit.qconvert.convert import convert
from tests.hf_cache import offline_hub_cache

from .fake_hub import FakeHub
from .tiny import write_tiny

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
    card = ModelCard(result.stdout.split("--- README.md ---\n", 1)[1])
    assert card.data.base_model == "org/tiny" and card.data.base_model_relation == "quantized"


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
    data = ModelCard(files["README.md"].decode()).data.to_dict()
    assert data == {"library_name": "transformers", "pipeline_tag": "text-generation", "quantized_by": "me",
                    "tags": ["bitsandbytes", "4-bit", "nf4", "qlora-kit"]}  # no base model or licence known
    assert "uploaded 6 files" in result.stdout


def test_base_model_recorded_by_convert_and_error_table(tiny_src, tmp_path, monkeypatch):
    offline_hub_cache(monkeypatch, tmp_path, "org/tiny", tiny_src)
    convert("org/tiny", tmp_path / "out", progress=False)
    result = _run("publish", tmp_path / "out", "me/tiny-nf4", "--dry-run", "--against", "org/tiny")
    assert result.exit_code == 0, result.output
    card = result.stdout.split("--- README.md ---\n", 1)[1]
    assert ModelCard(card).data.base_model == "org/tiny"
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


LICENSES = {"LICENSE.txt": "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT\n", "USE_POLICY.md": "Acceptable use policy\n",
            "NOTICE": "Llama 3.2 is licensed under the Llama 3.2 Community License\n", "copying": "lower-case name\n"}


@pytest.fixture
def licensed_out(tmp_path):
    """A source whose card front matter states its licence, with four licence/notice files, converted."""
    src = write_tiny(tmp_path / "src")
    (src / "README.md").write_text("---\nlicense: llama3.2\nlicense_name: llama3.2\nlicense_link: LICENSE.txt\n"
                                   "tags: [facebook]\n---\n# Source card\n")
    for name, text in LICENSES.items():
        (src / name).write_text(text)
    (src / "NOTES.md").write_text("not a licence")
    convert(str(src), tmp_path / "out", progress=False)
    return tmp_path / "out"


def test_convert_carries_every_licence_file(licensed_out):
    for name, text in LICENSES.items():
        assert (licensed_out / name).read_text() == text
    assert not (licensed_out / "NOTES.md").exists() and not (licensed_out / "README.md").exists()


def test_dequantize_carries_them_too(licensed_out, tmp_path):
    from qlora_kit.qconvert.dequantize import dequantize

    dequantize(licensed_out, tmp_path / "bf16", progress=False)
    for name, text in LICENSES.items():
        assert (tmp_path / "bf16" / name).read_text() == text


def test_card_metadata_parses_back_and_carries_the_licence(licensed_out, tmp_path):
    result = _run("publish", licensed_out, "me/tiny-nf4", "--dry-run", "--base-model", "org/tiny",
                  "--quantized-by", "Quill Team")
    assert result.exit_code == 0, result.output
    (tmp_path / "README.md").write_text(result.stdout.split("--- README.md ---\n", 1)[1])
    card = ModelCard.load(tmp_path / "README.md")
    data = ModelCardData(**card.data.to_dict())  # the metadata round-trips through huggingface_hub's own class
    assert (data.license, data.license_name, data.license_link) == ("llama3.2", "llama3.2", "LICENSE.txt")
    assert (data.base_model, data.base_model_relation) == ("org/tiny", "quantized")
    assert (data.pipeline_tag, data.library_name, data.quantized_by) == ("text-generation", "transformers", "Quill Team")
    assert data.tags == ["bitsandbytes", "4-bit", "nf4", "qlora-kit"]
    for snippet in ('AutoModelForCausalLM.from_pretrained("me/tiny-nf4", device_map="auto")',
                    'PeftModel.from_pretrained(model, "your-org/your-adapter")',
                    "vllm serve me/tiny-nf4 --quantization bitsandbytes --enable-lora",
                    "qserve serve me/tiny-nf4 --adapter my-adapter=path/to/adapter"):
        assert snippet in card.text
    listed = [line.split("\t")[0].strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert set(LICENSES) <= set(listed)


def _commit_files(hub, repo="me/tiny-nf4", revision="main"):
    files = {}
    for method, path, body in hub.requests:
        if path == f"/api/models/{repo}/commit/{revision}":
            for line in body.splitlines():
                v = json.loads(line)
                if v["key"] == "file":
                    files[v["value"]["path"]] = base64.b64decode(v["value"]["content"])
    return files


def test_upload_carries_the_licence_files(licensed_out, monkeypatch):
    _online(monkeypatch)
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = _run("publish", licensed_out, "me/tiny-nf4")
    assert result.exit_code == 0, result.output
    files = _commit_files(hub)
    for name, text in LICENSES.items():
        assert files[name].decode() == text
    assert ModelCard(files["README.md"].decode()).data.license == "llama3.2"


def test_large_folder_goes_through_the_resumable_upload(licensed_out, monkeypatch):
    _online(monkeypatch)
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = _run("publish", licensed_out, "me/tiny-nf4", "--large-folder-threshold", "1KB")
    assert result.exit_code == 0, result.output
    files = _commit_files(hub)
    assert set(LICENSES) | {"README.md", "model.safetensors"} <= set(files)
    assert files["README.md"] == (licensed_out / "README.md").read_bytes()  # written into the folder first
    assert ModelCard(files["README.md"].decode()).data.license == "llama3.2"


def test_bad_threshold_is_named(tiny_out):
    result = _run("publish", tiny_out, "me/tiny-nf4", "--large-folder-threshold", "big")
    assert result.exit_code == 2 and "--large-folder-threshold 'big': expected a size" in result.stderr
