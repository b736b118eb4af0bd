"""`qconvert convert`: a Hugging Face checkpoint in, an NF4/FP4 checkpoint (FORMAT.md) out.

Tensors are streamed one at a time: read (memory-mapped), cast to the compute dtype, quantized in
chunks when they are linear weights (formats.layout.should_quantize, minus --skip-modules), and
appended to the current shard's section files (formats/shards.py). Peak memory is therefore about
one source tensor plus its quantization temporaries, not the model size. Everything is written
into a temporary folder beside OUT that is renamed to OUT only once complete (formats.io.atomic_dir),
so a failure or Ctrl-C leaves no OUT behind. Beside the weights go the source's config, tokenizer and
chat template and every licence/notice file (LICENSE*, LICENCE*, NOTICE*, USE_POLICY*, COPYING*), which
a republished model must carry; the source card's licence fields are recorded in the safetensors
metadata (`qlora_kit.source_license`) for the model card `publish` writes.
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit._cli.hub import aux_files
from qlora_kit._cli.options import check_out
from qlora_kit._cli.progress import byte_progress
from qlora_kit.formats import (ShardWriter, atomic_dir, quantization_config, quantize_4bit, should_quantize, spec,
                               to_entries, write_json)

from .licence import LICENSE_KEY, source_license
from .options import ConvertConfig
from .shapes import check_tensor_shapes
from .source import SourceWeights, read_config, resolve


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    files: list[Path]
    bytes_in: int
    bytes_out: int
    quantized: int
    kept: int


def converted_config(config: dict, cfg: ConvertConfig) -> dict:
    """config.json for the output: dtype set to the compute dtype and `quantization_config` added."""
    out = dict(config)
    out["dtype"] = cfg.compute_dtype
    if "torch_dtype" in out:
        out["torch_dtype"] = cfg.compute_dtype
    out["quantization_config"] = quantization_config(cfg.quant_type, cfg.double_quant, cfg.dtype,
                                                     list(cfg.skip_modules) or None)
    return dict(sorted(out.items()))


def convert_tensor(name: str, tensor: torch.Tensor, cfg: ConvertConfig) -> dict[str, torch.Tensor]:
    """The output entries of one source tensor: packed + state entries, or the tensor in the compute dtype."""
    tensor = tensor.to(cfg.dtype)
    if not should_quantize(name, tensor) or cfg.skips(name):
        return {name: tensor}
    packed = quantize_4bit(tensor.to(cfg.device), cfg.quant_type, cfg.blocksize, cfg.double_quant, name)
    return to_entries(name, packed.to("cpu"))


def convert(src: str, out: str | Path, cfg: ConvertConfig = ConvertConfig(), revision: str | None = None,
            token: str | None = None, progress: bool = True) -> ConvertResult:
    """Convert SRC (folder or Hub repo id) into a 4-bit checkpoint folder OUT.

    Raises:
        SourceNotFound, UnsupportedArchitecture, UnsupportedSourceDtype, FormatError (bad input);
        FileExistsError when OUT exists and cfg.overwrite is false; OSError when writing fails.
    """
    folder = resolve(src, revision, token)
    out = Path(out)
    check_out(out, folder)
    config = read_config(folder)
    weights = SourceWeights(folder)
    check_tensor_shapes(config, weights.infos, folder / "config.json")
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        files = _write(folder, out, weights, config, cfg, src, progress)
    finally:
        torch.set_num_threads(threads)
    return ConvertResult(out, files, weights.total_bytes, sum(f.stat().st_size for f in files),
                         *_counts(weights, cfg))


def _counts(weights: SourceWeights, cfg: ConvertConfig) -> tuple[int, int]:
    """(quantized, kept) tensor counts, from names and shapes alone."""
    quantized = sum(should_quantize(i.name, torch.empty(i.shape, device="meta")) and not cfg.skips(i.name)
                    for i in weights.infos)
    return quantized, len(weights.infos) - quantized


def _write(folder: Path, out: Path, weights: SourceWeights, config: dict, cfg: ConvertConfig, src: str,
           progress: bool) -> list[Path]:
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp, byte_progress(progress) as bar:
        task = bar.add_task(f"converting {folder.name}", total=weights.total_bytes)
        meta = {spec.SOURCE_KEY: str(src)}
        licence = source_license(folder)
        if licence:
            meta[LICENSE_KEY] = json.dumps(licence, sort_keys=True)
        writer = ShardWriter(tmp, cfg.max_shard_size, meta)
        for info, tensor in weights:
            entries = convert_tensor(info.name, tensor, cfg)
            writer.add_group(entries)
            del tensor, entries
            bar.advance(task, info.nbytes)
        files = writer.close()
        for name in aux_files(folder):
            if name != "config.json":
                shutil.copyfile(folder / name, tmp / name)
        write_json(tmp / "config.json", converted_config(config, cfg))
    return [out / f.name for f in files]
