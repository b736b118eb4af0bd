"""Input checks shared by the 4-bit kernels' wrappers, run before dispatch so every backend raises the same
errors, and so the compiled and Triton kernels never read past a tensor that is shorter than its state says."""
import torch

from qlora_kit.formats import Packed4bit


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
