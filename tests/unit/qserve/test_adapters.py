"""AdapterRegistry: tiers, LRU over resident slots, draining, memory accounting and path safety.

Adapter folders are real files under tmp_path; the loader is a fake that records its calls.
"""
import os
import threading

import pytest

from qlora_kit.qserve.adapter_entry import AdapterState
from qlora_kit.qserve.adapters import AdapterRegistry, RegistryConfig
from qlora_kit.qserve.errors import AdapterExists, AdapterNotFound, AdapterPathRefused, AdapterRefused

pytestmark = pytest.mark.unit


def make_adapter(folder, weights="adapter_model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}')
    (folder / weights).write_bytes(b"\0" * 16)
    return folder


class FakeLoader:
    def __init__(self, sizes=None):
        self.calls, self.sizes = [], sizes or {}

    def __call__(self, name, path):
        self.calls.append((name, path))
        return f"payload:{name}", self.sizes.get(name, 100)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "adapters"
    for n in ("a", "b", "c", "d"):
        make_adapter(r / n)
    return r


def registry(root, loader=None, events=None, **cfg):
    cfg.setdefault("max_loras", 2)
    events = events if events is not None else []
    return AdapterRegistry(RegistryConfig(allowed_root=str(root), **cfg), loader or FakeLoader(),
                           on_resident=lambda n, p, s: events.append(("in", n, p, s)),
                           on_remove=lambda n, s: events.append(("out", n, s)))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="max_loras=0: must be an integer >= 1"):
        RegistryConfig(max_loras=0)
    with pytest.raises(ValueError, match="max_cpu_loras=1: must be >= max_loras=2"):
        RegistryConfig(max_loras=2, max_cpu_loras=1)
    with pytest.raises(ValueError, match="cpu_budget_bytes=0: must be a positive integer"):
        RegistryConfig(cpu_budget_bytes=0)
    with pytest.raises(ValueError, match="not an existing folder"):
        RegistryConfig(allowed_root=str(tmp_path / "nope"))


def test_add_loads_with_real_path(root):
    loader = FakeLoader()
    reg = registry(root, loader)
    info = reg.add("a", "a")  # relative to the root
    assert info.state is AdapterState.CPU and info.nbytes == 100 and info.path == os.path.realpath(root / "a")
    assert loader.calls == [("a", os.path.realpath(root / "a"))]
    assert reg.load("a").state is AdapterState.CPU and len(loader.calls) == 1  # idempotent
    assert "a" in reg and "zzz" not in reg
    assert [i.name for i in reg.list()] == ["a"]


def test_unknown_and_duplicate_and_bad_name(root):
    reg = registry(root)
    with pytest.raises(AdapterNotFound, match="adapter 'nope': is not loaded"):
        reg.acquire("nope")
    with pytest.raises(AdapterNotFound, match="adapter 'nope': not registered"):
        reg.ensure_resident("nope")
    reg.add("a", str(root / "a"))
    with pytest.raises(AdapterExists, match="adapter 'a': already registered; unload it first"):
        reg.register("a", str(root / "b"))
    with pytest.raises(AdapterRefused, match=r"adapter name '\.\./x': use 1-128 letters"):
        reg.register("../x", str(root / "b"))


def test_lru_eviction_skips_running(root):
    events = []
    reg = registry(root, events=events)
    for n in "abc":
        reg.add(n, n)
    assert reg.ensure_resident("a") == 0 and reg.ensure_resident("b") == 1
    reg.ensure_resident("a")  # touch a: b is now least recently used
    assert reg.ensure_resident("c") == 1 and reg.get("b").state is AdapterState.CPU
    assert ("in", "c", "payload:c", 1) in events
    assert not [e for e in events if e[0] == "out"]  # an LRU-evicted slot keeps its weights for the next install
    reg.pin("a"), reg.pin("c")
    assert reg.ensure_resident("b") is None  # both slots serve running requests: wait
    reg.unpin("a")
    assert reg.ensure_resident("b") == 0 and reg.get("a").slot == -1
    assert reg.evictions == 2


def test_draining_unload(root):
    events = []
    reg = registry(root, events=events)
    reg.add("a", "a")
    uid = reg.acquire("a")
    assert reg.ensure_resident("a") == 0
    reg.pin("a")
    assert reg.unload("a") is False and reg.get("a").draining
    assert "a" not in reg
    with pytest.raises(AdapterNotFound, match="adapter 'a': is being unloaded"):
        reg.acquire("a")
    with pytest.raises(AdapterNotFound, match="adapter 'a': is being unloaded"):
        reg.unload("a")
    with pytest.raises(AdapterExists, match="already being unloaded"):
        reg.register("a", "a")
    assert reg.ensure_resident("a") == 0  # its own requests keep running
    reg.unpin("a")
    reg.release("a")
    with pytest.raises(AdapterNotFound, match="is not loaded"):
        reg.get("a")
    assert reg.memory_report()["resident"]["free_slots"] == 2
    assert events == [("in", "a", "payload:a", 0), ("out", "a", 0)]  # unloaded for good: its slot is cleared
    assert reg.add("a", "a").uid != uid  # a new load never shares the old uid (prefix-cache salt)


def test_unload_idle_is_immediate_and_refcount_misuse(root):
    reg = registry(root)
    reg.add("a", "a")
    assert reg.unload("a") is True and "a" not in reg
    reg.add("b", "b")
    with pytest.raises(RuntimeError, match="release without acquire"):
        reg.release("b")
    with pytest.raises(RuntimeError, match="pin while cpu"):
        reg.pin("b")


def test_loader_failure_is_refused_and_unregistered(root):
    def broken(name, path):
        raise OSError("disk on fire")

    reg = registry(root, broken)
    with pytest.raises(AdapterRefused, match="adapter 'a': disk on fire"):
        reg.add("a", "a")
    assert "a" not in reg

    def lying(name, path):
        return object(), -5

    with pytest.raises(AdapterRefused, match="loader reported nbytes=-5"):
        registry(root, lying).add("a", "a")


def test_cpu_tier_lru_and_pending_loads(root):
    loader = FakeLoader()
    reg = registry(root, loader, max_loras=1, max_cpu_loras=2)
    reg.add("a", "a"), reg.add("b", "b")
    reg.add("c", "c")  # a (LRU, idle) drops back to disk
    assert reg.get("a").state is AdapterState.DISK
    reg.acquire("a")
    assert reg.ensure_resident("a") is None and reg.pending_loads() == ["a"]
    reg.acquire("c")
    reg.load("a")  # b is the idle one now
    assert reg.get("b").state is AdapterState.DISK and reg.pending_loads() == []
    assert reg.ensure_resident("a") == 0
    reg.acquire("b")
    reg.pin("a")  # a runs; c's request only waits
    reg.load("b")  # so c is dropped (read again when its request is admitted); a, running, never is
    assert reg.get("c").state is AdapterState.DISK and reg.get("a").state is AdapterState.RESIDENT
    assert reg.pending_loads() == ["c"] and reg.stats.evictions["host"] == 3


def test_cpu_tier_refuses_when_all_held_run(root):
    reg = registry(root, FakeLoader(), max_loras=1, max_cpu_loras=1)
    reg.add("a", "a")
    reg.acquire("a"), reg.ensure_resident("a"), reg.pin("a")
    reg.register("b", "b"), reg.acquire("b")
    with pytest.raises(AdapterRefused, match="do not fit the CPU tier .* while the adapters held there are in "
                                             "running batches"):
        reg.load("b")
    assert reg.get("b").state is AdapterState.DISK and reg.get("a").state is AdapterState.RESIDENT


def test_memory_report_and_budgets(root):
    loader = FakeLoader({"a": 100, "b": 300, "c": 700})
    reg = registry(root, loader, max_loras=3, resident_budget_bytes=1000, cpu_budget_bytes=2000)
    reg.add("a", "a"), reg.add("b", "b")
    reg.ensure_resident("a"), reg.ensure_resident("b")
    rep = reg.memory_report()
    assert rep["adapters"]["b"] == {"state": "resident", "bytes": 300, "slot": 1}
    assert rep["resident"]["used_bytes"] == 400 and rep["resident"]["free_slots"] == 1
    assert rep["resident"]["more_fit"] == 1  # min(1 free slot, 600 bytes // mean 200)
    assert rep["cpu"]["used_bytes"] == 400 and rep["cpu"]["more_fit"] == 8  # 1600 // 200
    reg.add("c", "c")
    reg.pin("b")
    assert reg.ensure_resident("c") == 0 and reg.get("a").slot == -1  # 1000-byte budget: a (unpinned) makes room
    big = FakeLoader({"d": 5000})
    with pytest.raises(AdapterRefused, match="adapter 'd': 5000 bytes exceed resident_budget_bytes=1000"):
        registry(root, big, resident_budget_bytes=1000).add("d", "d")


def test_concurrent_load_calls_loader_once(root):
    gate, loader = threading.Event(), FakeLoader()

    def slow(name, path):
        gate.wait(5)
        return loader(name, path)

    reg = registry(root, slow)
    reg.register("a", "a")
    threads = [threading.Thread(target=reg.load, args=("a",)) for _ in range(3)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert len(loader.calls) == 1 and reg.get("a").state is AdapterState.CPU


def test_unload_while_loading(root):
    gate = threading.Event()
    reg = registry(root, lambda n, p: (gate.wait(5), 10))
    reg.register("a", "a")
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(AdapterNotFound, reg.load, "a")))
    t.start()
    while reg.get("a").state is not AdapterState.LOADING:
        pass
    assert reg.unload("a") is True
    gate.set()
    t.join(5)
    assert errors and "was unloaded while loading" in str(errors[0].value)


# -- path safety -------------------------------------------------------------------------------------------
def test_path_traversal_refused(root):
    reg = registry(root)
    with pytest.raises(AdapterPathRefused, match=r"adapter path '\.\./outside': '\.\.' is not allowed"):
        reg.register("x", "../outside")
    with pytest.raises(AdapterPathRefused, match="'..' is not allowed"):
        reg.register("x", str(root / "a" / ".." / "b"))


def test_absolute_path_outside_root_refused(root, tmp_path):
    outside = make_adapter(tmp_path / "outside")
    with pytest.raises(AdapterPathRefused, match=f"resolves to {outside}, outside the allowed root"):
        registry(root).register("x", str(outside))


def test_symlinked_folder_escaping_refused(root, tmp_path):
    outside = make_adapter(tmp_path / "outside")
    os.symlink(outside, root / "sneaky")
    with pytest.raises(AdapterPathRefused, match="'sneaky': resolves to .*outside the allowed root"):
        registry(root).register("x", "sneaky")


def test_symlinked_weights_escaping_refused(root, tmp_path):
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"x")
    folder = root / "linky"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    os.symlink(secret, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterPathRefused, match="adapter_model.safetensors links outside the allowed root"):
        registry(root).register("x", "linky")


def test_symlink_inside_root_allowed(root):
    os.symlink(root / "a", root / "alias")
    assert registry(root).register("x", "alias").path == os.path.realpath(root / "a")


def test_pickle_only_refused(root):
    make_adapter(root / "pickled", weights="adapter_model.bin")
    with pytest.raises(AdapterPathRefused, match="adapter_model.safetensors missing \\(adapter_model.bin is pickle"):
        registry(root).register("x", "pickled")


def test_missing_files_and_not_folder(root):
    (root / "empty").mkdir()
    with pytest.raises(AdapterPathRefused, match="'empty': adapter_config.json missing"):
        registry(root).register("x", "empty")
    (root / "file").write_text("x")
    with pytest.raises(AdapterPathRefused, match="'file': not a folder"):
        registry(root).register("x", "file")
    with pytest.raises(AdapterPathRefused, match="empty or contains NUL"):
        registry(root).register("x", "a\x00b")


def test_no_root_refuses_untrusted_but_trusted_ok(tmp_path):
    folder = make_adapter(tmp_path / "ops" / "a")
    reg = AdapterRegistry(RegistryConfig(max_loras=1), FakeLoader())
    with pytest.raises(AdapterPathRefused, match="loading by path is disabled"):
        reg.register("a", str(folder))
    assert reg.add("a", str(folder), trusted=True).state is AdapterState.CPU


def test_folder_swapped_after_register_is_rechecked(root, tmp_path):
    reg = registry(root)
    reg.register("a", "a")
    os.remove(root / "a" / "adapter_model.safetensors")
    with pytest.raises(AdapterPathRefused, match="adapter_model.safetensors missing"):
        reg.load("a")
    assert reg.get("a").state is AdapterState.DISK
