"""`qconvert inspect`: what a 4-bit checkpoint holds, tensor by tensor, and what it saves over bf16.

Bits per parameter of a quantized weight = 8 * (bytes of its codes + every state entry) / params;
for NF4, blocksize 64, double quant that is 4 + 8/64 + 32/(64*256) + (16*4 + 256*4 + JSON)/params
≈ 4.127 for large weights. Only headers and the small state entries are read (and checked as a loader
would, formats.layout.from_entries); the packed codes are not.
"""
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qlora_kit.formats import Checkpoint, decode_state_json, spec


@dataclass
class TensorRow:
    name: str
    shape: tuple[int, ...]
    stored: str  # "nf4" / "fp4" or the safetensors dtype of a plain tensor
    params: int
    nbytes: int  # bytes on disk, state entries included
    blocksize: int | None = None
    double_quant: bool | None = None
    dtype: str | None = None  # decode dtype of a quantized weight

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.params if self.params else 0.0


@dataclass
class Inspection:
    folder: str
    files: list[str]
    quantization_config: dict | None
    rows: list[TensorRow]
    metadata: dict[str, str] = field(default_factory=dict)  # the first shard's __metadata__ (FORMAT.md §1)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.params

    def as_dict(self) -> dict:
        return {"folder": self.folder, "files": self.files, "quantization_config": self.quantization_config,
                "metadata": self.metadata,
                "params": self.params, "bytes": self.nbytes, "bf16_bytes": self.bf16_bytes,
                "bits_per_param": 8 * self.nbytes / max(self.params, 1),
                "tensors": [asdict(r) | {"bits_per_param": r.bits_per_param} for r in self.rows]}


def _quantized_row(ckpt: Checkpoint, name: str) -> TensorRow:
    qt = next(q for q in spec.QUANT_TYPES if f"{name}.{spec.QUANT_STATE_PREFIX}{q}" in ckpt.file_of)
    ckpt.packed(name, codes=False)  # the same state checks as every loader, without reading the packed codes
    fields = decode_state_json(name, ckpt.get(f"{name}.{spec.QUANT_STATE_PREFIX}{qt}"), qt)
    shape = tuple(fields["shape"])
    nbytes = sum(ckpt.nbytes(k) for k in ckpt.entries_of(name) if k in ckpt.file_of)
    return TensorRow(name, shape, qt, math.prod(shape), nbytes, fields["blocksize"],
                     "nested_offset" in fields, fields["dtype"])


def inspect_checkpoint(folder: str | Path) -> Inspection:
    """One row per logical tensor (a quantized weight and its state entries count as one)."""
    with Checkpoint(folder) as ckpt:
        rows = [_quantized_row(ckpt, n) for n in ckpt.quantized]
        for key in ckpt.plain_keys():
            h = ckpt.header(key)
            rows.append(TensorRow(key, tuple(h["shape"]), h["dtype"], math.prod(h["shape"]), ckpt.nbytes(key)))
        rows.sort(key=lambda r: r.name)
        return Inspection(str(ckpt.folder), [f.name for f in ckpt.files],
                          ckpt.config.get("quantization_config"), rows, dict(ckpt.metadata()))


def as_json(inspection: Inspection) -> str:
    return json.dumps(inspection.as_dict(), indent=1)
