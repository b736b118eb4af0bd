"""qtrain merge end to end on the tiny chat model: files, config, provenance, re-quantization, and bad input
(one line, exit 2, nothing written). Numerics against PEFT and the runtime: tests/integration/test_qtrain_merge_smollm2.py."""
import hashlib
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from qlora_kit.formats import LoraConfig, spec
from qlora_kit.models import adapter_params, add_adapter, load_model, save_peft_adapter
from qlora_kit.qconvert.cli import main as qconvert
from qlora_kit.trainer.cli import main as qtrain
from tests.hf_cache import offline_hub_cache

pytestmark = pytest.mark.unit
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")  # down_proj left untouched


def _run(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def nf4(tiny_chat, tmp_path_factory):
    from qlora_kit.qconvert.convert import convert

    out = tmp_path_factory.mktemp("merge") / "tiny-nf4"
    convert(str(tiny_chat), out, progress=False)
    return out


@pytest.fixture(scope="module")
def adapter(nf4, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "adapter"
    torch.manual_seed(0)  # module fixtures are set up before the autouse per-test seed
    model = load_model(nf4)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, base_model_name_or_path=str(nf4))
    add_adapter(model, 0, cfg)
    with torch.no_grad():
        for name, p in adapter_params(model, 0).items():
            if ".lora_b." in name:
                p.normal_(0, 0.05)
    save_peft_adapter(model, 0, out, cfg)
    return out


def _metadata(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return f.metadata()


def test_bf16_merge_writes_a_plain_checkpoint_with_provenance(nf4, adapter, tmp_path):
    out = tmp_path / "merged"
    result = _run(qtrain, "merge", "--base", nf4, "--adapter", adapter, "--out", out, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert {"tokenizer.json", "chat_template.jinja", "merge_report.json"} <= {p.name for p in out.iterdir()}
    meta = _metadata(out)
    assert meta[spec.MERGE_FORMAT_KEY] == "bf16" and meta[spec.MERGE_BASE_KEY] == str(nf4)
    assert meta[spec.MERGE_ADAPTER_KEY] == str(adapter)
    assert meta[spec.MERGE_ADAPTER_CONFIG_KEY] == hashlib.sha256((adapter / "adapter_config.json").read_bytes()).hexdigest()
    assert meta[spec.MERGE_BASE_SOURCE_KEY] == _metadata(nf4)["qlora_kit.source"]
    assert report["metadata"].items() <= meta.items() and json.loads((out / "merge_report.json").read_text()) == report
    assert len(report["tensors"]) == 2 * len(TARGETS)  # 2 layers
    assert len(report["logits"]["prompts"]) == 5 and report["logits"]["compute_dtype"] == "float32"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    shown = _run(qconvert, "inspect", out)
    assert f"merged: base={nf4}" in shown.stdout.replace("\n", "") and "format=bf16" in shown.stdout
    assert json.loads(_run(qconvert, "inspect", out, "--json").stdout)["metadata"] == meta  # the whole __metadata__


def test_nf4_merge_requantizes_only_the_adapted_weights(nf4, adapter, tmp_path):
    out = tmp_path / "merged-nf4"
    result = _run(qtrain, "merge", "--base", nf4, "--adapter", adapter, "--out", out, "--format", "nf4", "--quiet")
    assert result.exit_code == 0, result.output
    assert "nf4 merge" in result.stdout and "rel. to update" in result.stdout and "top-1 agree" in result.stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"] == \
        json.loads((nf4 / "config.json").read_text())["quantization_config"]
    with safe_open(str(nf4 / "model.safetensors"), framework="pt") as a, \
            safe_open(str(out / "model.safetensors"), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        down = "model.layers.1.mlp.down_proj.weight"
        assert torch.equal(a.get_tensor(down), b.get_tensor(down))
        assert not torch.equal(a.get_tensor(down.replace("down", "up")), b.get_tensor(down.replace("down", "up")))
    assert _run(qconvert, "verify", out).exit_code == 0
    load_model(out)


def _other_base(adapter, tmp_path):
    other = tmp_path / "other-adapter"
    shutil.copytree(adapter, other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "meta-llama/Llama-3.1-8B"}))
    return other


def _no_weights(adapter, tmp_path):
    bare = tmp_path / "bare-adapter"
    bare.mkdir()
    shutil.copy(adapter / "adapter_config.json", bare)
    return bare


@pytest.mark.parametrize("case, message", [
    ("other_base", "trained for base model 'meta-llama/Llama-3.1-8B'"),
    ("no_weights", "adapter_model.safetensors: missing"),
    ("no_base", "no such folder (and not a Hub repo id"),
    ("bf16_base", "not a 4-bit checkpoint"),
    ("out_exists", "already exists (pass --overwrite"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(nf4, adapter, tiny_chat, tmp_path, case, message):
    base, adp, out = nf4, adapter, tmp_path / "out" / "merged"
    if case == "other_base":
        adp = _other_base(adapter, tmp_path)
    elif case == "no_weights":
        adp = _no_weights(adapter, tmp_path)
    elif case == "no_base":
        base = tmp_path / "missing"
    elif case == "bf16_base":
        base = tiny_chat
    elif case == "out_exists":
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("mine")
    result = _run(qtrain, "merge", "--base", base, "--adapter", adp, "--out", out, "--quiet")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:  # refused before the temporary folder (or even OUT's parent) was made
        assert not out.parent.exists()


def test_format_doc_lists_every_provenance_key():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[4] / "FORMAT.md").read_text()
    documented = set(re.findall(r"^\| `(qlora_kit\.merge\.[a-z0-9_]+)` \|", doc, re.M))
    keys = {v for k, v in vars(spec).items() if k.startswith("MERGE_") and k.endswith("_KEY")}
    assert documented == keys and len(keys) == 7


def test_a_failure_midway_leaves_nothing_behind(nf4, adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "corrupt" / nf4.name  # the adapter's base name still matches
    shutil.copytree(nf4, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"  # sorted after every layer-0 tensor: written ones exist by then
    tensors[f"{name}.quant_map"] = torch.zeros(16)
    save_file(tensors, str(bad / "model.safetensors"), metadata=_metadata(nf4))
    out = tmp_path / "out" / "merged"
    result = _run(qtrain, "merge", "--base", bad, "--adapter", adapter, "--out", out, "--quiet")
    assert result.exit_code == 2 and name in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(out.parent.iterdir()) == []  # neither OUT nor its temporary folder


def test_prompts_compare_dtype_and_no_compare(nf4, adapter, tmp_path):
    args = ("merge", "--base", nf4, "--adapter", adapter, "--quiet")
    shown = _run(qtrain, *args, "--out", tmp_path / "a", "--prompt", "Hello", "--prompt", "[/b] Bye",
                 "--compare-dtype", "bfloat16")
    assert shown.exit_code == 0, shown.output
    assert "[/b] Bye" in shown.stdout and "bfloat16 compute" in shown.stdout  # user text is not rich markup
    mine = json.loads((tmp_path / "a" / "merge_report.json").read_text())["logits"]
    assert [p["prompt"] for p in mine["prompts"]] == ["Hello", "[/b] Bye"] and mine["compute_dtype"] == "bfloat16"
    assert json.loads(_run(qtrain, *args, "--json", "--out", tmp_path / "b", "--no-compare").stdout)["logits"] is None


def test_a_hub_id_base_from_the_offline_cache(nf4, adapter, tmp_path, monkeypatch):
    """--base org/name resolves to the cached snapshot (HF_HUB_OFFLINE); an adapter trained with that id as its base
    passes the base check, and the provenance names the id, not the cache path."""
    offline_hub_cache(monkeypatch, tmp_path, "org/tiny-nf4", nf4)
    hub_adapter = tmp_path / "hub-adapter"
    shutil.copytree(adapter, hub_adapter)
    config = json.loads((hub_adapter / "adapter_config.json").read_text())
    (hub_adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/tiny-nf4"}))
    out = tmp_path / "merged"
    result = _run(qtrain, "merge", "--base", "org/tiny-nf4", "--adapter", hub_adapter, "--out", out, "--no-compare",
                  "--quiet")
    assert result.exit_code == 0, result.output
    assert _metadata(out)[spec.MERGE_BASE_KEY] == "org/tiny-nf4"
    missing = _run(qtrain, "merge", "--base", "org/absent", "--adapter", hub_adapter, "--out", tmp_path / "m2")
    assert missing.exit_code == 2 and "not in the Hugging Face cache" in missing.stderr
    assert not (tmp_path / "m2").exists()
