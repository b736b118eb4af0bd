"""Atomic writes and checked safetensors reads.

Writes go to a temporary name in the destination's folder, are fsynced, then renamed, so a crash
or Ctrl-C never leaves a half-written file or folder at the destination. Reads check the
safetensors header (FORMAT.md §1) against the file size before any tensor is allocated.
"""
import contextlib
import json
import os
import shutil
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
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


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


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success rename it to `path` (replacing it if `overwrite`)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
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


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Atomically write a safetensors file with our header metadata (FORMAT.md §1)."""
    meta = dict(spec.METADATA_FORMAT)
    meta[spec.METADATA_VERSION_KEY] = spec.FORMAT_VERSION
    meta.update(metadata or {})
    blob = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    with atomic_file(path) as tmp:
        tmp.write_bytes(blob)


def read_header(path: str | os.PathLike) -> dict:
    """Parse and check a safetensors header: sizes, dtypes and offsets against the file, before allocating.

    Returns the header dict (tensor name -> {dtype, shape, data_offsets}, plus `__metadata__`).
    Raises FormatError naming the file on any truncation or inconsistency.
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
        try:
            header = json.loads(f.read(hlen).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    body = size - 8 - hlen
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor {name}: malformed header entry {info!r}") from None
        if dtype not in _DTYPE_BYTES:
            raise FormatError(f"{path}: tensor {name}: unknown dtype {dtype!r}")
        numel = 1
        for d in shape:
            numel *= d
        if not (0 <= start <= end <= body) or end - start != numel * _DTYPE_BYTES[dtype]:
            raise FormatError(f"{path}: tensor {name}: offsets [{start}, {end}) do not fit {dtype} {shape} "
                              f"in a body of {body} bytes (truncated or corrupt)")
        end_max = max(end_max, end)
    if end_max != body:
        raise FormatError(f"{path}: body is {body} bytes but tensors end at {end_max} (truncated or trailing bytes)")
    return header


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator:
    """Check the header, then open the file lazily (tensors are read one at a time with get_tensor)."""
    read_header(path)
    with safe_open(str(path), framework="pt") as f:
        yield f


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder: model.safetensors, or the shards its index names (FORMAT.md §1)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{index}: not a safetensors index with a weight_map ({e})") from None
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FormatError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                          "(pickled .bin checkpoints are refused here)")
    return [single]


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a checked safetensors file."""
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}
