"""The constants of the 4-bit format: the one home of every number FORMAT.md states.

Codebooks:
  NF4 (QLoRA, Dettmers et al. 2023, sec. 3): 16 levels q_i placed at quantiles of N(0, 1),
      q = sort(ppf(linspace(0.9677083, 0.5, 9)[:-1]) ∪ {0} ∪ -ppf(linspace(0.9677083, 0.5, 8)[:-1])) / max.
      8 positive, 7 negative, an exact zero; index i is the 4-bit code (the table is sorted).
  FP4 (bitsandbytes' e2m1 variant): listed in code order 0..15; bit 3 is the sign, values / 12.
  DYNAMIC_8BIT (Dettmers 2015, "8-bit approximations for parallelism"): the signed 8-bit dynamic
      map used to double-quantize absmax; built by `dynamic_map()`.
"""
import math

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = tuple(2**k for k in range(6, 13))  # 64 .. 4096
DEFAULT_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
# Every dtype name a safetensors header may carry (FORMAT.md §1) and its torch dtype; the element size is the torch
# dtype's itemsize, so a tensor's data_offsets span st_nbytes(dtype, shape) bytes.
ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
             "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
             "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64,
             "U64": torch.uint64, "F64": torch.float64}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}

# Regenerate: python -c "from formats.spec import derive_nf4; print(derive_nf4().tolist())"
# (tests/unit/formats/test_spec.py checks this table against derive_nf4() and bitsandbytes).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# code:   0     1       2    3     4    5    6    7    8     9        10    11     12    13    14    15
FP4_CODE = tuple(
    v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                       -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
)

# Tensor-name suffixes of one quantized weight W (FORMAT.md §2). The packed codes are W.weight itself.
ABSMAX = "absmax"
QUANT_MAP = "quant_map"
NESTED_ABSMAX = "nested_absmax"
NESTED_QUANT_MAP = "nested_quant_map"
QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
STATE_SUFFIXES = (ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP) + tuple(
    QUANT_STATE_PREFIX + q for q in QUANT_TYPES
)
# JSON keys of the quant_state blob, in the order bitsandbytes writes them.
STATE_KEYS = ("quant_type", "blocksize", "dtype", "shape")
NESTED_STATE_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")
MAX_STATE_JSON_BYTES = 4096

# safetensors header metadata written by qlora-kit (string -> string).
METADATA_FORMAT = {"format": "pt"}
METADATA_VERSION_KEY = "qlora_kit.format_version"
FORMAT_VERSION = "1"
SOURCE_KEY = "qlora_kit.source"  # what `qconvert convert` (or dequantize) read, as given
# Provenance of a merged checkpoint (`qtrain merge`, FORMAT.md §1): what it was merged from, how and when.
MERGE_BASE_KEY = "qlora_kit.merge.base"  # the 4-bit checkpoint the adapter was merged into, as given
MERGE_BASE_SOURCE_KEY = "qlora_kit.merge.base_source"  # that checkpoint's own qlora_kit.source, when recorded
MERGE_ADAPTER_KEY = "qlora_kit.merge.adapter"  # the adapter folder, as given
MERGE_ADAPTER_CONFIG_KEY = "qlora_kit.merge.adapter_config_sha256"  # sha256 of its adapter_config.json bytes
MERGE_ADAPTER_WEIGHTS_KEY = "qlora_kit.merge.adapter_weights_sha256"  # sha256 of its adapter_model.safetensors
MERGE_FORMAT_KEY = "qlora_kit.merge.format"  # "bf16" or "nf4"
MERGE_DATE_KEY = "qlora_kit.merge.date"  # UTC, ISO 8601 to the second
MERGE_PREFIX = "qlora_kit.merge."

# Modules never quantized (FORMAT.md §3): embeddings, the LM head and every norm stay in the compute dtype.
NEVER_QUANTIZED = ("embed_tokens", "lm_head", "norm")


def st_nbytes(dtype: str, shape) -> int:
    """Bytes of a safetensors tensor: prod(shape) * the element size of `dtype` (a key of ST_DTYPES)."""
    return math.prod(shape) * ST_DTYPES[dtype].itemsize


def code_table(quant_type: str, device=None) -> torch.Tensor:
    """The 16-entry fp32 codebook of `quant_type`, indexed by the 4-bit code."""
    values = NF4_CODE if quant_type == "nf4" else FP4_CODE
    return torch.tensor(values, dtype=torch.float32, device=device)


def derive_nf4(offset: float = 0.9677083) -> torch.Tensor:
    """NF4 levels from the normal quantiles (QLoRA eq. 4): the source of NF4_CODE.

    Quantile points are spaced in fp32 (as published), the inverse CDF is taken in fp64, and the
    levels are rounded to fp32 and normalised by their maximum.
    """
    pos = torch.linspace(offset, 0.5, 9)[:-1].double()
    neg = torch.linspace(offset, 0.5, 8)[:-1].double()
    levels = torch.cat([torch.special.ndtri(pos), torch.zeros(1, dtype=torch.float64), -torch.special.ndtri(neg)])
    levels = levels.float().sort().values
    return levels / levels.max()


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed 8-bit dynamic quantization map (256 sorted fp32 values in [-1, 1]).

    Exponent e = 0..6 scales a linear fraction: level = 10^(e-6) * m, where m runs over the
    2^e midpoints of linspace(0.1, 1, 2^e + 1); each level appears with both signs, and 0 and 1
    complete the 256 entries.
    """
    non_sign_bits = total_bits - 1
    values: list[float] = []
    for e in range(max_exponent_bits):
        edges = torch.linspace(0.1, 1, 2 ** (e + non_sign_bits - max_exponent_bits) + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (-(max_exponent_bits - 1) + e)) * mids
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)
