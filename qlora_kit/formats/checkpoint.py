"""Read a 4-bit checkpoint folder (ours or transformers + bitsandbytes'): shards, headers, and each
quantized weight rebuilt lazily from its entries (FORMAT.md §2) with layout.from_entries. The one reader of
`qconvert verify/inspect/dequantize` and `qtrain merge` (shards.ShardWriter is their one writer).
"""
import math
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .codec import Packed4bit
from .errors import FormatError
from .io import index_shards, read_header, read_json_object
from .layout import from_entries, is_state_key, quantized_weight_names
from .shards import INDEX, SINGLE


class Checkpoint:
    """An opened checkpoint: `keys`, `header(key)`, `get(key)`, `quantized` names and `packed(name)`.

    Use as a context manager; files are memory-mapped, so tensors are read only when asked for.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FormatError(f"{self.folder}: no such checkpoint folder")
        self.index: dict[str, str] | None = None
        if (self.folder / INDEX).is_file():
            shards = index_shards(self.folder / INDEX)  # confined to the folder
            self.index = {k: p.name for k, p in shards.items()}
            self.files = sorted(set(shards.values()))
        elif (self.folder / SINGLE).is_file():
            self.files = [self.folder / SINGLE]
        else:
            raise FormatError(f"{self.folder}: no {SINGLE} or {INDEX}")
        self.headers: dict[Path, dict] = {}
        self.file_of: dict[str, Path] = {}
        for f in self.files:
            if not f.is_file():
                raise FormatError(f"{self.folder / INDEX}: names shard {f.name}, which is missing")
            self.headers[f] = read_header(f)
            for key in self.headers[f]:
                if key == "__metadata__":
                    continue
                if key in self.file_of:
                    raise FormatError(f"{f}: tensor {key} also appears in {self.file_of[key].name}")
                self.file_of[key] = f
        self.keys = sorted(self.file_of)
        self.quantized = quantized_weight_names(self.keys)
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}
        self.config = _read_config(self.folder / "config.json")

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def header(self, key: str) -> dict:
        return self.headers[self.file_of[key]][key]

    def metadata(self) -> dict[str, str]:
        return self.headers[self.files[0]].get("__metadata__") or {}

    def get(self, key: str) -> torch.Tensor:
        file = self.file_of[key]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
        return self._handles[file].get_tensor(key)

    def entries_of(self, name: str) -> list[str]:
        """The packed codes key plus every state key of quantized weight `name`."""
        return [name] + [k for k in self.keys if k.startswith(name + ".") and is_state_key(k)]

    def packed(self, name: str, codes: bool = True) -> Packed4bit:
        """Rebuild quantized weight `name`; raises FormatError subclasses naming the file and the tensor.

        With codes=False the packed codes are not read (a meta tensor of their declared shape stands in): every
        state check still runs, at the cost of the small state entries only.
        """
        present = {k: self.get(k) for k in self.entries_of(name) if k in self.file_of and (codes or k != name)}
        if not codes and name in self.file_of:
            h = self.header(name)
            present[name] = torch.empty(h["shape"], dtype=torch.uint8 if h["dtype"] == "U8" else torch.float32,
                                        device="meta")
        try:
            return from_entries(name, present)
        except FormatError as e:
            where = self.file_of.get(name) or self.folder
            raise type(e)(f"{where}: {e}") from None

    def plain_keys(self) -> list[str]:
        """Keys that are neither a quantized weight nor one of its state entries."""
        quantized = set(self.quantized)
        return [k for k in self.keys if k not in quantized and not is_state_key(k)]

    def nbytes(self, key: str) -> int:
        start, end = self.header(key)["data_offsets"]
        return end - start

    @staticmethod
    def numel(shape) -> int:
        return math.prod(shape)


def _read_config(path: Path) -> dict:
    """config.json as a dict ({} when absent); FormatError naming the file when it is not a JSON object."""
    if not path.is_file():
        return {}
    config = read_json_object(path)
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise FormatError(f"{path}: quantization_config={qc!r:.100} must be an object")
    return config
