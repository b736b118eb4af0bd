"""Triton kernel: 4-bit NF4/FP4 codes (+ double-quantized absmax) -> bf16 / fp16 / fp32.

Implements FORMAT.md §2.3:  W'_i = Q[code_i] * absmax_k,  k = i // B,  with, under double quant,
absmax_k = D[q_k] * s_{k // 256} + c.  Every product is rounded in fp32 before the cast (FMA
contraction is disabled), so the kernel equals the torch twin bit for bit.
"""
import torch

from qlora_kit.formats import Packed4bit

from ._checks import check_packed
from ._dispatch import use_cpu_kernels, use_triton
from ._triton import tl, triton
from .cpu import dequant_cpu, supports
from .ref.dequant import dequant_ref

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _load_absmax(
    absmax_ptr,  # fp32 [blocks], or uint8 [blocks] codes into nested_code when NESTED
    nested_absmax_ptr,  # fp32 [ceil(blocks / NESTED_BLOCKSIZE)]: s_m (read only when NESTED)
    nested_code_ptr,  # fp32 [256]: the dynamic map D (read only when NESTED)
    offset_ptr,  # fp32 0-d: c (read only when NESTED)
    block,  # block ids k, any shape
    mask,  # same shape as block: False where k is past the last block (absmax 0 there)
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
):
    """absmax_k in fp32: stored as is, or under double quant D[q_k] * s_{k // NESTED_BLOCKSIZE} + c (FORMAT.md §2.3).
    Shared by the dequant and fused-matmul kernels, so both decode a block's scale with the same fp32 ops."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = tl.load(nested_code_ptr + q) * scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def _dequant_kernel(
    data_ptr,  # uint8 [(n + 1) // 2]: byte j holds element 2j (high nibble) and 2j + 1 (low nibble)
    absmax_ptr,  # fp32 [blocks], or uint8 [blocks] codes into nested_code when NESTED
    code_ptr,  # fp32 [16]: the 4-bit codebook Q
    nested_absmax_ptr,  # fp32 [ceil(blocks / NESTED_BLOCKSIZE)]: s_m (read only when NESTED)
    nested_code_ptr,  # fp32 [256]: the dynamic map D (read only when NESTED)
    offset_ptr,  # fp32 0-d: c, added back to the decoded absmax (read only when NESTED; a pointer, so no host sync)
    out_ptr,  # bf16 / fp16 / fp32 [n], contiguous
    n,  # number of elements
    nbytes,  # (n + 1) // 2, passed rather than computed so Triton sees its divisibility and vectorizes the masked load
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    # Program p decodes bytes [p * BLOCK_BYTES, (p + 1) * BLOCK_BYTES), i.e. elements [2 p BLOCK_BYTES, ...): whole
    # quantization blocks (2 BLOCK_BYTES is a multiple of BLOCKSIZE), so each block's absmax is loaded once and
    # broadcast; bytes are read and elements written contiguously (128-bit accesses).
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    packed = tl.load(data_ptr + byte, mask=byte < nbytes, other=0).to(tl.int32)
    G: tl.constexpr = 2 * BLOCK_BYTES // BLOCKSIZE
    block = pid * G + tl.arange(0, G)
    bmask = block < (n + BLOCKSIZE - 1) // BLOCKSIZE
    absmax = _load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, bmask,
                          NESTED_BLOCKSIZE, NESTED)
    absmax = tl.reshape(tl.broadcast_to(absmax[:, None], (G, BLOCKSIZE // 2)), (BLOCK_BYTES,))
    high = tl.load(code_ptr + (packed >> 4)) * absmax
    low = tl.load(code_ptr + (packed & 0xF)) * absmax
    values = tl.interleave(high, low)
    index = pid * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
    if OUT_BF16:
        # fp32 -> bf16 rounding to nearest even, spelled out so the interpreter (which truncates) agrees
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        values = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < n)


def _config(blocksize: int) -> dict:
    """One launch shape for every tensor: 2 KiB of codes per program (16 B per thread at 4 warps), at least one
    whole quantization block (blocksize <= 4096 elements = 2 KiB)."""
    return {"BLOCK_BYTES": max(2048, blocksize // 2), "num_warps": 4}


def dequant(packed: Packed4bit, dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """Decode a 4-bit tensor to `dtype` (default: its original dtype).

    Args:
        packed: codes ((n + 1) // 2, 1) uint8 and their QuantState, all on one device.
        dtype: torch.bfloat16, torch.float16 or torch.float32.
        backend: None/"auto" (CUDA -> Triton, CPU -> the compiled C kernel, bit-exact with the twin), "torch"
            (the twin) or "triton" (see kernels/_dispatch.py).

    Returns:
        Tensor of the original shape in `dtype`.

    Raises:
        ValueError on a wrong dtype, device mix or size.
    """
    s = packed.state
    dtype = dtype or s.dtype
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dequant: output dtype {dtype} is not one of bf16, fp16, fp32")
    check_packed(packed, "dequant")
    data = packed.data
    if use_cpu_kernels(data, backend) and supports(packed):
        return dequant_cpu(packed, dtype)
    if not use_triton(data, backend):
        return dequant_ref(packed, dtype)
    out = torch.empty(s.shape, dtype=dtype, device=data.device)
    nest = s.nested
    cfg = _config(s.blocksize)
    grid = (triton.cdiv(data.numel(), cfg["BLOCK_BYTES"]),)
    _dequant_kernel[grid](
        data.reshape(-1).contiguous(), s.absmax.contiguous(), s.code,
        nest.absmax if nest else s.absmax, nest.code if nest else s.code,
        nest.offset if nest else s.code,
        out, s.numel, data.numel(),
        BLOCKSIZE=s.blocksize, NESTED_BLOCKSIZE=nest.blocksize if nest else 1, NESTED=nest is not None,
        OUT_BF16=dtype == torch.bfloat16,
        enable_fp_fusion=False, **cfg,
    )
    return out
