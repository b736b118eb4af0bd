"""The one timing helper of bench/: pinned threads, ours and the peer interleaved, median and spread, a verdict.

Every bench states the same things in the same words:
- threads: `pin_threads(n)` sets torch's intra-op threads in this process (when it imports torch) and
  OMP_NUM_THREADS / MKL_NUM_THREADS for every child process, so ours and the peer run with the same count;
  `threads_line()` prints it.
- order: `interleave({"ours": f, "peer": g}, reps)` calls f g f g ... (A B A B), so slow drift of a shared
  machine's load falls on both sides alike; the call order is kept in `Runs.order`.
- outlier rule (OUTLIER_RULE): a sample more than OUTLIER_FACTOR x its side's median, or under
  1 / OUTLIER_FACTOR of it, is counted and left out of the spread; the median is taken over all samples.
- spread: min and max of the kept samples (and of the per-pair ratios ours vs peer).
- verdict: the ratio of medians, and "noisy" when the per-pair ratio spread reaches 1 (the spread overlaps
  the ratio's distance from 1), so a reader never takes a coin flip for a speed-up.
- load: `load_line("before")` / `load_line("after")` print the 1/5/15-minute load average.

`measure(fn)` keeps the older single-side call (median, q20, q80) for bench_kernels.py.
This module imports torch only where asked to (bench.convert's parent must stay torch-free).
"""
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

OUTLIER_FACTOR = 3.0
OUTLIER_RULE = (f"outlier rule: a sample over {OUTLIER_FACTOR:g}x (or under 1/{OUTLIER_FACTOR:g} of) its side's "
                "median is counted and left out of the spread; medians use every sample")
MIN_PAIRS = 3
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def pin_threads(n: int | None) -> int:
    """Pin intra-op threads to n (None: torch's default for this machine, still pinned and stated) for this
    process and, through the environment, for every child. Returns the count."""
    if n is None:
        n = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    if n < 1:
        raise SystemExit(f"--threads {n}: must be at least 1")
    for key in THREAD_ENV:
        os.environ[key] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


def threads_line(n: int, explicit: bool, why: str = "") -> str:
    how = "--threads (explicit)" if explicit else (why or "default: this machine's cores")
    return (f"threads: {n} intra-op for ours and the peer alike ({how}; torch.set_num_threads + "
            f"{'/'.join(THREAD_ENV)} for child processes)")


def load_line(when: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {when}: {one:.2f}, {five:.2f}, {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


@dataclass
class Stats:
    """Median and spread of one side's samples (see OUTLIER_RULE)."""

    median: float
    lo: float
    hi: float
    n: int
    outliers: int

    @classmethod
    def of(cls, xs: list[float]) -> "Stats":
        if not xs:
            raise ValueError("no samples")
        med = statistics.median(xs)
        kept = [x for x in xs if not is_outlier(x, med)] or list(xs)
        return cls(med, min(kept), max(kept), len(xs), len(xs) - len(kept))

    def fmt(self, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
        s = f"{self.median * scale:.{digits}f}{unit} [{self.lo * scale:.{digits}f}-{self.hi * scale:.{digits}f}]"
        return s + (f" ({self.outliers} outlier{'s' * (self.outliers > 1)})" if self.outliers else "")


def is_outlier(x: float, median: float) -> bool:
    return median > 0 and (x > OUTLIER_FACTOR * median or x * OUTLIER_FACTOR < median)


@dataclass
class Runs:
    """Samples per side in call order; `order` lists (side, rep) as they ran."""

    samples: dict[str, list] = field(default_factory=dict)
    order: list[tuple[str, int]] = field(default_factory=list)

    def values(self, side: str, key: str | None = None) -> list[float]:
        return [s if key is None else s[key] for s in self.samples[side]]


def interleave(sides: dict[str, Callable[[], object]], reps: int, warmup: int = 0,
               clock: Callable[[], float] = time.perf_counter) -> Runs:
    """Call every side `warmup` times (untimed, interleaved), then `reps` rounds of A B C ... in dict order.

    A side returning None is timed with `clock` (seconds); a side returning a number or a dict of metrics
    (e.g. tok/s measured inside, or a child's wall/CPU/RSS) has that value recorded as is."""
    if reps < 1:
        raise SystemExit(f"--reps {reps}: must be at least 1")
    runs = Runs({k: [] for k in sides})
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    for rep in range(reps):
        for name, fn in sides.items():
            t = clock()
            out = fn()
            runs.samples[name].append(clock() - t if out is None else out)
            runs.order.append((name, rep))
    return runs


@dataclass
class Verdict:
    """ratio = ours' speed / the peer's (> 1: ours faster), with the spread of the per-pair ratios."""

    ratio: float
    lo: float
    hi: float
    noisy: bool
    pairs: int = 0

    def line(self, what: str, ours: str = "ours", peer: str = "peer") -> str:
        word = (f"NOISY: {self.pairs} pair(s), too few to judge" if self.pairs < MIN_PAIRS else
                "NOISY: the spread reaches 1, no winner") if self.noisy else (
            f"{ours} faster" if self.ratio > 1 else f"{peer} faster")
        return (f"verdict {what}: {ours}/{peer} speed {self.ratio:.2f}x "
                f"(per-pair spread {self.lo:.2f}-{self.hi:.2f}x): {word}")


def compare(ours: list[float], peer: list[float], higher_is_better: bool = False) -> Verdict:
    """Speed ratio of medians from paired samples (pair i = the i-th interleaved run of each side).

    Times (higher_is_better False): ratio = peer / ours; rates such as tok/s: ratio = ours / peer.
    Spread = min..max of the per-pair ratios, outlier pairs (OUTLIER_RULE on the pair ratios) left out.
    Noisy when that spread reaches 1, i.e. its width overlaps the ratio's distance from 1, or when there are
    fewer than MIN_PAIRS pairs (no spread to judge by)."""
    if len(ours) != len(peer) or not ours:
        raise ValueError(f"paired samples needed: {len(ours)} ours vs {len(peer)} peer")
    mo, mp = statistics.median(ours), statistics.median(peer)
    ratio = mo / mp if higher_is_better else mp / mo
    pairs = [o / p if higher_is_better else p / o for o, p in zip(ours, peer)]
    st = Stats.of(pairs)
    lo, hi = min(st.lo, ratio), max(st.hi, ratio)
    return Verdict(ratio, lo, hi, lo <= 1.0 <= hi or len(pairs) < MIN_PAIRS, len(pairs))


def measure(fn, warmup: int = 3, reps: int = 20) -> tuple[float, float, float]:
    """Seconds per call of `fn`: (median, q20, q80). Triton's do_bench on CUDA."""
    import torch

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


def begin(threads: int | None, reps: int, shortcuts: list[str] = (), default: int | None = None,
          why: str = "") -> int:
    """Pin threads (--threads, else `default` for the reason `why`, else the machine's cores) and print the
    standard header: threads, reps and order, outlier rule, shortcuts, load average before."""
    n = pin_threads(threads if threads is not None else default)
    print(threads_line(n, threads is not None, why if default is not None else ""))
    print(f"runs: ours and the peer interleaved (A B A B ...), {reps} timed rep(s) each after warm-up; "
          "figures are median [min-max]")
    print(OUTLIER_RULE)
    print("shortcuts: " + (", ".join(shortcuts) if shortcuts else "none (the configuration users get by default)"))
    print(load_line("before"), flush=True)
    return n


def end() -> None:
    print(load_line("after"), flush=True)
