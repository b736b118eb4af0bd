"""The per-tensor entries of a 4-bit checkpoint, exactly as transformers + bitsandbytes write them.

One quantized weight `W.weight` (FORMAT.md §2) becomes up to six safetensors entries:

    W.weight                                   U8   ((n + 1) // 2, 1)   packed codes
    W.weight.absmax                            F32  (blocks,)           or U8 when double-quantized
    W.weight.quant_map                         F32  (16,)               codebook Q
    W.weight.nested_absmax                     F32  (ceil(blocks/256),) double quant only
    W.weight.nested_quant_map                  F32  (256,)              double quant only
    W.weight.quant_state.bitsandbytes__<qt>    U8   (len,)              UTF-8 JSON, json.dumps default separators

and config.json gains the `quantization_config` that `quantization_config()` returns.
"""
import json
import math
from collections.abc import Mapping

import torch

from . import spec
from .codec import NestedAbsmax, Packed4bit, QuantState, check_blocksize, check_quant_type, decode_absmax
from .errors import CorruptQuantState, MissingTensor, ShapeMismatch, UnsupportedDtype


def encode_state_json(state: QuantState) -> bytes:
    """The quant_state blob: the non-tensor fields in bitsandbytes' key order, as UTF-8 JSON."""
    fields = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": spec.DTYPE_NAMES[state.dtype],
        "shape": list(state.shape),
    }
    if state.nested is not None:
        fields["nested_blocksize"] = state.nested.blocksize
        fields["nested_dtype"] = "float32"
        fields["nested_offset"] = state.nested.offset.item()
    return json.dumps(fields).encode("utf-8")


def to_entries(name: str, packed: Packed4bit) -> dict[str, torch.Tensor]:
    """Safetensors entries of one quantized weight; `name` is the weight's key, e.g. `...q_proj.weight`."""
    s = packed.state
    out = {name: packed.data, f"{name}.{spec.ABSMAX}": s.absmax, f"{name}.{spec.QUANT_MAP}": s.code}
    if s.nested is not None:
        out[f"{name}.{spec.NESTED_ABSMAX}"] = s.nested.absmax
        out[f"{name}.{spec.NESTED_QUANT_MAP}"] = s.nested.code
    blob = encode_state_json(s)
    out[f"{name}.{spec.QUANT_STATE_PREFIX}{s.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
    return out


def quantized_weight_names(keys) -> list[str]:
    """Names of the quantized weights among checkpoint keys (those with a quant_state blob)."""
    names = []
    for key in keys:
        for qt in spec.QUANT_TYPES:
            suffix = f".{spec.QUANT_STATE_PREFIX}{qt}"
            if key.endswith(suffix):
                names.append(key[: -len(suffix)])
    return names


def is_state_key(key: str) -> bool:
    """True for the companion entries of a quantized weight (everything but the packed codes)."""
    return any(key.endswith("." + suffix) for suffix in spec.STATE_SUFFIXES)


def decode_state_json(name: str, blob: torch.Tensor, quant_type: str) -> dict:
    """Parse and check a quant_state blob; every problem is a CorruptQuantState naming the tensor."""
    where = f"{name}.{spec.QUANT_STATE_PREFIX}{quant_type}"
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise CorruptQuantState(f"{where}: expected a 1-d uint8 JSON blob, got {blob.dtype} {tuple(blob.shape)}")
    if blob.numel() > spec.MAX_STATE_JSON_BYTES:
        raise CorruptQuantState(f"{where}: {blob.numel()} bytes is larger than {spec.MAX_STATE_JSON_BYTES}")
    try:
        fields = json.loads(bytes(blob.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptQuantState(f"{where}: not valid UTF-8 JSON ({e}); the blob is truncated or corrupt") from None
    if not isinstance(fields, dict):
        raise CorruptQuantState(f"{where}: JSON is a {type(fields).__name__}, expected an object")
    missing = [k for k in spec.STATE_KEYS if k not in fields]
    if missing:
        raise CorruptQuantState(f"{where}: missing key(s) {missing}")
    if fields["quant_type"] != quant_type:
        raise CorruptQuantState(f"{where}: quant_type {fields['quant_type']!r} disagrees with the entry name")
    if not isinstance(fields["dtype"], str) or fields["dtype"] not in spec.NAME_DTYPES:
        raise UnsupportedDtype(f"{where}: dtype {fields['dtype']!r:.60} is not one of {sorted(spec.NAME_DTYPES)}")
    shape = fields["shape"]
    if not isinstance(shape, list) or not shape or not all(_is_int(d) and d > 0 for d in shape):
        raise CorruptQuantState(f"{where}: shape {shape!r:.60} must be a non-empty list of positive integers")
    if not _is_int(fields["blocksize"]):
        raise CorruptQuantState(f"{where}: blocksize {fields['blocksize']!r:.60} is not an integer")
    check_blocksize(fields["blocksize"], where)
    nested = [k for k in spec.NESTED_STATE_KEYS if k in fields]
    if nested and len(nested) != len(spec.NESTED_STATE_KEYS):
        raise CorruptQuantState(f"{where}: incomplete double-quant fields {nested}")
    if nested:
        if fields["nested_dtype"] != "float32":
            raise CorruptQuantState(f"{where}: nested_dtype {fields['nested_dtype']!r} must be 'float32'")
        if not _is_int(fields["nested_blocksize"]) or fields["nested_blocksize"] not in spec.BLOCKSIZES:
            raise CorruptQuantState(f"{where}: nested_blocksize {fields['nested_blocksize']!r:.60} is invalid "
                                    f"(a power of two in 64..4096; bitsandbytes writes {spec.NESTED_BLOCKSIZE})")
        offset = fields["nested_offset"]
        if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
            raise CorruptQuantState(f"{where}: nested_offset {offset!r} is not a finite number")
    return fields


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_state_values(name: str, state: QuantState) -> None:
    """The values of a quant state that no loader may trust blindly: quant_map is the NF4/FP4 codebook and
    nested_quant_map the 8-bit dynamic map (|diff| <= 1e-6); absmax, decoded, is finite and >= 0.

    Raises:
        CorruptQuantState naming the entry.
    """
    if not torch.allclose(state.code.float().cpu(), spec.code_table(state.quant_type), rtol=0, atol=CODE_ATOL):
        raise CorruptQuantState(f"{name}.{spec.QUANT_MAP}: is not the {state.quant_type} codebook (corrupt)")
    if state.nested is not None:
        if not torch.allclose(state.nested.code.float().cpu(), _dynamic_map(), rtol=0, atol=CODE_ATOL):
            raise CorruptQuantState(f"{name}.{spec.NESTED_QUANT_MAP}: is not the 8-bit dynamic map (corrupt)")
        if not torch.isfinite(state.nested.absmax).all():
            raise CorruptQuantState(f"{name}.{spec.NESTED_ABSMAX}: holds NaN/Inf (corrupt)")
    absmax = decode_absmax(state)
    if not torch.isfinite(absmax).all() or (absmax < 0).any():
        raise CorruptQuantState(f"{name}.{spec.ABSMAX}: decoded absmax has NaN/Inf or negative values (corrupt)")


CODE_ATOL = 1e-6
_DYNAMIC: list[torch.Tensor] = []


def _dynamic_map() -> torch.Tensor:
    if not _DYNAMIC:
        _DYNAMIC.append(spec.dynamic_map())
    return _DYNAMIC[0]


def _get(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise MissingTensor(f"{key}: required by the quantized weight but absent from the checkpoint")
    return tensors[key]


def _expect(key: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ShapeMismatch(f"{key}: expected {dtype} {shape}, found {t.dtype} {tuple(t.shape)}")


def from_entries(name: str, tensors: Mapping[str, torch.Tensor]) -> Packed4bit:
    """Rebuild one quantized weight from checkpoint entries, checking every shape against the JSON and the
    state's values (check_state_values), so no corrupt state decodes to NaN or zero weights."""
    found = [qt for qt in spec.QUANT_TYPES if f"{name}.{spec.QUANT_STATE_PREFIX}{qt}" in tensors]
    if len(found) != 1:
        raise MissingTensor(f"{name}: expected exactly one quant_state.bitsandbytes__nf4|fp4 entry, found {len(found)}")
    quant_type = found[0]
    check_quant_type(quant_type, name)
    fields = decode_state_json(name, tensors[f"{name}.{spec.QUANT_STATE_PREFIX}{quant_type}"], quant_type)
    shape, blocksize = tuple(fields["shape"]), fields["blocksize"]
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    data = _get(tensors, name)
    _expect(name, data, torch.uint8, ((n + 1) // 2, 1))
    code = _get(tensors, f"{name}.{spec.QUANT_MAP}")
    _expect(f"{name}.{spec.QUANT_MAP}", code, torch.float32, (16,))
    absmax = _get(tensors, f"{name}.{spec.ABSMAX}")
    nested = None
    if "nested_offset" in fields:
        _expect(f"{name}.{spec.ABSMAX}", absmax, torch.uint8, (blocks,))
        nblocks = -(-blocks // fields["nested_blocksize"])
        nested_absmax = _get(tensors, f"{name}.{spec.NESTED_ABSMAX}")
        _expect(f"{name}.{spec.NESTED_ABSMAX}", nested_absmax, torch.float32, (nblocks,))
        nested_code = _get(tensors, f"{name}.{spec.NESTED_QUANT_MAP}")
        _expect(f"{name}.{spec.NESTED_QUANT_MAP}", nested_code, torch.float32, (256,))
        offset = torch.tensor(fields["nested_offset"], dtype=torch.float32, device=absmax.device)
        nested = NestedAbsmax(nested_absmax, nested_code, offset, fields["nested_blocksize"])
    else:
        _expect(f"{name}.{spec.ABSMAX}", absmax, torch.float32, (blocks,))
    state = QuantState(quant_type, blocksize, shape, spec.NAME_DTYPES[fields["dtype"]], absmax, code, nested)
    check_state_values(name, state)
    return Packed4bit(data, state)


def quantization_config(
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip_modules: list[str] | None = None,
) -> dict:
    """config.json's `quantization_config`, key for key what transformers writes for load_in_4bit."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": spec.DTYPE_NAMES[compute_dtype],
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def plain_config(config: dict, dtype: str | None = None) -> dict:
    """config.json of a decoded checkpoint: `quantization_config` dropped, `dtype` set when given."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    if dtype is not None:
        out["dtype"] = dtype
    return out


def should_quantize(name: str, tensor: torch.Tensor) -> bool:
    """The linear weights a 4-bit checkpoint stores packed: 2-d `*.weight` outside embeddings, head and norms."""
    if not name.endswith(".weight") or tensor.dim() != 2:
        return False
    module = name[: -len(".weight")]
    return not any(part in spec.NEVER_QUANTIZED or part.endswith("norm") for part in module.split("."))
