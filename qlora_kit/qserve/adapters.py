"""Adapter registry: named LoRA adapters in three tiers, disk -> CPU -> resident (GPU slots).

Plain Python (no torch). One adapter's state, record and snapshot are in adapter_entry.py; the checks on its folder
(confinement under a root, the two PEFT files, no pickle) in adapter_folder.py. The real work is injected:

- `loader(name, path) -> (payload, nbytes)` reads and validates an adapter folder into host memory (torch,
  safetensors, shape checks against the base). It is slow, so the engine runs `load()` in a worker thread;
  the registry's lock is never held while a loader runs.
- `on_resident(name, payload, slot)` copies an adapter into one of the `max_loras` resident slots the runner's
  per-row LoRA kernels index (under the registry lock, from the engine loop through `ensure_resident`). A slot
  given up to LRU eviction keeps its weights, unreachable (only a resident adapter's slot index reaches a batch),
  for the next install to overwrite in place; `on_remove(name, slot)` runs when a resident adapter is removed
  for good (unload), so an unloaded adapter's weights do not outlive it in memory.

Reference counts: `acquire`/`release` count requests in flight (queued or running) and keep an adapter from
being unloaded or dropped from the CPU tier; `pin`/`unpin` count requests in the running batch and keep it
resident. An adapter with only queued requests may lose its slot (its KV is dropped on preemption anyway).
`unload` of an adapter in use marks it draining: its requests finish, new ones get AdapterNotFound, and it
disappears when the last one releases it.

Fleets (qserve/store/): with an AdapterStore attached, `lookup` registers an adapter the first time a request
names it, confined to the store's folder; the host tier is held to `cpu_budget_bytes` *before* each insertion
(least recently used adapters without running requests are dropped first: idle ones, then ones whose requests
only wait), so its bytes never exceed the budget; FleetStats counts hits per tier, loads and evictions. With a
HubSource (--adapter-hub-allow), a name the store does not have is tried as an allowed Hub repo id next (store
first), confined to its repo folder in the Hugging Face cache (source `hub`: its disk tier, its load metrics' label).

Each load gets a fresh `uid` (never reused); the KV prefix cache is salted with it, so re-registering a
different adapter under an old name can never hit the old adapter's cached KV.
"""
import itertools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .adapter_entry import AdapterEntry, AdapterInfo, AdapterState
from .adapter_folder import ADAPTER_NAME, resolve_adapter_folder
from .errors import AdapterExists, AdapterNotFound, AdapterRefused, QloraKitError
from .store.stats import FleetStats


Loader = Callable[[str, str], tuple[Any, int]]


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """Adapter registry limits.

    Args:
        allowed_root: folder every dynamically loaded adapter must resolve under; None refuses untrusted paths.
        max_loras: resident slots (distinct adapters in one batch), >= 1.
        max_cpu_loras: adapters kept in host memory, >= max_loras; None = no count limit.
        cpu_budget_bytes: host bytes for loaded adapters; None = unlimited.
        resident_budget_bytes: device bytes for resident adapters; None = limited by slots only.
    """

    allowed_root: str | None = None
    max_loras: int = 8
    max_cpu_loras: int | None = None
    cpu_budget_bytes: int | None = None
    resident_budget_bytes: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_loras, int) or self.max_loras < 1:
            raise ValueError(f"max_loras={self.max_loras!r}: must be an integer >= 1 (flag --max-loras)")
        if self.max_cpu_loras is not None and (not isinstance(self.max_cpu_loras, int)
                                               or self.max_cpu_loras < self.max_loras):
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras!r}: must be >= max_loras={self.max_loras}")
        for key in ("cpu_budget_bytes", "resident_budget_bytes"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{key}={v!r}: must be a positive integer or None")
        if self.allowed_root is not None and not os.path.isdir(self.allowed_root):
            raise ValueError(f"allowed_root={self.allowed_root!r}: not an existing folder")


class AdapterRegistry:
    """Thread-safe registry of named adapters. See the module docstring for tiers and reference counts."""

    def __init__(self, config: RegistryConfig, loader: Loader,
                 on_resident: Callable[[str, Any, int], None] | None = None,
                 on_remove: Callable[[str, int], None] | None = None, store=None, hub=None):
        self.config, self.store = config, store  # store: a qserve.store.AdapterStore, or None
        self.hub = hub  # a qserve.store.HubSource, or None (Hub ids off)
        self.stats = FleetStats()
        self.stats.host_budget_bytes = config.cpu_budget_bytes
        self._loader, self._on_resident, self._on_remove = loader, on_resident, on_remove
        self._lock = threading.RLock()
        self._loaded = threading.Condition(self._lock)
        self._entries: dict[str, AdapterEntry] = {}
        self._slots: list[str | None] = [None] * config.max_loras
        self._uids = itertools.count(1)
        self._clock = itertools.count(1)
        self.loads = self.evictions = 0

    @property
    def max_loras(self) -> int:
        return self.config.max_loras

    # -- paths ----------------------------------------------------------------------------------------------
    def resolve_path(self, path: str | os.PathLike, trusted: bool = False, root: str | None = None) -> Path:
        """Check an adapter folder and return its real path: adapter_folder.resolve_adapter_folder, confined to
        `root` (the adapter store's or a Hub snapshot's), by default `allowed_root`, unless trusted (operator flags
        at start-up). Raises AdapterPathRefused naming the path and the rule it breaks."""
        return resolve_adapter_folder(path, root or self.config.allowed_root, trusted)

    # -- registration ---------------------------------------------------------------------------------------
    def register(self, name: str, path: str | os.PathLike, trusted: bool = False,
                 root: str | None = None, source: str = "store") -> AdapterInfo:
        """Add an adapter on disk (not loaded yet), confined to `root` (default allowed_root) unless trusted; its
        `source` is hub (a Hub snapshot) or store. Raises AdapterExists, AdapterPathRefused, AdapterRefused."""
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise AdapterRefused(f"adapter name {name!r}: use 1-128 letters, digits or ._:@/- "
                                 "starting with a letter or digit")
        real = self.resolve_path(path, trusted, root)
        with self._lock:
            if name in self._entries:
                state = "being unloaded" if self._entries[name].draining else "registered"
                raise AdapterExists(f"adapter {name!r}: already {state}; unload it first")
            e = self._entries[name] = AdapterEntry(name, str(real), trusted, next(self._uids), root, source)
            return e.info()

    def lookup(self, name: str) -> bool:
        """Whether `name` is served: registered and not draining, or found in the store or else (with a HubSource)
        fetched as an allowed Hub repo id, which registers it (not loaded yet). Call only for names the caller may
        use (no disk or Hub access for others). Blocking (a Hub fetch): the app calls it in a worker thread.

        Raises AdapterPathRefused (a store entry or Hub snapshot linking out of its root, or without safetensors
        weights); AdapterNotFound (an allowed Hub id that cannot be fetched)."""
        if name in self:
            return True
        folder = None if self.store is None else self.store.resolve(name)
        root, source = None if folder is None else self.store.root, "store"
        if folder is None and self.hub is not None:
            folder, root = self.hub.resolve(name) or (None, None)
            source = "hub"
        if folder is None:
            return False
        try:
            self.register(name, folder, root=root, source=source)
        except AdapterExists:
            pass  # registered by a concurrent request, or draining: acquire decides
        return True

    def add(self, name: str, path: str | os.PathLike, trusted: bool = False) -> AdapterInfo:
        """Register and load (vLLM's load_lora_adapter). On a failed load nothing stays registered."""
        self.register(name, path, trusted)
        try:
            return self.load(name)
        except Exception:  # any failure, ours or the loader's: nothing stays registered, then re-raise
            with self._lock:
                e = self._entries.get(name)
                if e is not None and e.refs == 0:
                    self._remove(e)
            raise

    def load(self, name: str) -> AdapterInfo:
        """Bring an adapter into the CPU tier by calling the loader (blocking; run it in a worker thread).

        A no-op when already loaded; waits when another thread is loading it. Drops least recently used idle
        adapters from the CPU tier to stay within `max_cpu_loras` and `cpu_budget_bytes`.

        Raises:
            AdapterNotFound; AdapterPathRefused if the folder changed; AdapterRefused if the loader fails
            (its message is kept) or the adapter cannot fit the CPU budget.
        """
        with self._lock:
            e = self._get(name, allow_draining=True)
            while e.state is AdapterState.LOADING:
                self._loaded.wait()
            if self._entries.get(name) is not e:
                raise AdapterNotFound(f"adapter {name!r}: was unloaded while loading")
            if e.state is not AdapterState.DISK:
                return e.info()
            e.state, path, trusted, root = AdapterState.LOADING, e.path, e.trusted, e.root
        t0 = time.perf_counter()
        loaded = False
        try:
            real = str(self.resolve_path(path, trusted, root))  # again: the folder may have changed since register
            if self.store is not None and root == self.store.root:
                self.store.count_read(name)
            payload, nbytes = self._loader(name, real)
            if not isinstance(nbytes, int) or nbytes < 0:
                raise AdapterRefused(f"adapter {name!r}: loader reported nbytes={nbytes!r}")
            cap = self.config.resident_budget_bytes
            if cap is not None and nbytes > cap:
                raise AdapterRefused(f"adapter {name!r}: {nbytes} bytes exceed resident_budget_bytes={cap}")
            loaded = True
        except (QloraKitError, OSError, ValueError) as err:
            if isinstance(err, AdapterRefused):
                raise
            raise AdapterRefused(f"adapter {name!r}: {err}") from err
        finally:  # whatever the loader raised, the entry never stays LOADING (waiters would hang)
            if not loaded:
                with self._lock:
                    e.state = AdapterState.DISK
                    self._loaded.notify_all()
        with self._lock:
            try:
                if self._entries.get(name) is not e:
                    raise AdapterNotFound(f"adapter {name!r}: was unloaded while loading")
                self._fit_cpu_tier(e, nbytes)  # room first: the tier never holds more than its budget
            except (AdapterNotFound, AdapterRefused):
                e.state = AdapterState.DISK
                self._loaded.notify_all()
                raise
            e.state, e.payload, e.nbytes = AdapterState.CPU, payload, nbytes
            e.load_time_s = time.perf_counter() - t0
            e.touch(self._clock)
            self.loads += 1
            self.stats.loaded("host")
            self.stats.host(self._host_bytes())
            self._loaded.notify_all()
            return e.info()

    def unload(self, name: str) -> bool:
        """Remove an adapter. True if gone now; False if it drains (removed when its requests finish).

        Raises AdapterNotFound if unknown or already draining.
        """
        with self._lock:
            e = self._get(name)
            if e.refs == 0:
                self._remove(e)
                return True
            e.draining = True
            return False

    # -- requests -------------------------------------------------------------------------------------------
    def acquire(self, name: str) -> int:
        """Count one request in flight on `name`; returns its uid. Raises AdapterNotFound (also if draining)."""
        with self._lock:
            e = self._get(name)
            e.refs += 1
            e.touch(self._clock)
            self.stats.request(e.info().tier)
            return e.uid

    def release(self, name: str) -> None:
        """Undo one `acquire`; a draining adapter is removed with its last release."""
        with self._lock:
            e = self._entries.get(name)
            if e is None or e.refs == 0:
                raise RuntimeError(f"adapter {name!r}: release without acquire")
            e.refs -= 1
            if e.refs == 0 and e.draining:
                self._remove(e)

    def pin(self, name: str) -> None:
        """Count one running request on a resident adapter (keeps its slot)."""
        with self._lock:
            e = self._entries[name]
            if e.state is not AdapterState.RESIDENT:
                raise RuntimeError(f"adapter {name!r}: pin while {e.state.value}")
            e.pins += 1
            e.touch(self._clock)

    def unpin(self, name: str) -> None:
        with self._lock:
            e = self._entries[name]
            if e.pins == 0:
                raise RuntimeError(f"adapter {name!r}: unpin without pin")
            e.pins -= 1

    def ensure_resident(self, name: str) -> int | None:
        """The adapter's resident slot, making it resident if possible; None means "wait".

        Evicts least recently used resident adapters that have no running requests. Returns None while the
        adapter is on disk or loading (see `pending_loads`) or when every slot is held by running requests.
        """
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                raise AdapterNotFound(f"adapter {name!r}: not registered")
            if e.state is AdapterState.RESIDENT:
                e.touch(self._clock)
                return e.slot
            if e.state is not AdapterState.CPU:
                return None
            budget = self.config.resident_budget_bytes
            if budget is not None and e.nbytes > budget:
                return None
            while None not in self._slots or (budget is not None and self._resident_bytes() + e.nbytes > budget):
                victims = [self._entries[n] for n in self._slots if n is not None and self._entries[n].pins == 0]
                if not victims:
                    return None
                self._evict(min(victims, key=lambda v: v.last_used))
            slot = self._slots.index(None)
            if self._on_resident is not None:
                self._on_resident(name, e.payload, slot)
            self._slots[slot], e.slot, e.state = name, slot, AdapterState.RESIDENT
            e.touch(self._clock)
            self.stats.loaded("resident")
            return slot

    def tier(self, name: str) -> str | None:
        """The adapter's tier now (resident, host, loading, store, hub), None if not registered (the scheduler's
        admission preference)."""
        with self._lock:
            e = self._entries.get(name)
            return None if e is None else e.info().tier

    def source(self, name: str) -> str:
        """hub (fetched from the Hub) or store (any other, or gone): the `source` label of its load metrics."""
        with self._lock:
            return self._entries[name].source if name in self._entries else "store"

    def slot_to_free(self) -> str | None:
        """The resident adapter whose slot frees soonest if it takes no new requests: fewest running, then LRU."""
        with self._lock:
            held = [self._entries[n] for n in self._slots if n is not None]
            return min(held, key=lambda e: (e.pins, e.last_used)).name if held else None

    def pending_loads(self) -> list[str]:
        """Adapters with requests in flight but not in memory: the engine should `load` them off-loop."""
        with self._lock:
            return [e.name for e in self._entries.values() if e.refs > 0 and e.state is AdapterState.DISK]

    # -- inspection -----------------------------------------------------------------------------------------
    def __contains__(self, name) -> bool:
        with self._lock:
            e = self._entries.get(name)
            return e is not None and not e.draining

    def get(self, name: str) -> AdapterInfo:
        with self._lock:
            return self._get(name, allow_draining=True).info()

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [e.info() for e in self._entries.values()]

    def memory_report(self) -> dict:
        """Bytes per adapter and how many more adapters of the mean known size fit each tier."""
        with self._lock:
            sizes = [e.nbytes for e in self._entries.values() if e.nbytes is not None]
            mean = sum(sizes) / len(sizes) if sizes else None
            cpu_used = sum(e.nbytes for e in self._entries.values() if e.payload is not None)
            res_used = self._resident_bytes()
            free_slots = self._slots.count(None)
            res_fit = free_slots
            if self.config.resident_budget_bytes is not None and mean:
                res_fit = min(free_slots, int((self.config.resident_budget_bytes - res_used) // mean))
            n_cpu = sum(1 for e in self._entries.values() if e.payload is not None)
            cpu_fit = None if self.config.max_cpu_loras is None else self.config.max_cpu_loras - n_cpu
            if self.config.cpu_budget_bytes is not None and mean:
                by_bytes = int((self.config.cpu_budget_bytes - cpu_used) // mean)
                cpu_fit = by_bytes if cpu_fit is None else min(cpu_fit, by_bytes)
            return {
                "adapters": {e.name: {"state": e.state.value, "bytes": e.nbytes, "slot": e.slot}
                             for e in self._entries.values()},
                "resident": {"used_bytes": res_used, "budget_bytes": self.config.resident_budget_bytes,
                             "slots": self.config.max_loras, "free_slots": free_slots, "more_fit": max(0, res_fit)},
                "cpu": {"used_bytes": cpu_used, "budget_bytes": self.config.cpu_budget_bytes,
                        "more_fit": None if cpu_fit is None else max(0, cpu_fit)},
            }

    # -- internals ------------------------------------------------------------------------------------------
    def _get(self, name, allow_draining=False) -> AdapterEntry:
        e = self._entries.get(name)
        if e is None or (e.draining and not allow_draining):
            why = "is being unloaded" if e is not None else "is not loaded"
            raise AdapterNotFound(f"adapter {name!r}: {why}; see /v1/models for the adapters served")
        return e

    def _resident_bytes(self) -> int:
        return sum(self._entries[n].nbytes or 0 for n in self._slots if n is not None)

    def _evict(self, e: AdapterEntry) -> None:
        """Resident -> CPU tier (the slot's weights stay until the next install overwrites them)."""
        self._slots[e.slot] = None
        e.slot, e.state = -1, AdapterState.CPU
        self.evictions += 1
        self.stats.evicted("resident")

    def _host_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.payload is not None)

    def _remove(self, e: AdapterEntry) -> None:
        if e.state is AdapterState.RESIDENT:
            if self._on_remove is not None:
                self._on_remove(e.name, e.slot)
            self._evict(e)
        e.payload, e.state = None, AdapterState.DISK
        del self._entries[e.name]
        self.stats.host(self._host_bytes())

    def _fit_cpu_tier(self, new: AdapterEntry, nbytes: int) -> None:
        """Drop CPU-tier adapters without running requests (LRU first: idle ones, then ones whose requests only
        wait; those are read again when admitted) until `new` with `nbytes` fits the count and byte limits."""
        cfg = self.config

        def over():
            held = [e for e in self._entries.values() if e.payload is not None and e is not new]
            return ((cfg.max_cpu_loras is not None and len(held) + 1 > cfg.max_cpu_loras)
                    or (cfg.cpu_budget_bytes is not None and sum(e.nbytes for e in held) + nbytes > cfg.cpu_budget_bytes))

        while over():
            held = [e for e in self._entries.values() if e is not new and e.payload is not None and e.pins == 0]
            if not held:
                raise AdapterRefused(f"adapter {new.name!r}: {nbytes} bytes do not fit the CPU tier "
                                     f"(max_cpu_loras={cfg.max_cpu_loras}, cpu_budget_bytes={cfg.cpu_budget_bytes}) "
                                     "while the adapters held there are in running batches")
            victim = min(held, key=lambda v: (v.refs > 0, v.last_used))
            if victim.state is AdapterState.RESIDENT:
                self._evict(victim)
            victim.payload, victim.state = None, AdapterState.DISK
            self.stats.evicted("host", victim.name)
