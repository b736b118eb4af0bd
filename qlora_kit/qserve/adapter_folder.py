"""An adapter folder on disk, checked before anything in it is read: PEFT's two file names, the confinement of
untrusted paths under a root (symlinks followed), and the refusal of pickled weights; and the names an adapter may
have (the registry's and the adapter store's, where a name is also the folder's path under the store root).

The registry (qserve/adapters.py) checks a folder with `resolve_adapter_folder` when the adapter is registered
and again just before its loader reads it (the folder may have changed in between). Reading and validating the
weights is the loader's job (qserve.engine.lora.read_adapter). Plain Python (no torch).
"""
import os
import re
from pathlib import Path

from .errors import AdapterPathRefused

CONFIG_NAME = "adapter_config.json"  # PEFT's names, as formats/peft.py (not imported: it pulls in torch)
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")  # 1-128 of ._:@/- and alphanumerics, the first alphanumeric


def resolve_adapter_folder(path: str | os.PathLike, root: str | None, trusted: bool = False) -> Path:
    """Check an adapter folder and return its real path.

    Untrusted paths (the admin API, the adapter store, Hub snapshots) must resolve, symlinks followed, under
    `root`; relative paths are taken from the root and may not contain `..`; with no root, loading by path is
    refused. The folder must hold adapter_config.json and adapter_model.safetensors (pickled adapter_model.bin is
    refused), neither linking out of the root. Trusted paths (operator flags at start-up) skip the root check only.

    Raises:
        AdapterPathRefused naming the path and the rule it breaks.
    """
    raw = os.fspath(path)
    if not raw or "\x00" in raw:
        raise AdapterPathRefused(f"adapter path {raw!r}: empty or contains NUL")
    if trusted:
        root = None
    else:
        if root is None:
            raise AdapterPathRefused(f"adapter path {raw!r}: loading by path is disabled "
                                     "(no allowed adapter root configured)")
        root = os.path.realpath(root)
        if ".." in Path(raw).parts:
            raise AdapterPathRefused(f"adapter path {raw!r}: '..' is not allowed")
    full = raw if os.path.isabs(raw) or root is None else os.path.join(root, raw)
    real = os.path.realpath(full)
    if root is not None and not under_root(real, root):
        raise AdapterPathRefused(f"adapter path {raw!r}: resolves to {real}, outside the allowed root {root}")
    if not os.path.isdir(real):
        raise AdapterPathRefused(f"adapter path {raw!r}: not a folder")
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        f = os.path.join(real, fname)
        if not os.path.isfile(f):
            pickled = fname == WEIGHTS_NAME and os.path.exists(os.path.join(real, PICKLE_NAME))
            hint = f" ({PICKLE_NAME} is pickle and is refused: convert it to safetensors)" if pickled else ""
            raise AdapterPathRefused(f"adapter path {raw!r}: {fname} missing{hint}")
        if root is not None and not under_root(os.path.realpath(f), root):
            raise AdapterPathRefused(f"adapter path {raw!r}: {fname} links outside the allowed root {root}")
    return Path(real)


def under_root(path: str, root: str) -> bool:
    """Whether real path `path` is `root` or lies below it (both already resolved, symlinks followed)."""
    return os.path.commonpath([path, root]) == root
