"""Resolve SRC (a local folder or a Hub repo id) and read its weights one tensor at a time.

Weights are taken, in this order of preference, from model.safetensors.index.json (shards),
model.safetensors, pytorch_model.bin.index.json or pytorch_model.bin. Safetensors headers are
checked against the file sizes (formats.io.read_header) before anything is converted; .bin files
are opened with torch.load(weights_only=True, mmap=True), so no pickle code runs and tensors stay
on disk until read. Safetensors tensors are read with plain reads into a fresh buffer rather than
through a memory map: mapped pages would stay resident (and counted in RSS) for as long as the file is
open, so memory would grow with the file instead of with the largest tensor.
"""
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kit._cli.hub import REPO_ID_PATTERN, CheckpointNotFound, resolve_checkpoint
from qlora_kit.formats import FormatError, index_shards, read_header, read_json_object, spec

from .errors import SourceNotFound, UnsupportedArchitecture, UnsupportedSourceDtype
from .shapes import check_shapes_config

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
FLOAT_DTYPES = {name: spec.ST_DTYPES[name] for name in ("F32", "F16", "BF16")}  # the dtypes qconvert converts


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int = 0  # absolute file offset of the first byte (safetensors only)

    @property
    def nbytes(self) -> int:
        return spec.st_nbytes(self.dtype, self.shape)


def resolve(src: str, revision: str | None = None, token: str | None = None) -> Path:
    """A local folder as is, or a Hub repo id fetched through the HF cache (qlora_kit._cli.hub; HF_HUB_OFFLINE
    is honoured).

    Raises:
        SourceNotFound: neither a folder nor a fetchable (offline: cached) repo.
    """
    try:
        return resolve_checkpoint(src, revision, token)
    except CheckpointNotFound as e:
        raise SourceNotFound(str(e)) from None


def read_config(folder: Path) -> dict:
    """config.json, checked to be a Llama-family model that is not already quantized."""
    path = folder / "config.json"
    if not path.is_file():
        raise SourceNotFound(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    config = read_json_object(path)
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise FormatError(f"{path}: architectures={archs!r:.100} must be a list of class names")
    if not isinstance(model_type, str) or model_type not in LLAMA_FAMILY or any(a not in ARCHITECTURES for a in archs):
        raise UnsupportedArchitecture(f"{path}: model_type={model_type!r} architectures={archs} is not supported; "
                                      f"qconvert handles {', '.join(LLAMA_FAMILY)} ({', '.join(ARCHITECTURES)})")
    if "quantization_config" in config:
        qc = config["quantization_config"]
        if not isinstance(qc, dict):
            raise FormatError(f"{path}: quantization_config={qc!r:.60} must be an object")
        method = qc.get("quant_method", "?")
        raise UnsupportedSourceDtype(f"{path}: the source is already quantized (quant_method={method!r}); "
                                     f"convert needs a float32/float16/bfloat16 checkpoint")
    check_shapes_config(config, path)
    return config


def _index_files(folder: Path, index_name: str) -> list[Path]:
    index = folder / index_name
    files = sorted(set(index_shards(index).values()))  # confined to the folder
    for f in files:
        if not f.is_file():
            raise FormatError(f"{index}: names shard {f.name}, which is missing")
    return files


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, safetensors preferred over .bin."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            return _index_files(folder, index)
        if (folder / single).is_file():
            return [folder / single]
    raise SourceNotFound(f"{folder}: no model.safetensors, pytorch_model.bin or shard index")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types on corrupt files (UnpicklingError, RuntimeError, EOFError)
        raise FormatError(f"{path}: cannot be read as a PyTorch weights file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(f"{path}: expected a dict of tensors")
    return state


def _read(f, info: TensorInfo) -> torch.Tensor:
    """One tensor read into its own buffer (offsets were checked against the file size by read_header)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    f.seek(info.offset)
    if f.readinto(memoryview(buf.numpy())) != info.nbytes:
        raise FormatError(f"{info.file}: tensor {info.name}: file ended early (truncated while reading?)")
    return buf.view(FLOAT_DTYPES[info.dtype]).reshape(info.shape)


class SourceWeights:
    """The tensors of a checkpoint folder: headers read and checked up front, data read lazily."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = weight_files(folder)
        self.infos: list[TensorInfo] = []
        seen: dict[str, Path] = {}
        for file in self.files:
            if file.suffix == ".safetensors":
                header = read_header(file)
                with open(file, "rb") as f:
                    start = 8 + int.from_bytes(f.read(8), "little")
                items = [(k, v["dtype"], tuple(v["shape"]), start + v["data_offsets"][0])
                         for k, v in header.items() if k != "__metadata__"]
            else:
                items = [(k, spec.ST_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape), 0)
                         for k, t in _load_bin(file).items()]
            for name, dtype, shape, offset in sorted(items):
                if name in seen:
                    raise FormatError(f"{file}: tensor {name} also appears in {seen[name].name}")
                seen[name] = file
                if dtype not in FLOAT_DTYPES:
                    raise UnsupportedSourceDtype(f"{file}: tensor {name} has dtype {dtype}; qconvert converts "
                                                 f"float32, float16 and bfloat16 checkpoints only")
                self.infos.append(TensorInfo(name, file, dtype, shape, offset))

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos)

    def __iter__(self) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """(info, tensor) pairs, one file open at a time, one tensor in memory at a time."""
        by_file: dict[Path, list[TensorInfo]] = {}
        for info in self.infos:
            by_file.setdefault(info.file, []).append(info)
        for file, infos in by_file.items():
            if file.suffix == ".safetensors":
                with open(file, "rb") as f:
                    for info in infos:
                        yield info, _read(f, info)
            else:
                state = _load_bin(file)
                for info in infos:
                    yield info, state.pop(info.name)
                del state
