"""`qserve serve` start-up checks (issue 13 items 2, 7, 9): a bad key file, allowed root or config.json is one
red line and exit code 2 before the model loads; serving without keys says loudly that everyone is admin.
Issue 15: vllm serve's spelling (--port 8000, --served-model-name, --lora-modules, --chat-template) and a
description on every option."""
import json
import shutil

import click
import pytest
from click.testing import CliRunner

from qlora_kit.qserve.cli import main
from tests.unit.models._tiny import write_tiny

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny("llama", tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture
def no_weights(tiny, tmp_path):
    """A checkpoint whose config.json is fine but whose weights are missing: reaching the model load fails
    differently, so an error naming the key file proves it was checked first."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(tiny / "config.json", folder / "config.json")
    return folder


def _serve(*args):
    return CliRunner().invoke(main, ["serve", *map(str, args)], catch_exceptions=False)


def _one_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("qserve: WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_item2_bad_key_file_fails_before_the_model_loads(no_weights, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "sk-123456789", "admin": "false"}]}))
    _one_error(_serve(no_weights, "--api-keys", keys), str(keys), "keys[0].admin='false'", "JSON boolean")


def test_item9_missing_key_file_fails_before_the_model_loads(no_weights, tmp_path):
    _one_error(_serve(no_weights, "--api-keys", tmp_path / "nope.json"), str(tmp_path / "nope.json"),
               "cannot read the API key file")


def test_item9_allowed_root_must_exist(no_weights, tmp_path):
    _one_error(_serve(no_weights, "--allowed-root", tmp_path / "nonexistent"), "allowed_root=",
               "not an existing folder (flag --allowed-root)")


@pytest.mark.parametrize("edit,fragments", [
    (lambda c: c.pop("hidden_size"), ("config.json: missing ['hidden_size']",)),
    (lambda c: c.update(num_attention_heads=0), ("num_attention_heads=0: must be an integer >= 1",)),
    (lambda c: c.update(vocab_size="128"), ("vocab_size='128': must be an integer >= 1",)),
])
def test_item9_config_missing_fields(no_weights, edit, fragments):
    cfg = json.loads((no_weights / "config.json").read_text())
    edit(cfg)
    (no_weights / "config.json").write_text(json.dumps(cfg))
    _one_error(_serve(no_weights), str(no_weights / "config.json"), *fragments)


def test_item7_no_keys_warns_that_everyone_is_admin(no_weights):
    result = _serve(no_weights)  # the tiny checkpoint has no tokenizer.json: refused after the warning
    assert result.stderr.startswith("qserve: WARNING: no --api-keys file: authentication is OFF and every caller "
                                    "is an admin"), result.stderr
    _one_error(result, "tokenizer.json: missing")


def test_item7_startup_adapter_may_not_take_the_base_name(no_weights, tmp_path):
    _one_error(_serve(no_weights, "--adapter", f"ckpt={tmp_path}"), "adapter name 'ckpt': is the served base")


# -- issue 15: vllm serve's spelling ---------------------------------------------------------------------
def test_every_serve_option_has_a_description_and_port_is_8000():
    import re

    from qlora_kit.qserve.cli import serve
    from qlora_kit.qserve.config import ServeConfig

    for p in serve.params:
        if isinstance(p, click.Option) and p.name != "help":
            text = re.sub(r"\[[^\]]*\]", "", p.help or "").strip()  # drop "[default: ..]", "[--backend vllm ..]"
            assert len(text) > 10, f"{p.opts}: {p.help!r}"
    assert ServeConfig("x").port == 8000
    out = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "--served-model-name" in out and "--chat-template" in out and "--lora-modules" in out
    assert "[default: 8000]" in " ".join(out.split())


def test_lora_modules_json_and_name_path_are_read(no_weights, tmp_path):
    ok = json.dumps({"name": "a", "path": str(tmp_path), "base_model_name": "ckpt"})
    # accepted: the run goes on to the tokenizer check (the tiny checkpoint has no tokenizer.json)
    _one_error(_serve(no_weights, "--lora-modules", ok, "--lora-modules", f"b={tmp_path}"), "tokenizer.json: missing")
    bad_base = json.dumps({"name": "a", "path": str(tmp_path), "base_model_name": "meta-llama/Llama-3-8B"})
    _one_error(_serve(no_weights, "--lora-modules", bad_base), "--lora-modules 'a'",
               "base_model_name 'meta-llama/Llama-3-8B' is not the served base ('ckpt')", "--base-name")
    res = _serve(no_weights, "--lora-modules", json.dumps({"name": "a", "path": "p", "rank": 8}))
    assert res.exit_code == 2 and "unknown keys ['rank']" in res.output
    res = _serve(no_weights, "--lora-modules", "no-equals-sign")
    assert res.exit_code == 2 and "expected NAME=PATH" in res.output
    res = _serve(no_weights, "--adapter", f"a={tmp_path}", "--lora-modules", f"a={tmp_path}")
    assert res.exit_code == 2 and "duplicate names" in res.output


def test_served_model_name_is_the_base_name(no_weights, tmp_path):
    _one_error(_serve(no_weights, "--served-model-name", "tea", "--adapter", f"tea={tmp_path}"),
               "adapter name 'tea': is the served base model's name")


def test_chat_template_unreadable_or_invalid_is_one_line_at_startup(no_weights, tmp_path):
    _one_error(_serve(no_weights, "--chat-template", tmp_path), f"chat_template={str(tmp_path)!r}: cannot read the file")
    _one_error(_serve(no_weights, "--chat-template", tmp_path / "nope.jinja"), "no such file, and not a template")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }}\n{% endif %}")
    _one_error(_serve(no_weights, "--chat-template", bad), f"chat_template file {bad}: not a valid jinja2 template",
               "line 2")
    _one_error(_serve(no_weights, "--chat-template", "{{ messages[0].content "), "chat_template: not a valid jinja2")


def test_hub_adapter_loads_are_announced_at_start(no_weights):
    result = _serve(no_weights, "--adapter-hub-allow", "acme/*,globex/support-lora")
    lines = result.stderr.splitlines()
    assert lines[0].startswith("qserve: WARNING: no --api-keys file"), result.stderr
    assert lines[1].startswith("qserve: WARNING: --adapter-hub-allow: a request may make this server download an "
                               "adapter from the Hugging Face Hub repos acme/*, globex/support-lora on first use"), lines
    _one_error(result, "tokenizer.json: missing")
