"""Atomic writes and checked safetensors reads.

Writes go to a temporary name in the destination's folder, are fsynced, then renamed, so a crash
or Ctrl-C never leaves a half-written file or folder at the destination. Reads check the
safetensors header (FORMAT.md §1) against the file size before any tensor is allocated.
"""
import contextlib
import json
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from . import spec
from .errors import FormatError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own cap


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


OWNER_FILE = ".qlora_kit.owner"  # inside a temporary folder: {"pid", "start", "host"} of the writing process


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the command name may hold spaces


def _owner() -> dict:
    return {"pid": os.getpid(), "start": _start_time(os.getpid()), "host": socket.gethostname()}


def _provably_dead(owner_file: Path) -> bool:
    """True only when the owner file names a process on this host that is gone (or whose pid was reused)."""
    try:
        owner = json.loads(owner_file.read_text())
        pid, start, host = int(owner["pid"]), owner.get("start"), owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return start is not None and _start_time(pid) not in (None, start)


def clean_stale_temps(parent: str | os.PathLike) -> list[Path]:
    """Remove the `.*.tmp` folders in `parent` left by atomic_dir writers that were killed (SIGKILL, power
    loss): only those whose owner file proves the writer dead. Returns the folders removed."""
    removed = []
    for tmp in Path(parent).glob(".*.tmp"):
        if tmp.is_dir() and not tmp.is_symlink() and _provably_dead(tmp / OWNER_FILE):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success rename it to `path` (replacing it if `overwrite`).

    The temporary folder holds an owner file (pid, start time, host) until the rename, so a later writer into
    the same parent can remove it if this process is killed before it can clean up (clean_stale_temps).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        (tmp / OWNER_FILE).write_text(json.dumps(_owner()))
        yield tmp
        (tmp / OWNER_FILE).unlink()
        os.chmod(tmp, 0o755)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write `obj` as indented JSON."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_object(path: str | os.PathLike, error: type[Exception] = FormatError) -> dict:
    """A UTF-8 JSON file holding an object. Raises `error` naming the file when it is not valid JSON (or nests too
    deeply to parse) or holds anything but an object; OSError when it cannot be read."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: must be a JSON object, not {type(data).__name__}")
    return data


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Atomically write a safetensors file with our header metadata (FORMAT.md §1)."""
    meta = dict(spec.METADATA_FORMAT)
    meta[spec.METADATA_VERSION_KEY] = spec.FORMAT_VERSION
    meta.update(metadata or {})
    blob = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    with atomic_file(path) as tmp:
        tmp.write_bytes(blob)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_header(path: str | os.PathLike) -> dict:
    """Parse and check a safetensors header as strictly as the safetensors spec, before allocating.

    The rules (safetensors' README and its Rust reader): a little-endian u64 N <= 100 MB, then N bytes of
    UTF-8 JSON starting with `{` (trailing spaces allowed as padding), no duplicate keys; `__metadata__`, if
    present, maps strings to strings; every other entry is exactly {dtype, shape, data_offsets} with a known
    dtype, a shape of non-negative integers and two integer offsets whose span equals the tensor's byte size;
    sorted by offset the tensors tile the body exactly (no overlap, no hole, nothing before or after them).

    Returns the header dict (tensor name -> {dtype, shape, data_offsets}, plus `__metadata__`).
    Raises FormatError naming the file, and the tensor or field, on any violation.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            raise FormatError(f"{path}: header length {hlen} exceeds the file size {size} (truncated or corrupt)")
        text = f.read(hlen)
    if not text.startswith(b"{"):
        raise FormatError(f"{path}: header is not valid JSON (a safetensors header starts with '{{')")
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except FormatError as e:
        raise FormatError(f"{path}: header has a {e}") from None
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise FormatError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings, got {meta!r:.200}")
    body = size - 8 - hlen
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{where}: entry must be exactly {{dtype, shape, data_offsets}}, got {info!r:.200}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in spec.ST_DTYPES:
            raise FormatError(f"{where}: unknown dtype {dtype!r:.100}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise FormatError(f"{where}: shape {shape!r:.100} must be a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
            raise FormatError(f"{where}: data_offsets {offsets!r:.100} must be two non-negative integers")
        start, end = offsets
        if not start <= end <= body or end - start != spec.st_nbytes(dtype, shape):
            raise FormatError(f"{where}: offsets [{start}, {end}) do not fit {dtype} {shape} "
                              f"in a body of {body} bytes (truncated or corrupt)")
        spans.append((start, end, name))
    pos = 0
    for start, end, name in sorted(spans):
        if start != pos:
            what = "overlaps the previous tensor" if start < pos else f"leaves a hole of {start - pos} bytes before it"
            raise FormatError(f"{path}: tensor {name}: data_offsets [{start}, {end}) {what} "
                              "(safetensors requires tensors to tile the body exactly)")
        pos = end
    if pos != body:
        raise FormatError(f"{path}: body is {body} bytes but tensors end at {pos} (truncated or trailing bytes)")
    return header


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator:
    """Check the header, then open the file lazily (tensors are read one at a time with get_tensor)."""
    read_header(path)
    with safe_open(str(path), framework="pt") as f:
        yield f


def index_shards(index: str | os.PathLike) -> dict[str, Path]:
    """The weight_map of a shard index (model.safetensors.index.json), each shard confined to its folder.

    Returns tensor name -> shard path. Raises FormatError naming the index and the entry when the file is not
    a {"weight_map": {name: file}} object or a shard name is absolute, has a folder part or `..`.
    """
    index = Path(index)
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file")
    out = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
            raise FormatError(f"{index}: weight_map[{name!r}] = {file!r:.100}: must be a file name inside "
                              f"{index.parent} (no folders, '..' or absolute paths)")
        out[name] = index.parent / file
    return out


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder: model.safetensors, or the shards its index names (FORMAT.md §1)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(index_shards(index).values()))
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FormatError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                          "(pickled .bin checkpoints are refused here)")
    return [single]


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a checked safetensors file."""
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}
