"""_cli/hub.py: the one checkpoint resolver (folder, Hub id from a pre-filled cache, offline refusal) and the
licence/notice files a converted model carries."""
import pytest

from qlora_kit._cli.hub import (MAX_LICENSE_BYTES, MAX_LICENSE_FILES, CheckpointNotFound, is_hub_id, license_files,
                                resolve_checkpoint)
from tests.hf_cache import offline_hub_cache

pytestmark = pytest.mark.unit
SHA = "b" * 40


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding org/model at SHA (refs/main), in offline mode."""
    snap = offline_hub_cache(monkeypatch, tmp_path, "org/model", sha=SHA)
    (snap / "config.json").write_text("{}")
    return snap


def test_a_folder_is_used_as_is(tmp_path):
    assert resolve_checkpoint(tmp_path) == tmp_path and not is_hub_id(str(tmp_path))


def test_a_hub_id_resolves_to_its_cached_snapshot_offline(cache):
    assert is_hub_id("org/model")
    assert resolve_checkpoint("org/model") == cache


@pytest.mark.parametrize("src,message", [
    ("org/missing", "org/missing: not a local folder, and HF_HUB_OFFLINE=1 but it is not in the Hugging Face cache"),
    ("./nope", "./nope: no such folder (and not a Hub repo id such as org/name)"),
    ("a/b/c", "a/b/c: no such folder (and not a Hub repo id such as org/name)"),
])
def test_unresolvable_sources_are_named(cache, src, message):
    with pytest.raises(CheckpointNotFound) as e:
        resolve_checkpoint(src)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointNotFound, match="f: is a file; expected a checkpoint folder or a Hub repo id"):
        resolve_checkpoint(tmp_path / "f")


def test_licence_files_any_case_and_nothing_else(tmp_path):
    for name in ("LICENSE", "license.md", "Licence.txt", "NOTICE", "USE_POLICY.md", "COPYING", "README.md",
                 "config.json", "LICENSES_NOT_A_FOLDER"):
        (tmp_path / name).write_text(name)
    (tmp_path / "LICENSE_DIR").mkdir()
    assert [p.name for p in license_files(tmp_path)] == ["COPYING", "LICENSE", "LICENSES_NOT_A_FOLDER", "Licence.txt",
                                                          "NOTICE", "USE_POLICY.md", "license.md"]


def test_licence_files_are_bounded(tmp_path):
    (tmp_path / "LICENSE").write_bytes(b"x" * (MAX_LICENSE_BYTES + 1))
    with pytest.raises(CheckpointNotFound, match="LICENSE: .* bytes is too large for a licence/notice file"):
        license_files(tmp_path)
    (tmp_path / "LICENSE").unlink()
    for i in range(MAX_LICENSE_FILES + 1):
        (tmp_path / f"NOTICE{i}").write_text("n")
    with pytest.raises(CheckpointNotFound, match=f"{MAX_LICENSE_FILES + 1} licence/notice files"):
        license_files(tmp_path)


def test_a_cached_repo_with_only_pytorch_bin_weights_resolves(cache):
    """The safetensors-first fetch falls back to the .bin patterns when the snapshot has no safetensors."""
    (cache / "pytorch_model.bin").write_bytes(b"")
    assert resolve_checkpoint("org/model") == cache
