"""`qconvert dequantize`: a 4-bit checkpoint back to a plain Hugging Face checkpoint.

Each quantized weight is decoded with kernels.dequant (FORMAT.md §2.3: W'_i = Q[code_i] * absmax_k
in fp32, then cast) to its recorded dtype, or to `dtype` when given; plain tensors are copied (cast
to `dtype` when given). config.json loses `quantization_config`. Streamed and atomic like convert.
"""
import shutil
from pathlib import Path

from qlora_kit._cli.hub import aux_files
from qlora_kit._cli.options import check_out
from qlora_kit._cli.progress import byte_progress
from qlora_kit.formats import Checkpoint, ShardWriter, atomic_dir, plain_config, spec, write_json
from qlora_kit.kernels import dequant


def dequantize(path: str | Path, out: str | Path, dtype: str | None = None, max_shard_size: int = 5 * 10**9,
               overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Write the decoded checkpoint of PATH to OUT; return the shard paths.

    Raises:
        FormatError subclasses naming the tensor; FileExistsError when OUT exists and not `overwrite`.
    """
    out = Path(out)
    check_out(out, Path(path))
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    target = spec.NAME_DTYPES[dtype] if dtype else None
    with Checkpoint(path) as ckpt, atomic_dir(out, overwrite=overwrite) as tmp, byte_progress(progress) as bar:
        names = sorted(ckpt.quantized + ckpt.plain_keys())
        quantized = set(ckpt.quantized)
        task = bar.add_task(f"dequantizing {ckpt.folder.name}", total=sum(ckpt.nbytes(k) for k in ckpt.keys))
        writer = ShardWriter(tmp, max_shard_size, {spec.SOURCE_KEY: str(path)})
        for name in names:
            if name in quantized:
                packed = ckpt.packed(name)
                tensor = dequant(packed, target or packed.state.dtype)
            else:
                tensor = ckpt.get(name)
                if target is not None and tensor.is_floating_point():
                    tensor = tensor.to(target)
            writer.add_group({name: tensor})
            entries = ckpt.entries_of(name) if name in quantized else [name]
            bar.advance(task, sum(ckpt.nbytes(k) for k in entries if k in ckpt.file_of))
        files = writer.close()
        for name in aux_files(ckpt.folder):
            if name != "config.json":
                shutil.copyfile(ckpt.folder / name, tmp / name)
        write_json(tmp / "config.json", plain_config(ckpt.config, dtype))
    return [out / f.name for f in files]
