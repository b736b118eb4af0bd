"""An adapter store: a folder whose subfolders are adapters, named by their path under it (`acme/support-v2`
is DIR/acme/support-v2/). A request naming an adapter the server does not know yet is resolved here.

Resolution never reads outside the store: the name is checked first (1-128 characters of letters, digits and
._:@/-, no empty, hidden or `..` component; anything else is unknown, with no disk access at all), then the
folder is found one component at a time with lstat, following symlinks by readlink only while their targets
stay under the store's root (a link leading out is refused, its target never touched). The two adapter files
are checked the same way. Reading and validating the weights is the registry's loader's job
(qserve.engine.lora.read_adapter: safetensors only, base check); `count_read` counts each read, per name.

`probes` counts filesystem calls made by resolution, `reads` the adapter reads, so tests can show that a
refused or unknown name cost none.
"""
import os
import stat
import threading
from collections import Counter
from pathlib import Path

from ..adapter_folder import ADAPTER_NAME, CONFIG_NAME, WEIGHTS_NAME, under_root
from ..errors import AdapterPathRefused

_MAX_LINKS = 16


class AdapterStore:
    """Adapters under `root`, resolved by name. Thread-safe counters.

    Raises:
        ValueError if `root` is not an existing folder.
    """

    def __init__(self, root: str | os.PathLike):
        if not os.path.isdir(root):
            raise ValueError(f"adapter_store={os.fspath(root)!r}: not an existing folder (flag --adapter-store)")
        self.root = os.path.realpath(root)
        self._lock = threading.Lock()
        self.probes = 0
        self.reads: Counter[str] = Counter()

    @staticmethod
    def valid_name(name: str) -> bool:
        """Whether `name` could name a store adapter (no disk access)."""
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            return False
        return all(part and not part.startswith(".") for part in name.split("/"))

    def resolve(self, name: str) -> Path | None:
        """The adapter folder for `name`, or None when the store has none by that name.

        Raises:
            AdapterPathRefused when the folder or one of its two files links outside the store.
        """
        if not self.valid_name(name):
            return None
        folder = self._walk(self.root, name.split("/"), name)
        if folder is None or not self._is(folder, stat.S_ISDIR):
            return None
        for fname in (CONFIG_NAME, WEIGHTS_NAME):  # missing files are the registry's to report (pickle hint)
            self._walk(folder, [fname], name)
        return Path(folder)

    def count_read(self, name: str) -> None:
        with self._lock:
            self.reads[name] += 1

    @property
    def total_reads(self) -> int:
        with self._lock:
            return sum(self.reads.values())

    # -- internals ------------------------------------------------------------------------------------------
    def _lstat(self, path: str):
        with self._lock:
            self.probes += 1
        try:
            return os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _is(self, path: str, kind) -> bool:
        st = self._lstat(path)
        return st is not None and kind(st.st_mode)

    def _walk(self, start: str, parts: list[str], name: str) -> str | None:
        """Resolve `parts` from `start` (already real, under root) without leaving the root; None if absent."""
        cur, todo, links = start, list(parts), 0
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                cur = os.path.dirname(cur)
                if not under_root(cur, self.root):
                    raise AdapterPathRefused(f"adapter {name!r}: a link in the store leads outside it ({self.root})")
                continue
            path = os.path.join(cur, part)
            st = self._lstat(path)
            if st is None:
                return None
            if not stat.S_ISLNK(st.st_mode):
                cur = path
                continue
            links += 1
            if links > _MAX_LINKS:
                raise AdapterPathRefused(f"adapter {name!r}: more than {_MAX_LINKS} symlinks in its path")
            target = os.readlink(path)
            if os.path.isabs(target):
                target = os.path.normpath(target)
                if not under_root(target, self.root):
                    raise AdapterPathRefused(f"adapter {name!r}: {path} links to {target}, outside the store "
                                             f"{self.root}")
                cur, todo = self.root, os.path.relpath(target, self.root).split(os.sep) + todo
            else:
                todo = target.split("/") + todo
        return cur

