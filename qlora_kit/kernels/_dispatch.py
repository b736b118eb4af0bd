"""The one dispatch rule: CUDA tensor -> Triton, CPU tensor -> torch twin (a CUDA tensor without Triton installed
is a BackendError).

`backend="triton"` (or QLORA_KIT_BACKEND=triton) forces Triton on CPU tensors, which works under
TRITON_INTERPRET=1 (tests use it at small shapes). Asking for Triton where it cannot run is an
error, never a silent fallback.
"""
import os

import torch

from ._triton import HAS_TRITON

BACKENDS = ("auto", "torch", "triton")


class BackendError(RuntimeError):
    """A kernel backend that cannot run for these tensors."""


def use_triton(t: torch.Tensor, backend: str | None = None) -> bool:
    """True when `t` should go through the Triton kernel."""
    backend = backend or os.environ.get("QLORA_KIT_BACKEND", "auto")
    if backend not in BACKENDS:
        raise BackendError(f"backend={backend!r}: use one of {BACKENDS} (QLORA_KIT_BACKEND)")
    if backend == "torch":
        return False
    if t.is_cuda:
        if not HAS_TRITON:
            raise BackendError("CUDA tensors run the Triton kernels, and Triton is not installed (pip install triton)")
        from ._device import device_target

        device_target(t)  # cached per device; a BackendError below sm_80, before any launch
        return True
    if backend == "triton":
        if not HAS_TRITON:
            raise BackendError("backend='triton' needs Triton, which is not installed (pip install triton)")
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported")
        return True
    return False
