"""`qconvert verify`: integrity of a 4-bit checkpoint and, against its source, error per tensor.

Integrity (every problem is collected, each naming its tensor or file):
  * every safetensors header fits its file; the shard index and the shards agree both ways;
  * every quantized weight has a complete, parseable quant_state and entries of the shapes and dtypes
    its JSON implies (formats.layout.from_entries); quant_map equals the NF4/FP4 codebook and
    nested_quant_map the 8-bit dynamic map (|diff| <= 1e-6); decoded absmax is finite and >= 0;
  * no state entry without its weight; no NaN/Inf in any floating tensor;
  * config.json's quantization_config agrees with the tensors (quant type, double quant).
Against SRC: SQNR_dB = 10 log10(sum W^2 / sum (W - W')^2) for every tensor, W' decoded to fp32; a
tensor below `min_sqnr` dB, or missing on either side, is a problem.
"""
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qlora_kit.formats import Checkpoint, FormatError, is_state_key, sqnr_db
from qlora_kit.kernels import dequant

from .options import DEFAULT_MIN_SQNR_DB
from .source import SourceWeights, resolve



@dataclass
class ErrorRow:
    name: str
    quantized: bool
    sqnr_db: float


@dataclass
class VerifyResult:
    folder: str
    problems: list[str] = field(default_factory=list)
    errors: list[ErrorRow] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"folder": self.folder, "ok": self.ok, "checked": self.checked, "problems": self.problems,
                "errors": [asdict(e) | {"sqnr_db": e.sqnr_db if math.isfinite(e.sqnr_db) else None}
                           for e in self.errors]}


def _check_index(ckpt: Checkpoint, problems: list[str]) -> None:
    if ckpt.index is None:
        return
    for key, file in ckpt.index.items():
        if ckpt.file_of.get(key) is None or ckpt.file_of[key].name != file:
            problems.append(f"{key}: the index maps it to {file}, which does not hold it")
    for key, file in ckpt.file_of.items():
        if key not in ckpt.index:
            problems.append(f"{file.name}: tensor {key} is missing from the shard index")


def _check_quantized(ckpt: Checkpoint, name: str, problems: list[str]) -> str | None:
    """Check one quantized weight; return its 'qt/double' signature or None when broken."""
    try:
        packed = ckpt.packed(name)
    except FormatError as e:
        problems.append(str(e))
        return None
    s = packed.state  # from_entries checked the maps and the decoded absmax (formats.layout.check_state_values)
    return f"{s.quant_type}/{s.nested is not None}"


def _check_config(ckpt: Checkpoint, signatures: set[str], problems: list[str]) -> None:
    if not ckpt.quantized:
        return
    qc = ckpt.config.get("quantization_config")
    where = ckpt.folder / "config.json"
    if not isinstance(qc, dict):
        problems.append(f"{where}: no quantization_config, so loaders will not see the 4-bit weights")
        return
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        problems.append(f"{where}: quantization_config is not bitsandbytes load_in_4bit")
    expected = f"{qc.get('bnb_4bit_quant_type')}/{bool(qc.get('bnb_4bit_use_double_quant'))}"
    for sig in signatures - {expected}:
        problems.append(f"{where}: quantization_config says {expected} (quant type/double quant) "
                        f"but tensors are {sig}")


def check_integrity(folder: str | Path) -> VerifyResult:
    """Every integrity check above; problems are collected, not raised (a header that cannot be read raises)."""
    result = VerifyResult(str(folder))
    problems = result.problems
    with Checkpoint(folder) as ckpt:
        _check_index(ckpt, problems)
        owners = set(ckpt.quantized)
        for key in ckpt.keys:
            if is_state_key(key) and not any(key.startswith(n + ".") for n in owners):
                problems.append(f"{key}: state entry without a quant_state for its weight")
        signatures = {sig for n in ckpt.quantized if (sig := _check_quantized(ckpt, n, problems))}
        _check_config(ckpt, signatures, problems)
        for key in ckpt.plain_keys():
            t = ckpt.get(key)
            if t.is_floating_point() and not torch.isfinite(t).all():
                problems.append(f"{key}: {(~torch.isfinite(t)).sum().item()} NaN/Inf value(s)")
        result.checked = len(ckpt.quantized) + len(ckpt.plain_keys())
    return result


def compare(folder: str | Path, against: str, min_sqnr: float = DEFAULT_MIN_SQNR_DB, result: VerifyResult | None = None,
            revision: str | None = None, token: str | None = None) -> VerifyResult:
    """Per-tensor SQNR of the checkpoint against its source; adds problems for low or missing tensors."""
    result = result or VerifyResult(str(folder))
    source = SourceWeights(resolve(against, revision, token))
    with Checkpoint(folder) as ckpt:
        quantized = set(ckpt.quantized)
        plain = set(ckpt.plain_keys())
        seen = set()
        for info, w in source:
            seen.add(info.name)
            if info.name in quantized:
                try:
                    approx = dequant(ckpt.packed(info.name), torch.float32)
                except FormatError as e:
                    result.problems.append(str(e))
                    continue
            elif info.name in plain:
                approx = ckpt.get(info.name)
            else:
                result.problems.append(f"{info.name}: in {against} but not in {folder}")
                continue
            if tuple(approx.shape) != tuple(w.shape):
                result.problems.append(f"{info.name}: shape {tuple(approx.shape)} but the source has {tuple(w.shape)}")
                continue
            err = sqnr_db(w, approx)
            result.errors.append(ErrorRow(info.name, info.name in quantized, err))
            if err < min_sqnr:
                result.problems.append(f"{info.name}: SQNR {err:.2f} dB is below the threshold {min_sqnr:.2f} dB")
        for name in sorted((quantized | plain) - seen):
            result.problems.append(f"{name}: in {folder} but not in {against}")
    return result


def as_json(result: VerifyResult) -> str:
    return json.dumps(result.as_dict(), indent=1)
