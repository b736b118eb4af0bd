"""Adapters named by Hub repo id (--adapter-hub-allow), from a Hugging Face cache filled by the test in offline mode
(tests/hf_cache.py), over real HTTP on the tiny model: an allowed id is served on first request with the output of
the same adapter loaded from a folder; names off the allow-list (404) and names the tenant may not use (403) cost
no Hub call; a pickle-only cached repo is refused in one line; a store folder of the same name wins; /metrics tells
Hub loads (tier and source "hub") from store loads."""
import json
import shutil

import httpx
import huggingface_hub
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qlora_kit.qserve.config import ServeConfig
from qlora_kit.qserve.engine.engine import Engine
from qlora_kit.qserve.server import start
from qlora_kit.qserve.store import HubSource
from qlora_kit.qserve.store.hub import compile_allow, parse_hub_id
from tests.hf_cache import offline_hub_cache

from .._tiny_serve import CharTokenizer, make_adapter, tiny_model

pytestmark = pytest.mark.unit
ADMIN, ACME, GLOBEX = "sk-admin-123", "sk-acme-1234", "sk-globex-12"
PROMPT = {"prompt": [3, 1, 4, 1, 5], "max_tokens": 6, "temperature": 0}


def test_hub_id_syntax():
    assert parse_hub_id("acme/support-lora") == ("acme/support-lora", None)
    assert parse_hub_id("acme/support-lora@v1.2") == ("acme/support-lora", "v1.2")
    assert parse_hub_id("acme/x@" + "a" * 40) == ("acme/x", "a" * 40)
    for bad in ("support-lora", "acme/x/y", "../x", "acme/../x", "acme/x@", "acme/x@refs/pr/1", "acme/a--b",
                "-acme/x", "acme/x y", "acmé/x", "a" * 97 + "/x", 7):
        assert parse_hub_id(bad) is None, bad


def test_allow_list_patterns():
    hub = HubSource(("acme/*", "globex/support-*", "initech/a.b"))
    allowed = ["acme/x", "acme/support-lora", "globex/support-v2", "initech/a.b"]
    refused = ["acme2/x", "xacme/x", "globex/other", "globex/support", "initech/aXb", "other/acme"]
    assert [hub.allows(r) for r in allowed] == [True] * 4
    assert [hub.allows(r) for r in refused] == [False] * 6
    assert hub.resolve("acme2/x") is None and hub.resolve("not-a-hub-id") is None and hub.total_fetches == 0


@pytest.mark.parametrize("entry", ["*/*", "*", "acme", "acme/", "acme/x/y", "ac*me/x", "acme/(x|y)", "acme/../x"])
def test_malformed_allow_entries_are_one_line_errors_naming_the_flag(entry):
    with pytest.raises(ValueError) as e:
        ServeConfig("ckpt", adapter_hub_allow=(entry,))
    msg = str(e.value)
    assert msg.startswith(f"adapter_hub_allow entry {entry!r}: expected ORG/NAME or a pattern such as ORG/*")
    assert msg.endswith("(flag --adapter-hub-allow)") and "\n" not in msg
    compile_allow(("acme/*",))  # the valid form passes
    assert ServeConfig("ckpt").adapter_hub_allow == ()  # off by default


def test_serve_help_and_a_bad_entry_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from qlora_kit.qserve.cli import main

    out = " ".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())
    assert "--adapter-hub-allow" in out and "a --adapter-store folder of the same name wins" in out
    res = CliRunner().invoke(main, ["serve", str(tmp_path), "--adapter-hub-allow", "acme/*,*/*"])
    assert res.exit_code == 2 and "adapter_hub_allow entry '*/*'" in res.output
    assert "(flag --adapter-hub-allow)" in " ".join(res.output.split())


def test_a_local_folder_named_like_the_id_is_never_used(tmp_path, monkeypatch):
    """The Hub source never takes a request's name as a path (resolve_checkpoint would use ./acme/x as is)."""
    from qlora_kit.qserve.errors import AdapterNotFound

    make = tmp_path / "acme" / "x"
    make.mkdir(parents=True)
    (make / "adapter_config.json").write_text("{}")
    offline_hub_cache(monkeypatch, tmp_path / "hf", "acme/other")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AdapterNotFound, match=r"^adapter 'acme/x': acme/x: not a local folder, and HF_HUB_OFFLINE=1"):
        HubSource(("acme/*",)).resolve("acme/x")


def test_the_per_name_fetch_record_keeps_only_the_names_fetched_last(tmp_path, monkeypatch):
    """`fetches` holds at most MEMO_MAX names, oldest forgotten first, so a long-running server fed ever new Hub
    names keeps a bounded record; total_fetches still counts every Hub call."""
    import qlora_kit.qserve.store.hub as hub_module
    from qlora_kit.qserve.errors import AdapterNotFound

    monkeypatch.setattr(hub_module, "MEMO_MAX", 3)
    offline_hub_cache(monkeypatch, tmp_path / "hf", "acme/cached")  # offline: every other name fails to fetch
    hub = HubSource(("acme/*",))

    def ask(name):
        with pytest.raises(AdapterNotFound, match="not in the Hugging Face cache"):
            hub.resolve(name)

    for i in range(5):
        ask(f"acme/n{i}")
    assert hub.fetches == {"acme/n2": 1, "acme/n3": 1, "acme/n4": 1} and hub.total_fetches == 5
    ask("acme/n4")  # remembered: no Hub call
    assert hub.total_fetches == 5
    monkeypatch.setattr(hub_module, "MEMO_TTL_S", 0.0)  # outcomes expire at once: each lookup calls the Hub
    ask("acme/n3")
    ask("acme/n0")
    assert list(hub.fetches.items()) == [("acme/n4", 1), ("acme/n3", 2), ("acme/n0", 1)]
    assert hub.total_fetches == 7 and len(hub._memo) == 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    folder, model = tiny_model(root)
    a = make_adapter(model, root / "made" / "a", 4, 21)
    b = make_adapter(model, root / "made" / "b", 4, 22)
    store = root / "store"
    shutil.copytree(a, store / "acme-local")
    shutil.copytree(b, store / "acme-metered")
    shutil.copytree(b, store / "acme" / "shadowed")  # the store's acme/shadowed (b) wins over the Hub's (a)
    pickled = root / "made" / "pickled"
    pickled.mkdir()
    shutil.copy(a / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle: never read")
    mp = pytest.MonkeyPatch()
    cache = root / "hf"
    for repo, src in (("acme/support-lora", a), ("acme/shadowed", a), ("acme/pickled", pickled), ("globex/y", a),
                      ("acme/metered", a)):
        offline_hub_cache(mp, cache, repo, src)
    calls = []
    real = huggingface_hub.snapshot_download

    def counted(*args, **kwargs):  # the real download function, counted
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    mp.setattr(huggingface_hub, "snapshot_download", counted)
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": ADMIN, "admin": True},
                                         {"key": ACME, "adapters": ["acme-*", "acme/*"]},
                                         {"key": GLOBEX, "adapters": ["globex*"]}]}))
    cfg = ServeConfig(str(folder), api_keys=str(keys), adapter_store=str(store), adapter_hub_allow=("acme/*",),
                      max_loras=2, max_model_len=64, kv_cache_tokens=4096, block_size=4, max_tokens_limit=32, port=0)
    handle = start(cfg, Engine(model, CharTokenizer(), cfg, base_names=("llama",)).start())
    handle.calls, handle.cache = calls, cache
    yield handle
    handle.stop()
    mp.undo()


def _post(server, model, key):
    return httpx.post(server.url + "/v1/completions", json={"model": model, **PROMPT},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _text(reply) -> str:
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def test_allowed_hub_id_is_served_on_first_request_like_the_folder(server):
    reg = server.engine.registry
    assert "acme/support-lora" not in reg and reg.hub.total_fetches == 0
    hub_text = _text(_post(server, "acme/support-lora", ACME))
    assert hub_text == _text(_post(server, "acme-local", ACME)) != _text(_post(server, "llama", ACME))
    assert len(hub_text) == 6
    assert reg.hub.fetches == {"acme/support-lora": 1} and len(server.calls) == 1
    args, kwargs = server.calls[0]
    assert args == ("acme/support-lora",) and sorted(kwargs["allow_patterns"]) == ["adapter_config.json",
                                                                                    "adapter_model.safetensors"]
    info = next(a for a in reg.list() if a.name == "acme/support-lora")
    assert info.path.startswith(str((server.cache / "hub" / "models--acme--support-lora").resolve()))
    assert _text(_post(server, "acme/support-lora", ACME)) == hub_text and len(server.calls) == 1  # fetched once
    assert _text(_post(server, "acme/support-lora@main", ACME)) == hub_text  # a revision: its own name
    r = _post(server, "acme/support-lora@v9", ACME)  # offline, that revision is not cached
    assert r.status_code == 404 and "HF_HUB_OFFLINE=1 but it is not in the Hugging Face cache" in \
        r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]
    calls = len(server.calls)
    for _ in range(3):  # a failed name is answered from memory for MEMO_TTL_S: no Hub call per request
        again = _post(server, "acme/support-lora@v9", ACME)
        assert again.status_code == 404 and again.json() == r.json()
    assert len(server.calls) == calls and server.engine.registry.hub.fetches["acme/support-lora@v9"] == 1


def test_names_off_the_allow_list_are_404_without_hub_access(server):
    calls, fetches = len(server.calls), server.engine.registry.hub.total_fetches
    for name in ("globex/y", "acme2/x", "acme/../etc", "acme/x@refs/pr/1"):  # globex/y is even cached
        r = _post(server, name, ADMIN)
        assert r.status_code == 404 and "no such model or adapter" in r.json()["error"]["message"], name
    assert (len(server.calls), server.engine.registry.hub.total_fetches) == (calls, fetches)
    assert "globex/y" not in server.engine.registry


def test_a_name_the_tenant_may_not_use_is_403_without_hub_access(server):
    calls = len(server.calls)
    r = _post(server, "acme/never-fetched", GLOBEX)
    assert r.status_code == 403 and "may not use adapter 'acme/never-fetched'" in r.json()["error"]["message"]
    assert len(server.calls) == calls and server.engine.registry.hub.fetches["acme/never-fetched"] == 0


def test_a_pickle_only_hub_adapter_is_refused_in_one_line(server):
    r = _post(server, "acme/pickled", ACME)
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "\n" not in msg
    assert "adapter_model.safetensors missing (adapter_model.bin is pickle and is refused" in msg
    assert "acme/pickled" not in server.engine.registry


def test_a_store_folder_wins_over_the_hub_id_of_the_same_name(server):
    calls = len(server.calls)
    text = _text(_post(server, "acme/shadowed", ACME))
    info = next(a for a in server.engine.registry.list() if a.name == "acme/shadowed")
    assert info.path == str(server.engine.registry.store.root) + "/acme/shadowed" and len(server.calls) == calls
    assert text != _text(_post(server, "acme/support-lora", ACME))  # b, not the Hub's a


def _adapter_samples(server) -> dict[tuple[str, str], float]:
    """/metrics' adapter tier and load samples, keyed (sample name, tier or source label)."""
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    names = ("qserve:adapter_requests_total", "qserve:adapter_loads_total", "qserve:adapter_load_seconds_count",
             "qserve:adapter_load_failures_total")
    return {(s.name, s.labels.get("tier") or s.labels["source"]): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples if s.name in names}


def test_metrics_tell_hub_loads_from_store_loads(server):
    """A Hub adapter waits on disk in the `hub` tier, and its request and read count under tier/source "hub"; a store
    adapter's under "store". Both load sources' series are there before any load of theirs."""
    before = _adapter_samples(server)
    assert {("qserve:adapter_load_seconds_count", "hub"), ("qserve:adapter_load_failures_total", "hub"),
            ("qserve:adapter_requests_total", "hub")} <= set(before)
    reg = server.engine.registry
    assert reg.lookup("acme/metered") and reg.tier("acme/metered") == "hub"  # registered, not read yet
    rows = httpx.get(server.url + "/v1/adapters", headers={"Authorization": f"Bearer {ADMIN}"}).json()["adapters"]
    assert next(r for r in rows if r["name"] == "acme/metered")["tier"] == "hub"
    assert _text(_post(server, "acme/metered", ACME)) != _text(_post(server, "acme-metered", ACME))  # a, b
    assert reg.get("acme/metered").source == "hub" and reg.get("acme-metered").source == "store"
    after = _adapter_samples(server)
    delta = {k: v - before[k] for k, v in after.items() if v != before[k]}
    assert delta == {("qserve:adapter_requests_total", "hub"): 1, ("qserve:adapter_requests_total", "store"): 1,
                     ("qserve:adapter_loads_total", "host"): 2, ("qserve:adapter_loads_total", "resident"): 2,
                     ("qserve:adapter_load_seconds_count", "hub"): 1, ("qserve:adapter_load_seconds_count", "store"): 1}, \
        delta
