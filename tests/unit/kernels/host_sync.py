"""Catch device-to-host reads on CPU: every `.item()`, `float(t)`, `int(t)`, `bool(t)` and `.tolist()` of a tensor
goes through aten._local_scalar_dense (or a copy to a Python list), which on CUDA is a sync per call and is illegal
inside CUDA-graph capture. Running a wrapper's Triton path (interpreted) under `no_host_reads()` shows it has none."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class no_host_reads(TorchDispatchMode):
    """Raise AssertionError on the first op that needs a tensor's value on the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            raise AssertionError(f"host read of a tensor value: {func}")
        return func(*args, **(kwargs or {}))
