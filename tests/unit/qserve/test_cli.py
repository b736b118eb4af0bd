"""`qserve serve` start-up checks (issue 13 items 2, 7, 9): a bad key file, allowed root or config.json is one
red line and exit code 2 before the model loads; serving without keys says loudly that everyone is admin."""
import json
import shutil

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
