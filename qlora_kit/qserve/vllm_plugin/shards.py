"""Cutting 4-bit weights into vLLM's tensor-parallel shards and gluing merged projections (no vLLM import).

A weight W (N, K) is stored flattened row-major in blocks of B elements (FORMAT.md §2.2), so a shard is a
plain slice of the packed codes and of the per-block absmax exactly when its edges fall on block edges:

    rows [r0, r1), all columns:  r0 * K and r1 * K multiples of B (r1 * K = N * K also allowed)
    columns [c0, c1), all rows:  K, c0 and c1 multiples of B

Anything else would need re-quantization (a different model), so it is an error naming the tensor, the
shard and the block size. Double-quantized absmax (groups of 256 blocks, one offset per tensor) is decoded to
fp32 for a cut, so every shard decodes to exactly the values of the unsplit weight.
"""
import torch

from qlora_kit.formats import Packed4bit, QuantState, decode_absmax

from .errors import ShardSplitError


def rank_slice(full: int, part: int, tp_rank: int, tp_size: int, what: str) -> tuple[int, int]:
    """The [start, stop) of `part` elements along a dimension of `full` that rank `tp_rank` of `tp_size` holds.

    `full // part` distinct shards exist; with fewer shards than ranks (vLLM replicates k/v heads when
    tp_size > num_kv_heads) neighbouring ranks share one, as vLLM's QKVParallelLinear does.
    """
    if part <= 0 or full % part:
        raise ShardSplitError(f"{what}: dimension {full} does not split into shards of {part} "
                              f"(tensor_parallel_size={tp_size})")
    index = tp_rank * (full // part) // tp_size
    return index * part, (index + 1) * part


def _flat_absmax(packed: Packed4bit) -> torch.Tensor:
    return decode_absmax(packed.state).float().contiguous()


def take(packed: Packed4bit, rows: tuple[int, int], cols: tuple[int, int], what: str) -> Packed4bit:
    """The sub-weight W[r0:r1, c0:c1] of a 2-d 4-bit weight, cut on block boundaries.

    Args:
        packed: the whole (N, K) weight.
        rows, cols: [start, stop) along N and K; one of them must cover its whole dimension.
        what: the tensor's name for messages.

    Returns:
        The shard; `packed` itself when it covers all of W, else with fp32 absmax and no nested state.

    Raises:
        ShardSplitError when the cut does not fall on block boundaries or the weight is not 2-d.
    """
    s = packed.state
    if len(s.shape) != 2:
        raise ShardSplitError(f"{what}: shape {s.shape} is not a 2-d linear weight")
    n, k = s.shape
    (r0, r1), (c0, c1), b = rows, cols, s.blocksize
    if not (0 <= r0 < r1 <= n and 0 <= c0 < c1 <= k):
        raise ShardSplitError(f"{what}: shard rows {rows} cols {cols} lie outside the weight {s.shape}")
    if (r0, r1, c0, c1) == (0, n, 0, k):
        return packed
    if (c0, c1) == (0, k):
        start, stop = r0 * k, r1 * k
        if start % b or (stop % b and stop != n * k):
            raise ShardSplitError(
                f"{what}: rows {r0}:{r1} of {s.shape} start or end inside a {b}-element quantization block "
                f"(row offsets * {k} must be multiples of {b}); use a tensor_parallel_size that keeps shards "
                "block-aligned, or re-convert with a smaller --blocksize")
        data = packed.data.reshape(-1)[start // 2: (stop + 1) // 2]
        absmax = _flat_absmax(packed)[start // b: -(-stop // b)]
    elif (r0, r1) == (0, n):
        if k % b or c0 % b or c1 % b:
            raise ShardSplitError(
                f"{what}: columns {c0}:{c1} of {s.shape} are not whole {b}-element quantization blocks "
                f"(in-features {k} and both column offsets must be multiples of {b}); use a tensor_parallel_size "
                "that keeps shards block-aligned, or re-convert with a smaller --blocksize")
        data = packed.data.reshape(n, k // 2)[:, c0 // 2: c1 // 2]
        absmax = _flat_absmax(packed).view(n, k // b)[:, c0 // b: c1 // b]
    else:
        raise ShardSplitError(f"{what}: a shard cuts rows {rows} and columns {cols} at once; vLLM splits one dim")
    state = QuantState(s.quant_type, b, (r1 - r0, c1 - c0), s.dtype, absmax.contiguous().view(-1), s.code, None)
    return Packed4bit(data.contiguous().view(-1, 1), state)


def concat_rows(parts: list[Packed4bit], what: str) -> Packed4bit:
    """Stack 4-bit weights along N into one (sum N_i, K) weight, e.g. q|k|v into vLLM's qkv_proj.

    Every part but the last must hold whole blocks, and all must share K, codebook and blocksize, so the
    packed codes and fp32 absmax simply concatenate. Raises ShardSplitError otherwise.
    """
    if len(parts) == 1:
        return parts[0]
    first = parts[0].state
    for i, p in enumerate(parts):
        s = p.state
        if (s.quant_type, s.blocksize, s.shape[1]) != (first.quant_type, first.blocksize, first.shape[1]) \
                or not torch.equal(s.code, first.code):
            raise ShardSplitError(f"{what}: part {i} ({s.quant_type}, blocksize {s.blocksize}, shape {s.shape}) "
                                  f"cannot be merged with part 0 ({first.quant_type}, {first.blocksize}, {first.shape})")
        if i < len(parts) - 1 and s.numel % s.blocksize:
            raise ShardSplitError(f"{what}: part {i} of shape {s.shape} ends inside a {s.blocksize}-element block; "
                                  "merged projections need block-aligned parts")
    data = torch.cat([p.data.reshape(-1) for p in parts]).view(-1, 1)
    absmax = torch.cat([_flat_absmax(p) for p in parts])
    rows = sum(p.state.shape[0] for p in parts)
    return Packed4bit(data, QuantState(first.quant_type, first.blocksize, (rows, first.shape[1]), first.dtype,
                                       absmax, first.code, None))
