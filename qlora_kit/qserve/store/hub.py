"""Adapters named by a Hugging Face Hub repo id, fetched on a request's first use when the operator allows them
(--adapter-hub-allow; off by default, as vLLM's Hub LoRA resolver, which takes an explicit repo list).

A request's `model` may be `ORG/NAME` or `ORG/NAME@REVISION` (a branch, tag or commit without `/`). Nothing
reaches the Hub until the name passes, in this order: the tenant check (the app, before any lookup), the adapter
store (a folder DIR/ORG/NAME of --adapter-store wins over the Hub id: one namespace, store first), the name's
syntax (ORG and NAME: letters, digits and `_.-`, starting with a letter or digit, no `..` or `--`, 96 characters
at most each; REVISION the same, 64 at most) and the allow-list. Allow-list entries are repo ids, or patterns in
which `*` stands for any run of characters other than `/` (`acme/*`, `acme/support-*`); the owner must be named
(no `*` in ORG). They are matched against the repo id (not the revision) with formats/_pattern.py's
backtracking-free FullMatch. Any revision of an allowed repo is allowed.

An allowed id is fetched by qlora_kit._cli.hub.fetch_snapshot (the project's one Hub resolver: the Hugging Face
cache, HF_HUB_OFFLINE=1 honoured, HF_TOKEN / the saved login), and only adapter_config.json and
adapter_model.safetensors are requested: a pickled adapter_model.bin is never downloaded, and one already in a
cached snapshot is refused by the registry's path checks like a store's. The snapshot is then confined to its repo
folder in the cache (models--ORG--NAME/, whose blobs/ its files link to) and validated by the registry's loader
exactly as a store adapter (safetensors only, base check). Concurrent first lookups of one name share one fetch, and
its outcome (the snapshot folder, or why it failed: not on the Hub, offline and not cached) is answered from memory
for MEMO_TTL_S seconds (at most MEMO_MAX names, oldest forgotten first): a request arriving just after the fetch,
before the registry has the adapter, does not fetch again, and a client repeating a failing name cannot make the
server call the Hub per request. `fetches` counts Hub calls per name (the MEMO_MAX names fetched last, so a
long-running server's record stays bounded) and `total_fetches` all of them, so tests can show that refused names
cost none. Plain Python (no torch).
"""
import os
import re
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path

from qlora_kit.formats._pattern import FullMatch

from ..adapter_folder import CONFIG_NAME, WEIGHTS_NAME
from ..errors import AdapterNotFound

FILES = [CONFIG_NAME, WEIGHTS_NAME]  # the only files a Hub fetch requests
FLAG = "--adapter-hub-allow"
_PART = r"[A-Za-z0-9][\w.-]{0,95}"
_ID = re.compile(rf"({_PART}/{_PART})(?:@([A-Za-z0-9][\w.-]{{0,63}}))?", re.ASCII)
MEMO_TTL_S, MEMO_MAX = 60.0, 4096
_ENTRY = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.*-]{1,96}", re.ASCII)


def parse_hub_id(name: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of `ORG/NAME[@REVISION]`, or None when `name` is not one (no Hub access)."""
    m = _ID.fullmatch(name) if isinstance(name, str) else None
    if m is None or ".." in name or "--" in m.group(1):
        return None
    return m.group(1), m.group(2)


def compile_allow(entries: tuple[str, ...]) -> list[FullMatch]:
    """One matcher per allow-list entry (see the module docstring).

    Raises:
        ValueError naming the entry and the flag.
    """
    out = []
    for entry in entries:
        if not isinstance(entry, str) or not _ENTRY.fullmatch(entry) or ".." in entry:
            raise ValueError(f"adapter_hub_allow entry {entry!r}: expected ORG/NAME or a pattern such as ORG/* "
                             f"(letters, digits, _.- and * in NAME only) (flag {FLAG})")
        out.append(FullMatch("".join("[^/]*" if c == "*" else "\\" + c if c in ".-" else c for c in entry)))
    return out


class HubSource:
    """Hub repo ids allowed by `allow`, resolved to snapshot folders in the HF cache. Thread-safe.

    Args:
        allow: allow-list entries (non-empty).

    Raises:
        ValueError for a malformed entry or an empty list.
    """

    def __init__(self, allow: tuple[str, ...]):
        if not allow:
            raise ValueError(f"adapter_hub_allow: empty; leave {FLAG} out to keep Hub loads off")
        self.allow = tuple(allow)
        self._matchers = compile_allow(self.allow)
        self._lock = threading.Lock()
        self._inflight: dict[str, tuple[threading.Event, list]] = {}
        self._memo: OrderedDict[str, tuple[float, object]] = OrderedDict()  # name -> (monotonic time, outcome)
        self.fetches: Counter[str] = Counter()  # name -> Hub calls, the MEMO_MAX names fetched last (oldest first)
        self._total = 0

    def allows(self, repo_id: str) -> bool:
        return any(m(repo_id) for m in self._matchers)

    def resolve(self, name: str) -> tuple[Path, str] | None:
        """(snapshot folder, the repo's cache folder as the root it must stay under) for an allowed Hub id, or
        None when `name` is not a Hub id or not allowed (no Hub access).

        Raises:
            AdapterNotFound: an allowed id that cannot be fetched (offline: not cached), with the one-line reason.
        """
        parsed = parse_hub_id(name)
        if parsed is None or not self.allows(parsed[0]):
            return None
        with self._lock:
            memo = self._memo.get(name)
            if memo is not None and time.monotonic() - memo[0] < MEMO_TTL_S:
                if isinstance(memo[1], AdapterNotFound):
                    raise AdapterNotFound(str(memo[1]))
                return memo[1]
            slot = self._inflight.get(name)
            owner = slot is None
            if owner:
                slot = self._inflight[name] = (threading.Event(), [])
                _put_newest(self.fetches, name, self.fetches[name] + 1)
                self._total += 1
        done, result = slot
        if not owner:  # another request is fetching this name: share its outcome
            done.wait()
            if isinstance(result[0], Exception):
                raise AdapterNotFound(str(result[0]))
            return result[0]
        remember = True
        try:
            result.append(self._fetch(name, *parsed))
        except AdapterNotFound as e:
            result.append(e)
            raise
        except BaseException as e:  # waiters must never hang on a failed fetch; a transient error is not remembered
            result.append(AdapterNotFound(f"adapter {name!r}: Hub fetch failed ({type(e).__name__})"))
            remember = False
            raise
        finally:
            with self._lock:  # remembered before the in-flight entry goes, so no request falls between the two
                if remember:
                    _put_newest(self._memo, name, (time.monotonic(), result[0]))
                del self._inflight[name]
            done.set()
        return result[0]

    @property
    def total_fetches(self) -> int:
        with self._lock:
            return self._total

    @staticmethod
    def _fetch(name: str, repo_id: str, revision: str | None) -> tuple[Path, str]:
        from qlora_kit._cli.hub import CheckpointNotFound, fetch_snapshot

        try:
            folder = fetch_snapshot(repo_id, revision, patterns=FILES)
        except CheckpointNotFound as e:
            raise AdapterNotFound(f"adapter {name!r}: {e}") from None
        return folder, os.path.realpath(folder.parent.parent)  # models--ORG--NAME/ (snapshots/<sha>/ is the folder)


def _put_newest(d: dict, key: str, value) -> None:
    """d[key] = value as d's newest entry (dicts keep insertion order), the oldest dropped past MEMO_MAX entries
    (O(1) each for an OrderedDict; a dict's scan past deleted entries is bounded by its size)."""
    d.pop(key, None)
    d[key] = value
    while len(d) > MEMO_MAX:
        del d[next(iter(d))]
