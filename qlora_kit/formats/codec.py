"""Blockwise 4-bit quantization with double-quantized absmax (QLoRA sec. 3), in plain torch.

For a weight W with n elements, flattened row-major, and blocksize B (blocks k = 0 .. ceil(n/B)-1):

    absmax_k = max_{i in block k} |W_i|                                  (fp32)
    x_i      = clamp(W_i * (1 / max(absmax_k, 1e-38)), -1, 1)            (fp32)
    code_i   = argmin_j |x_i - Q_j|   ties to the lower level            (Q = NF4 or FP4 codebook)
    byte_j   = code_{2j} << 4 | code_{2j+1}                              (element 2j in the high nibble)
    W'_i     = Q[code_i] * absmax_k                                      (fp32, then cast to dtype)

Double quantization of absmax (blocks of 256, signed 8-bit dynamic map D):

    c        = mean(absmax)                                              (nested_offset)
    a_k      = absmax_k - c
    s_m      = max_{k in block m} |a_k|                                  (nested_absmax, fp32)
    q_k      = argmin_j |a_k / s_m - D_j|                                (absmax, uint8)
    absmax'_k = D[q_k] * s_m + c

These are bitsandbytes' definitions; the quirks it has (a final partial block's stored absmax is
clamped to 1e-38, divided rather than multiplied by its reciprocal; an odd element count pads with
the code of 0) are reproduced so that our bytes equal theirs. FORMAT.md states them normatively.
"""
import math
from dataclasses import dataclass

import torch

from . import spec
from .errors import NonFiniteWeight, ShapeMismatch, UnsupportedBlocksize, UnsupportedDtype, UnsupportedQuantType

_TINY = 1e-38


@dataclass(frozen=True)
class NestedAbsmax:
    """The second level of double quantization: how to decode the uint8 absmax codes."""

    absmax: torch.Tensor  # (ceil(blocks / blocksize),) fp32: s_m
    code: torch.Tensor  # (256,) fp32: the dynamic map D
    offset: torch.Tensor  # () fp32: c, the mean subtracted before quantizing
    blocksize: int = spec.NESTED_BLOCKSIZE


@dataclass(frozen=True)
class QuantState:
    """Everything besides the packed codes that is needed to decode one 4-bit tensor."""

    quant_type: str  # "nf4" | "fp4"
    blocksize: int
    shape: tuple[int, ...]  # shape of the original weight
    dtype: torch.dtype  # dtype of the original weight (and the default decode dtype)
    absmax: torch.Tensor  # (blocks,) fp32, or uint8 codes when `nested` is set
    code: torch.Tensor  # (16,) fp32 codebook Q
    nested: NestedAbsmax | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)


@dataclass(frozen=True)
class Packed4bit:
    """A quantized tensor: `data` holds two 4-bit codes per byte, shape ((n + 1) // 2, 1), uint8."""

    data: torch.Tensor
    state: QuantState

    def to(self, device) -> "Packed4bit":
        s = self.state
        nested = s.nested and NestedAbsmax(
            s.nested.absmax.to(device), s.nested.code.to(device), s.nested.offset.to(device), s.nested.blocksize
        )
        state = QuantState(s.quant_type, s.blocksize, s.shape, s.dtype, s.absmax.to(device), s.code.to(device), nested)
        return Packed4bit(self.data.to(device), state)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor that goes to disk (the JSON blob excluded)."""
        s = self.state
        total = self.data.nbytes + s.absmax.nbytes + s.code.nbytes
        if s.nested is not None:
            total += s.nested.absmax.nbytes + s.nested.code.nbytes
        return total


def check_blocksize(blocksize: int, name: str = "tensor") -> None:
    if blocksize not in spec.BLOCKSIZES:
        raise UnsupportedBlocksize(f"{name}: blocksize={blocksize} is not supported; use a power of two in 64..4096")


def check_quant_type(quant_type: str, name: str = "tensor") -> None:
    if quant_type not in spec.QUANT_TYPES:
        raise UnsupportedQuantType(f"{name}: quant_type={quant_type!r} is not supported; use 'nf4' or 'fp4'")


def _sorted_levels(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between consecutive sorted levels, and the sort order (identity for NF4)."""
    order = torch.argsort(code, stable=True)
    levels = code[order]
    return (levels[:-1] + levels[1:]) / 2, order


def _blockwise_scale(flat: torch.Tensor, blocksize: int, clamp_tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1] (fp32 in, fp32 out)."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_max = tail.abs().max()
        tail_div = tail_max.clamp(min=_TINY)
        absmax = torch.cat([absmax, (tail_div if clamp_tail else tail_max).reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(tail / tail_div, -1, 1)])
    return absmax, scaled


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = spec.NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level 8-bit dynamic quantization of a 1-d fp32 tensor: (uint8 codes, fp32 absmax per block)."""
    absmax, scaled = _blockwise_scale(x.reshape(-1).float(), blocksize, clamp_tail=False)
    bounds, _ = _sorted_levels(spec.dynamic_map().to(x.device))
    return torch.bucketize(scaled, bounds).to(torch.uint8), absmax


CHUNK_ELEMS = 1 << 16  # whole blocks per pass: ~10 bytes of temporaries each, an fp32 chunk stays in L2


def _codes(scaled: torch.Tensor, bounds: list[float], order: torch.Tensor | None) -> torch.Tensor:
    """The level index of each scaled value: torch.bucketize(scaled, bounds) (ties to the lower level), computed
    as the count of bounds strictly below it (15 comparisons on a cache-sized chunk, ~2x faster on CPU), mapped
    back through the sort order for an unsorted codebook (FP4)."""
    codes = (scaled > bounds[0]).to(torch.uint8)
    for b in bounds[1:]:
        codes += scaled > b
    return codes if order is None else order[codes.long()]


def _non_finite(flat: torch.Tensor, name: str) -> NonFiniteWeight:
    bad = (~torch.isfinite(flat)).sum().item()
    return NonFiniteWeight(f"{name}: {bad} NaN/Inf value(s) in the weight; fix the checkpoint before quantizing")


def quantize_4bit(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = spec.DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    name: str = "tensor",
    chunk_elems: int = CHUNK_ELEMS,
) -> Packed4bit:
    """Quantize `weight` blockwise to 4-bit codes (see the module docstring for the math).

    Whole blocks are coded a chunk at a time (blocks are independent, so the bytes equal a whole-tensor
    pass), which bounds the temporaries whatever the tensor's size; the final partial block follows the
    tail rules; double quantization runs once over all the absmax (it needs their mean).

    Args:
        weight: (...) fp32, fp16 or bf16 tensor on any device.
        quant_type: "nf4" or "fp4".
        blocksize: a power of two from 64 to 4096.
        double_quant: quantize absmax again to 8 bits in blocks of 256.
        name: tensor name used in error messages.
        chunk_elems: elements per pass, rounded down to whole blocks (at least one).

    Returns:
        Packed4bit with data ((n + 1) // 2, 1) uint8.

    Raises:
        UnsupportedDtype, UnsupportedBlocksize, UnsupportedQuantType, NonFiniteWeight, ShapeMismatch.
    """
    if weight.dtype not in spec.WEIGHT_DTYPES:
        raise UnsupportedDtype(f"{name}: dtype {weight.dtype} cannot be quantized; use float32, float16 or bfloat16")
    check_blocksize(blocksize, name)
    check_quant_type(quant_type, name)
    if weight.numel() == 0:
        raise ShapeMismatch(f"{name}: empty tensor of shape {tuple(weight.shape)} cannot be quantized")
    flat = weight.reshape(-1)
    n = flat.numel()
    code = spec.code_table(quant_type, weight.device)
    midpoints, order = _sorted_levels(code)
    bounds = midpoints.tolist()  # fp32 values; each comparison converts them back exactly
    order = None if torch.equal(order, torch.arange(16, device=order.device)) else order.to(torch.uint8)
    step = max(chunk_elems // blocksize, 1) * blocksize
    full = n - n % blocksize
    codes, absmaxes = [], []
    for start in range(0, full, step):
        body = flat[start:min(start + step, full)].float().view(-1, blocksize)
        absmax = body.abs().amax(dim=1)
        if not torch.isfinite(absmax).all():
            raise _non_finite(flat, name)
        scaled = torch.clamp(body * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1), -1, 1).reshape(-1)
        codes.append(_codes(scaled, bounds, order))
        absmaxes.append(absmax)
    if full < n:
        tail = flat[full:].float()
        if not torch.isfinite(tail).all():
            raise _non_finite(flat, name)
        divisor = tail.abs().max().clamp(min=_TINY)  # the stored tail absmax is clamped too (bitsandbytes)
        scaled = torch.clamp(tail / divisor, -1, 1)
        if scaled.numel() % 2:  # an odd count pads the last byte with the code of 0
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        codes.append(_codes(scaled, bounds, order))
        absmaxes.append(divisor.reshape(1))
    codes, absmax = torch.cat(codes), torch.cat(absmaxes)
    data = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)

    nested = None
    if double_quant:
        offset = absmax.mean()
        qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset)
        nested = NestedAbsmax(nested_absmax, spec.dynamic_map().to(weight.device), offset)
        absmax = qabsmax
    state = QuantState(quant_type, blocksize, tuple(weight.shape), weight.dtype, absmax, code, nested)
    return Packed4bit(data, state)


def decode_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 absmax per block: stored as is, or D[q_k] * s_m + c when double-quantized."""
    if state.nested is None:
        return state.absmax.float()
    nest = state.nested
    scale = nest.absmax.repeat_interleave(nest.blocksize)[: state.absmax.numel()]
    return nest.code[state.absmax.long()] * scale + nest.offset


def unpack_codes(data: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit codes as int64, element 2j from the high nibble of byte j."""
    flat = data.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:numel].long()


def dequantize_4bit(packed: Packed4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode to `dtype` (default: the original dtype): W'_i = Q[code_i] * absmax_k in fp32, then cast.

    Byte j is decoded in one lookup into a 256 x 2 table of (Q[j >> 4], Q[j & 15]) pairs.
    """
    s = packed.state
    pairs = torch.stack([s.code.repeat_interleave(16), s.code.repeat(16)], dim=1)
    values = pairs.index_select(0, packed.data.reshape(-1).int()).view(-1)[: s.numel]
    absmax = decode_absmax(s)
    full = s.numel - s.numel % s.blocksize
    values[:full].view(-1, s.blocksize).mul_(absmax[: full // s.blocksize].unsqueeze(1))
    if full < s.numel:
        values[full:].mul_(absmax[-1])
    return values.view(s.shape).to(dtype or s.dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum x^2 / sum (x - x')^2) in dB (inf when exact)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf
