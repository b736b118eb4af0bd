"""Conversion settings: one frozen dataclass, validated once; the CLI only overrides its defaults."""
import re
from dataclasses import dataclass

import torch

from qlora_kit._cli.options import parse_size  # noqa: F401  (qconvert's public name; also used by qtrain merge)
from qlora_kit.formats import spec

from .errors import InvalidOption

# verify's per-tensor threshold: on SmolLM2 NF4 gives 19.8-21 dB and FP4 16.6-18 dB (`qconvert report`).
DEFAULT_MIN_SQNR_DB = 15.0


@dataclass(frozen=True, slots=True)
class ConvertConfig:
    """How `convert` quantizes and writes.

    Floating tensors are first cast to `compute_dtype` (as from_pretrained(dtype=compute_dtype) does),
    then the linear weights are quantized; everything else is stored in `compute_dtype`.
    """

    quant_type: str = "nf4"
    blocksize: int = spec.DEFAULT_BLOCKSIZE
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    skip_modules: tuple[str, ...] = ()
    device: str = "cpu"
    max_shard_size: int = 5 * 10**9
    overwrite: bool = False
    # Intra-op CPU threads while converting. The quantizer works on 64 Ki-element chunks, which gain
    # little from more threads, and OpenMP spin-waits badly on a busy machine (measured on a shared
    # 2-core box: 17.8 s CPU with 2 threads vs 4.7 s with 1 for SmolLM2).
    threads: int = 1

    def __post_init__(self):
        if self.quant_type not in spec.QUANT_TYPES:
            raise InvalidOption(f"--quant-type {self.quant_type!r}: use one of {', '.join(spec.QUANT_TYPES)}")
        if self.blocksize not in spec.BLOCKSIZES:
            raise InvalidOption(f"--blocksize {self.blocksize}: use a power of two in 64..4096")
        if self.compute_dtype not in spec.NAME_DTYPES:
            raise InvalidOption(f"--compute-dtype {self.compute_dtype!r}: use float32, float16 or bfloat16")
        if self.device not in ("cpu", "cuda"):
            raise InvalidOption(f"--device {self.device!r}: use cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise InvalidOption("--device cuda: no CUDA device is visible; use --device cpu")
        if self.threads < 1:
            raise InvalidOption(f"--threads {self.threads}: must be at least 1")
        if self.max_shard_size <= 0:
            raise InvalidOption(f"--max-shard-size {self.max_shard_size}: must be positive")
        for s in self.skip_modules:
            if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", s):
                raise InvalidOption(f"--skip-modules entry {s!r}: expected a dotted module name such as mlp.down_proj")

    @property
    def dtype(self) -> torch.dtype:
        return spec.NAME_DTYPES[self.compute_dtype]

    def skips(self, weight_name: str) -> bool:
        """True when the module owning `weight_name` matches a --skip-modules entry (whole dotted parts)."""
        module = "." + weight_name.rsplit(".", 1)[0] + "."
        return any(f".{s}." in module for s in self.skip_modules)
