"""The one dispatch rule: CUDA tensor -> Triton, CPU tensor -> torch twin.

`backend="triton"` (or QLORA_KIT_BACKEND=triton) forces Triton on CPU tensors, which works under
TRITON_INTERPRET=1 (tests use it at small shapes). Asking for Triton where it cannot run is an
error, never a silent fallback.
"""
import os

import torch

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
        return True
    if backend == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported")
        return True
    return False
