"""AdapterStore: names resolve inside the store only (lstat + readlink, links followed only while they stay
inside), unknown and malformed names cost nothing; the registry registers store adapters on first lookup."""
import os

import pytest

from qlora_kit.qserve.adapters import AdapterRegistry, RegistryConfig
from qlora_kit.qserve.errors import AdapterPathRefused
from qlora_kit.qserve.store import AdapterStore

pytestmark = pytest.mark.unit


def fake_adapter(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    fake_adapter(root / "plain")
    fake_adapter(root / "acme" / "support-v2")
    fake_adapter(tmp_path / "outside")
    os.symlink("acme/support-v2", root / "alias")  # stays inside: followed
    os.symlink(tmp_path / "outside", root / "escape")  # leads out: refused
    os.symlink("../outside", root / "escape-rel")
    fake_adapter(root / "filelink")
    (root / "filelink" / "adapter_model.safetensors").unlink()
    os.symlink(tmp_path / "outside" / "adapter_model.safetensors", root / "filelink" / "adapter_model.safetensors")
    return AdapterStore(root)


def test_resolves_inside_the_store(store):
    assert str(store.resolve("plain")) == os.path.join(store.root, "plain")
    assert str(store.resolve("acme/support-v2")) == os.path.join(store.root, "acme", "support-v2")
    assert str(store.resolve("alias")) == os.path.join(store.root, "acme", "support-v2")
    assert store.resolve("missing") is None and store.resolve("acme/missing") is None
    assert store.resolve("acme") is not None  # a folder; the registry then refuses it for its missing files


@pytest.mark.parametrize("name", ["", "../outside", "acme/../../outside", "/etc", ".hidden", "acme//x", "a\x00b",
                                  "acme/.", "x" * 200, 7])
def test_malformed_names_cost_no_disk_access(store, name):
    assert store.resolve(name) is None and store.probes == 0


@pytest.mark.parametrize("name,needle", [("escape", ".*store/escape links to .*outside, outside the store"),
                                         ("escape-rel", "a link in the store leads outside it"),
                                         ("filelink", ".*filelink/adapter_model.safetensors links to .*outside/adapter_model.safetensors, outside")])
def test_links_out_of_the_store_are_refused(store, name, needle):
    with pytest.raises(AdapterPathRefused, match=f"adapter {name!r}: " + needle):
        store.resolve(name)


def test_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match="adapter_store=.*: not an existing folder"):
        AdapterStore(tmp_path / "nope")


def test_registry_lookup_registers_from_the_store_and_counts_reads(store):
    reg = AdapterRegistry(RegistryConfig(max_loras=1), lambda n, p: (p, 10), store=store)
    assert not reg.lookup("missing") and "missing" not in reg
    assert reg.lookup("acme/support-v2") and reg.get("acme/support-v2").state.value == "disk"
    assert store.total_reads == 0  # registered, not read
    reg.acquire("acme/support-v2")
    assert reg.pending_loads() == ["acme/support-v2"]
    reg.load("acme/support-v2")
    assert store.reads == {"acme/support-v2": 1} and reg.get("acme/support-v2").tier == "host"
    assert reg.stats.snapshot()["requests"]["store"] == 1 and reg.stats.loads["host"] == 1
    with pytest.raises(AdapterPathRefused, match="adapter_config.json missing"):
        reg.lookup("acme")  # a folder of the store, but not an adapter
