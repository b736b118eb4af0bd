"""What a CUDA device can hold, queried once per device: the per-kernel config functions size tiles and
pipeline stages from it, and the compile-only test (tests/unit/kernels/test_compile_cuda.py) feeds them the
same `Target` for sm_90 and sm_80 without a GPU.

Limits (CUDA C Programming Guide, "Technical Specifications per Compute Capability"): the opt-in shared memory
per block is 227 KiB = 232,448 B on sm_90 (H100/H200) and 163 KiB = 166,912 B on sm_80 (A100).
"""
import functools
from dataclasses import dataclass

import torch

from ._dispatch import BackendError

MIN_CAPABILITY = 80  # bf16 tensor-core dot and cp.async pipelining need sm_80


@dataclass(frozen=True, slots=True)
class Target:
    """One CUDA device's limits: compute capability (major * 10 + minor), opt-in shared memory per block, SMs."""

    capability: int
    shared_bytes: int
    sms: int


# The two targets CI compiles for; dispatch on a real device uses the device's own figures.
H100 = Target(90, 232_448, 132)
A100 = Target(80, 166_912, 108)


@functools.lru_cache(maxsize=None)
def _query(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    cap = props.major * 10 + props.minor
    if cap < MIN_CAPABILITY:
        raise BackendError(f"CUDA device {index} ({props.name}, sm_{cap}) is below sm_{MIN_CAPABILITY}: the Triton "
                           f"kernels need bf16 tensor cores and cp.async; use backend='torch'")
    return Target(cap, props.shared_memory_per_block_optin, props.multi_processor_count)


def device_target(t: torch.Tensor) -> Target:
    """The `Target` of `t`'s CUDA device (cached: no query per call); raises BackendError below sm_80."""
    return _query(t.device.index if t.device.index is not None else torch.cuda.current_device())

