"""Quantize one weight in row chunks so temporaries stay a fixed size, with bytes identical to
formats.codec.quantize_4bit on the whole tensor.

Why this is exact: blockwise quantization treats each block of B elements independently, so the
codes and fp32 absmax of a chunk of k*B elements (k*B even) equal that slice of the whole-tensor
result; only the last chunk holds the partial tail block, where the codec's tail rule applies as
before. Double quantization needs the mean of *all* absmax (nested_offset c), so it runs once on
the concatenated fp32 absmax, exactly as quantize_4bit does:  q = Q8(absmax - mean(absmax)).
The codec's temporaries are ~10 bytes per element (fp32 copy, scaled values, int64 bucket ids);
chunking caps them at ~10 * CHUNK_ELEMS bytes whatever the tensor size.
"""
import torch

from formats import NestedAbsmax, Packed4bit, QuantState, quantize_4bit, quantize_blockwise_8bit, spec

CHUNK_ELEMS = 1 << 22  # 4 Mi elements: ~40 MiB of temporaries


def quantize_chunked(weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool, name: str,
                     chunk_elems: int = CHUNK_ELEMS) -> Packed4bit:
    """Same result as quantize_4bit(weight, ...), computed chunk by chunk.

    Args:
        weight: (...) fp32/fp16/bf16 tensor on any device.
        chunk_elems: elements per chunk; rounded down to a multiple of the blocksize (at least one block).

    Raises:
        The codec's errors (UnsupportedDtype, NonFiniteWeight, ...), naming `name`.
    """
    n = weight.numel()
    step = max(chunk_elems // blocksize, 1) * blocksize
    if n <= step:
        return quantize_4bit(weight, quant_type, blocksize, double_quant, name=name)
    flat = weight.reshape(-1)
    datas, absmaxes = [], []
    for start in range(0, n, step):
        part = quantize_4bit(flat[start:start + step], quant_type, blocksize, False, name=name)
        datas.append(part.data)
        absmaxes.append(part.state.absmax)
    data = torch.cat(datas)
    absmax = torch.cat(absmaxes)
    code = spec.code_table(quant_type, weight.device)
    nested = None
    if double_quant:
        offset = absmax.mean()
        absmax, nested_absmax = quantize_blockwise_8bit(absmax - offset)
        nested = NestedAbsmax(nested_absmax, spec.dynamic_map().to(weight.device), offset)
    state = QuantState(quant_type, blocksize, tuple(weight.shape), weight.dtype, absmax, code, nested)
    return Packed4bit(data, state)
