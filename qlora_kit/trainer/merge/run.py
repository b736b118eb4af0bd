"""`qtrain merge`: a LoRA adapter merged into the dequantized 4-bit base it was trained on, written as a bf16
Hugging Face checkpoint or re-quantized to 4-bit, with the cost of merging measured per tensor and at the logits.

Why the dequantized base and not the original bf16 weights: the adapter learned to correct the 4-bit weights
(W_deq), not the weights before quantization. Merging into the original bf16 W adds W − W_deq, the whole
quantization error, which the adapter never saw. The math and the error measures are in merge/weights.py and
merge/logits.py.

Input is checked before anything is written: OUT, the base (a 4-bit checkpoint, FORMAT.md), the adapter through
the one adapter boundary (models.read_peft_adapter, against the base's shapes and names). Tensors are streamed
one at a time into a temporary folder beside OUT (formats.atomic_dir, formats.ShardWriter); the logits are
compared on that folder; only then is it renamed to OUT, so a failure or Ctrl-C leaves no OUT behind.
"""
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from qlora_kit._cli.hub import aux_files, resolve_checkpoint
from qlora_kit._cli.options import check_out
from qlora_kit._cli.progress import byte_progress
from qlora_kit.formats import Checkpoint, ShardWriter, atomic_dir, plain_config, spec, write_json
from qlora_kit.formats.peft import CONFIG_NAME, WEIGHTS_NAME
from qlora_kit.kernels import dequant
from qlora_kit.models import AdapterPayload, base_names, load_config, projection_shapes, read_peft_adapter

from ..errors import MergeError
from .logits import DEFAULT_PROMPTS, LogitCost, compare_logits
from .weights import DECODE_DTYPE, FORMATS, TensorCost, merge_weight

REPORT_NAME = "merge_report.json"
COMPARE_DTYPES = ("float32", "bfloat16")


@dataclass
class MergeResult:
    out: Path
    format: str
    files: list[Path]
    metadata: dict[str, str]
    tensors: list[TensorCost]
    logits: LogitCost | None

    def as_dict(self) -> dict:
        return {"out": str(self.out), "format": self.format, "files": [f.name for f in self.files],
                "metadata": self.metadata, "tensors": [asdict(t) for t in self.tensors],
                "logits": asdict(self.logits) if self.logits else None}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def provenance(base: str | Path, adapter: Path, fmt: str, base_metadata: dict[str, str]) -> dict[str, str]:
    """The safetensors __metadata__ provenance keys of a merged checkpoint (formats/spec.py, FORMAT.md §1)."""
    meta = {spec.MERGE_BASE_KEY: str(base), spec.MERGE_ADAPTER_KEY: str(adapter),
            spec.MERGE_ADAPTER_CONFIG_KEY: _sha256(adapter / CONFIG_NAME),
            spec.MERGE_ADAPTER_WEIGHTS_KEY: _sha256(adapter / WEIGHTS_NAME), spec.MERGE_FORMAT_KEY: fmt,
            spec.MERGE_DATE_KEY: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if base_metadata.get(spec.SOURCE_KEY):
        meta[spec.MERGE_BASE_SOURCE_KEY] = base_metadata[spec.SOURCE_KEY]
    return meta


def _read_inputs(ckpt: Checkpoint, base: Path, adapter: Path, names: tuple[str, ...]) -> AdapterPayload:
    """The adapter through the adapter boundary, checked against the 4-bit base (known by `names`); MergeError
    otherwise."""
    if not ckpt.quantized:
        raise MergeError(f"{base}: not a 4-bit checkpoint (no quantized weights); merge needs the 4-bit checkpoint "
                         "the adapter was trained on (qconvert convert the bf16 model with the settings used in "
                         "training, then merge into that)")
    payload = read_peft_adapter(adapter, projection_shapes(load_config(base)), names)
    plain = set(ckpt.plain_keys())
    for module in payload.layers:
        if module + ".weight" not in ckpt.quantized and module + ".weight" not in plain:
            raise MergeError(f"{adapter}: module {module} has no weight {module}.weight in {base}")
    return payload


def merge(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, fmt: str = "bf16",
          prompts: tuple[str, ...] = DEFAULT_PROMPTS, compare: bool = True, compare_dtype: str = "float32",
          overwrite: bool = False, max_shard_size: int = 5 * 10**9, progress: bool = True) -> MergeResult:
    """Merge ADAPTER into BASE and write OUT; return the per-tensor and logit costs.

    Args:
        base: the 4-bit checkpoint folder the adapter was trained on, or its Hub id (HF cache; HF_HUB_OFFLINE
            honoured; the id is then also a name of the base for the adapter check and the provenance).
        adapter: a PEFT LoRA adapter folder.
        out: the folder to write (must not exist unless `overwrite`).
        fmt: "bf16" (plain HF checkpoint, config without quantization_config) or "nf4" (adapted weights
            re-quantized with the base weight's own settings; every other tensor copied byte for byte).
        prompts: prompts for the logit comparison; `compare=False` skips it.
        compare_dtype: its compute dtype, "float32" (the merge's own cost) or "bfloat16" (as served).

    Raises:
        MergeError, AdapterError, FormatError subclasses (bad input, nothing written); FileExistsError when OUT
        exists and not `overwrite`; OSError when writing fails.
    """
    given, base = str(base), resolve_checkpoint(base)  # a folder, or a Hub id's snapshot in the HF cache
    names = base_names(base) + ((given,) if given != str(base) else ())
    adapter, out = Path(adapter), Path(out)
    if fmt not in FORMATS:
        raise MergeError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    if compare_dtype not in COMPARE_DTYPES:
        raise MergeError(f"--compare-dtype {compare_dtype!r}: must be one of {', '.join(COMPARE_DTYPES)}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    check_out(out, base)
    check_out(out, adapter)
    with Checkpoint(base) as ckpt:
        payload = _read_inputs(ckpt, base, adapter, names)
        metadata = provenance(given if given != str(base) else base, adapter, fmt, ckpt.metadata())
        with atomic_dir(out, overwrite=overwrite) as tmp:
            files, costs = _write(ckpt, payload, tmp, fmt, metadata, max_shard_size, progress)
            logits = (compare_logits(base, payload, tmp, fmt, prompts, spec.NAME_DTYPES[compare_dtype])
                      if compare else None)
            result = MergeResult(out, fmt, [out / f.name for f in files], metadata, costs, logits)
            write_json(tmp / REPORT_NAME, result.as_dict())
    return result


def _write(ckpt: Checkpoint, payload: AdapterPayload, tmp: Path, fmt: str, metadata: dict[str, str],
           max_shard_size: int, progress: bool) -> tuple[list[Path], list[TensorCost]]:
    adapted = {module + ".weight": pair for module, pair in payload.layers.items()}
    quantized = set(ckpt.quantized)
    costs = []
    with byte_progress(progress) as bar:
        task = bar.add_task(f"merging into {ckpt.folder.name} ({fmt})", total=sum(ckpt.nbytes(k) for k in ckpt.keys))
        writer = ShardWriter(tmp, max_shard_size, metadata)
        for name in sorted(ckpt.quantized + ckpt.plain_keys()):
            is_4bit = name in quantized
            entries = ckpt.entries_of(name) if is_4bit else [name]
            if name in adapted:
                packed = ckpt.packed(name) if is_4bit else None
                w_deq = dequant(packed, DECODE_DTYPE) if is_4bit else ckpt.get(name)
                a, b, scale = adapted[name]
                # a projection the base keeps dense (--skip-modules) stays dense in either format
                group, cost = merge_weight(name, w_deq, a, b, scale, fmt if is_4bit else "bf16", packed)
                costs.append(cost)
            elif fmt == "nf4":  # untouched: the base's bytes as they are, once their state passes a loader's checks
                if is_4bit:
                    ckpt.packed(name, codes=False)
                group = {k: ckpt.get(k) for k in entries if k in ckpt.file_of}
            elif is_4bit:
                group = {name: dequant(ckpt.packed(name), DECODE_DTYPE)}
            else:
                t = ckpt.get(name)
                group = {name: t.to(DECODE_DTYPE) if t.is_floating_point() else t}
            writer.add_group(group)
            bar.advance(task, sum(ckpt.nbytes(k) for k in entries if k in ckpt.file_of))
        files = writer.close()
    for name in aux_files(ckpt.folder):
        if name != "config.json":
            shutil.copyfile(ckpt.folder / name, tmp / name)
    config = ckpt.config if fmt == "nf4" else plain_config(ckpt.config, "bfloat16")
    write_json(tmp / "config.json", config)
    return files, costs


def as_json(result: MergeResult) -> str:
    return json.dumps(result.as_dict(), indent=1)
