"""Triton, where it can run. It is a runtime dependency only on Linux (no wheels elsewhere) and is needed only
for CUDA tensors, so without it the kernels still import: each `@triton.jit` function becomes a stand-in
that raises `BackendError` when launched, and `use_triton` says so before any launch."""
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # macOS, Windows, or a minimal install: the CPU path needs no Triton
    HAS_TRITON = False

    class _Unavailable:
        """A `@triton.jit` kernel without Triton: launching it is an error, never a silent fallback."""

        def __init__(self, fn):
            self.__name__ = fn.__name__

        def __getitem__(self, grid):
            from ._dispatch import BackendError

            raise BackendError(f"{self.__name__} needs Triton, which is not installed (pip install triton)")

    class _Namespace:
        """`triton` / `triton.language` stand-ins: `jit` wraps, any other name (tl.constexpr) is inert."""

        jit = _Unavailable

        def __getattr__(self, name):
            return object

    triton = tl = _Namespace()

__all__ = ["HAS_TRITON", "tl", "triton"]
