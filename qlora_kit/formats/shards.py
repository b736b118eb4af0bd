"""Write safetensors shards tensor by tensor, without holding a shard in memory.

A safetensors file is  u64 little-endian header length N | N bytes of JSON header | body, and the
header (offsets into the body) must come first. Each tensor is therefore appended to one of four
section files in the output folder, by element size (8, 4, 2, 1 bytes); when the shard closes the
header is written, padded with spaces to a multiple of 8 bytes, followed by the sections in that
order. Every tensor then starts at a multiple of its element size, as in files written by
safetensors itself, and there are no holes between tensors (FORMAT.md §1).

Shard names follow transformers: one shard is `model.safetensors`; n > 1 shards are
`model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}).
"""
import json
import os
import struct
from pathlib import Path

import torch

from . import spec
from .io import write_json


_ALIGNS = (8, 4, 2, 1)
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _write(f, data: memoryview, path: Path) -> None:
    """Append bytes; an OSError (disk full, I/O error) is re-raised naming the file."""
    try:
        f.write(data)
    except OSError as e:
        raise OSError(e.errno, f"{path}: write failed ({e.strerror or e})") from None


class _Shard:
    def __init__(self, folder: Path, index: int):
        self.folder = folder
        self.paths = {a: folder / f".shard{index:05d}.align{a}.part" for a in _ALIGNS}
        self.files = {a: open(p, "wb") for a, p in self.paths.items()}
        self.sizes = dict.fromkeys(_ALIGNS, 0)
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}  # name -> (dtype, shape, align, start)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        align = t.element_size()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        _write(self.files[align], memoryview(raw), self.paths[align])
        self.entries[name] = (spec.ST_NAMES[t.dtype], list(t.shape), align, self.sizes[align])
        self.sizes[align] += raw.nbytes

    def seal(self) -> None:
        """Close the section files: a full shard waits for close() without holding descriptors (a model of
        hundreds of shards would otherwise need four open files each)."""
        for f in self.files.values():
            f.close()

    def finish(self, path: Path, metadata: dict[str, str]) -> None:
        """Write header + sections to `path` (fsynced) and delete the section files."""
        self.seal()
        base = {}
        offset = 0
        for a in _ALIGNS:
            base[a] = offset
            offset += self.sizes[a]
        header: dict = {"__metadata__": metadata}
        for name, (dtype, shape, align, start) in sorted(self.entries.items(), key=lambda kv: (-kv[1][2], kv[1][3])):
            header[name] = {"dtype": dtype, "shape": shape,
                            "data_offsets": [base[align] + start, base[align] + start + spec.st_nbytes(dtype, shape)]}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path, "wb") as out:
            _write(out, memoryview(struct.pack("<Q", len(blob)) + blob), path)
            for a in _ALIGNS:
                with open(self.paths[a], "rb") as part:
                    while chunk := part.read(16 << 20):
                        _write(out, memoryview(chunk), path)
            out.flush()
            os.fsync(out.fileno())
        for p in self.paths.values():
            p.unlink()


class ShardWriter:
    """Streams groups of tensors into shards of at most `max_shard_size` bytes inside `folder`.

    A group (one quantized weight and its state entries) never straddles two shards; a single group
    larger than the limit gets a shard of its own.
    """

    def __init__(self, folder: Path, max_shard_size: int, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.max_shard_size = max_shard_size
        self.metadata = dict(spec.METADATA_FORMAT) | {spec.METADATA_VERSION_KEY: spec.FORMAT_VERSION} | (metadata or {})
        self.done: list[_Shard] = []
        self.current: _Shard | None = None

    def add_group(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.current is not None and self.current.nbytes and self.current.nbytes + size > self.max_shard_size:
            self.current.seal()
            self.done.append(self.current)
            self.current = None
        if self.current is None:
            self.current = _Shard(self.folder, len(self.done))
        for name, t in tensors.items():
            self.current.add(name, t)

    def close(self) -> list[Path]:
        """Assemble every shard file (and the index when there are several); return the shard paths."""
        shards = self.done + ([self.current] if self.current is not None else [])
        if not shards:
            shards = [_Shard(self.folder, 0)]
        n = len(shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map, total = {}, 0
        for shard, name in zip(shards, names):
            shard.finish(self.folder / name, self.metadata)
            total += shard.nbytes
            weight_map.update(dict.fromkeys(shard.entries, name))
        if n > 1:
            write_json(self.folder / INDEX, {"metadata": {"total_size": total},
                                             "weight_map": dict(sorted(weight_map.items()))})
        return [self.folder / name for name in names]

