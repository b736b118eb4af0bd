"""Optimizer states in pinned host memory, streamed to the device page by page for the update.

A parameter's flat states are cut into pages of `page_size` elements. On CUDA, page i + 1 is copied
host -> device on a side stream while page i is updated on the compute stream, and each updated page is
copied back on the side stream once an event says its update is done (two device buffers per state,
reused across parameters; plain device allocations, never managed memory). On CPU the pages are views of
the host tensors and the update runs on them in place: the same arithmetic, no copies.
"""
from collections.abc import Callable

import torch

# (name, elements of this state per parameter element: 1 for per-element states, 1 / blocksize for absmax)
StateLayout = list[tuple[str, int]]


class PageStreamer:
    """Runs `update(lo, hi, states)` over the pages of host-resident states, overlapping copies with compute."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self._stream: torch.cuda.Stream | None = None
        self._buffers: dict[tuple[str, int, torch.dtype], torch.Tensor] = {}

    def synchronize(self) -> None:
        """Wait for outstanding write-backs, so host states can be read (state_dict, checkpoints)."""
        if self._stream is not None:
            self._stream.synchronize()

    def _buffer(self, name: str, slot: int, like: torch.Tensor, numel: int, device: torch.device) -> torch.Tensor:
        key = (name, slot, like.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=like.dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel]

    def run(self, numel: int, host: dict[str, torch.Tensor], divisors: dict[str, int], device: torch.device,
            update: Callable[[int, int, dict[str, torch.Tensor]], None]) -> None:
        """Call update(lo, hi, device_states) for each page [lo, hi) of the parameter's `numel` elements."""
        pages = [(lo, min(lo + self.page_size, numel)) for lo in range(0, numel, self.page_size)]

        def cut(name: str, t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            d = divisors[name]
            return t[lo // d: -(-hi // d)]

        if device.type != "cuda":
            for lo, hi in pages:
                update(lo, hi, {k: cut(k, t, lo, hi) for k, t in host.items()})
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        side, main = self._stream, torch.cuda.current_stream(device)
        ready = [torch.cuda.Event(), torch.cuda.Event()]
        done = [torch.cuda.Event(), torch.cuda.Event()]
        staged: list[dict[str, torch.Tensor]] = [{}, {}]

        def fetch(i: int) -> None:
            lo, hi = pages[i]
            slot = i % 2
            with torch.cuda.stream(side):
                bufs = {}
                for k, t in host.items():
                    src = cut(k, t, lo, hi)
                    bufs[k] = self._buffer(k, slot, t, src.numel(), device)
                    bufs[k].copy_(src, non_blocking=True)
                ready[slot].record(side)
            staged[slot] = bufs

        side.wait_stream(main)  # gradients for this step were produced on the compute stream
        fetch(0)
        for i, (lo, hi) in enumerate(pages):
            slot = i % 2
            if i + 1 < len(pages):
                fetch(i + 1)  # the side stream orders it after page i - 1's write-back from the same slot
            main.wait_event(ready[slot])
            update(lo, hi, staged[slot])
            done[slot].record(main)
            with torch.cuda.stream(side):
                side.wait_event(done[slot])
                for k, t in host.items():
                    cut(k, t, lo, hi).copy_(staged[slot][k], non_blocking=True)
        # No wait at the end: later fetches into these buffers queue behind the write-backs on the side
        # stream, and host readers call synchronize() first.
