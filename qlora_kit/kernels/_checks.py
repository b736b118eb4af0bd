"""Input checks shared by the kernels' wrappers and their torch twins, so every backend raises the same errors,
and so the compiled and Triton kernels never read past a tensor that is shorter than its state says."""
import torch

from qlora_kit.formats import Packed4bit, spec


def check_packed(packed: Packed4bit, op: str) -> None:
    """Raise ValueError unless `packed`'s tensors have the sizes, dtypes and device its QuantState implies."""
    s, data, nest = packed.state, packed.data, packed.state.nested
    if data.dtype != torch.uint8 or data.numel() != (s.numel + 1) // 2:
        raise ValueError(f"{op}: packed data {data.dtype} {tuple(data.shape)} does not hold {s.numel} codes")
    if s.code.numel() != 16 or not s.code.is_floating_point():
        raise ValueError(f"{op}: codebook {s.code.dtype} {tuple(s.code.shape)} is not 16 floats")
    want = torch.uint8 if nest else torch.float32
    if s.absmax.numel() != s.num_blocks or s.absmax.dtype != want:
        raise ValueError(f"{op}: absmax {s.absmax.dtype} {tuple(s.absmax.shape)} does not hold {s.num_blocks} "
                         f"{'uint8 codes' if nest else 'fp32 scales'} for blocksize {s.blocksize}")
    devices = {data.device, s.absmax.device, s.code.device}
    if nest is not None:
        groups = -(-s.num_blocks // nest.blocksize)
        if nest.absmax.numel() != groups or nest.code.numel() != 256 or nest.offset.numel() != 1:
            raise ValueError(f"{op}: nested absmax {tuple(nest.absmax.shape)} / code {tuple(nest.code.shape)} / "
                             f"offset {tuple(nest.offset.shape)} do not fit {s.num_blocks} blocks of "
                             f"{nest.blocksize} (want {groups}, 256, 1)")
        devices |= {nest.absmax.device, nest.code.device, nest.offset.device}
    if len(devices) != 1:
        raise ValueError(f"{op}: codes, absmax and codebook must be on one device")


def check_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                        chunk_size: int, reduction: str) -> None:
    """Raise ValueError unless chunked_cross_entropy's inputs fit: hidden (..., H) and head (V, H) of one float
    dtype, labels (...) in [0, V) or ignore_index, all on one device, chunk_size >= 1, reduction mean or sum."""
    op = "chunked_cross_entropy"
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{op}: reduction={reduction!r}; use 'mean' or 'sum'")
    if chunk_size < 1:
        raise ValueError(f"{op}: chunk_size={chunk_size} must be >= 1")
    if hidden.dtype not in spec.WEIGHT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"{op}: hidden {hidden.dtype} and head {weight.dtype} must be one of bf16, fp16, fp32")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{op}: hidden {tuple(hidden.shape)}, head {tuple(weight.shape)} and labels "
                         f"{tuple(labels.shape)} do not fit")
    if weight.device != hidden.device or labels.device != hidden.device:
        raise ValueError(f"{op}: hidden, head and labels must be on one device")
    vocab = weight.shape[0]
    if bool((((labels < 0) & (labels != ignore_index)) | (labels >= vocab)).any()):
        raise ValueError(f"{op}: labels outside [0, {vocab}) that are not ignore_index={ignore_index}")
