"""The one dispatch rule: CUDA tensor -> Triton, CPU tensor -> the fastest exact CPU path (the compiled C
kernels of kernels/cpu/ where an op has one, else the torch twin). A CUDA tensor without Triton installed is a
BackendError; `backend="torch"` (or QLORA_KIT_BACKEND=torch) forces the twin.

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


def use_cpu_kernels(t: torch.Tensor, backend: str | None = None) -> bool:
    """True when `t` should go through the compiled CPU kernels (kernels/cpu/): a CPU tensor, backend auto,
    and the kernels built here (when they cannot be, kernels/cpu/_build.py has said so in one line)."""
    if use_triton(t, backend) or (backend or os.environ.get("QLORA_KIT_BACKEND", "auto")) == "torch":
        return False
    from .cpu import available

    return t.device.type == "cpu" and available()
