"""Shared timing for bench/ scripts: median and 20/80 quantiles of repeated calls (Triton do_bench on CUDA)."""
import statistics
import time

import torch


def measure(fn, warmup: int = 3, reps: int = 20) -> tuple[float, float, float]:
    """Seconds per call of `fn`: (median, q20, q80)."""
    if torch.cuda.is_available():
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return tuple(m / 1e3 for m in ms)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7]
