"""bench/_timing.py on synthetic timings: interleaving order, medians, spread, the outlier rule, the verdict."""
import os

import pytest

from bench import _timing
from bench._timing import OUTLIER_FACTOR, Stats, compare, interleave

pytestmark = pytest.mark.unit


class FakeClock:
    """A clock that each side advances by its own scripted durations, so timings are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def scripted(clock, durations, log, name):
    it = iter(durations)

    def call():
        log.append(name)
        clock.now += next(it)
    return call


def test_interleave_runs_a_b_a_b_after_interleaved_warmup_and_times_each_call():
    clock, log = FakeClock(), []
    runs = interleave({"ours": scripted(clock, [9, 9, 1.0, 2.0, 3.0], log, "ours"),
                       "peer": scripted(clock, [9, 9, 4.0, 5.0, 6.0], log, "peer")}, reps=3, warmup=2, clock=clock)
    assert log == ["ours", "peer"] * 5
    assert runs.order == [("ours", 0), ("peer", 0), ("ours", 1), ("peer", 1), ("ours", 2), ("peer", 2)]
    assert runs.samples == {"ours": [1.0, 2.0, 3.0], "peer": [4.0, 5.0, 6.0]}


def test_interleave_records_values_returned_by_a_side():
    vals = iter([{"tok_s": 10.0}, {"tok_s": 30.0}, {"tok_s": 20.0}])
    runs = interleave({"ours": lambda: next(vals)}, reps=3)
    assert runs.values("ours", "tok_s") == [10.0, 30.0, 20.0]


def test_interleave_refuses_zero_reps():
    with pytest.raises(SystemExit, match="--reps 0"):
        interleave({"a": lambda: None}, reps=0)


def test_stats_median_and_spread_leave_out_an_outlier_but_keep_it_in_the_median():
    # bitsandbytes' 62 us -> 12 ms glitch (issue 18): one sample 200x the others
    xs = [62e-6, 61e-6, 12e-3, 63e-6, 60e-6]
    st = Stats.of(xs)
    assert st.median == 62e-6
    assert (st.lo, st.hi) == (60e-6, 63e-6)
    assert (st.n, st.outliers) == (5, 1)
    assert "1 outlier" in st.fmt(1e6, " us")


def test_stats_keeps_samples_just_inside_the_factor():
    st = Stats.of([1.0, 1.0, OUTLIER_FACTOR * 0.999])
    assert st.outliers == 0 and st.hi == pytest.approx(OUTLIER_FACTOR * 0.999)


def test_compare_times_clear_win_is_not_noisy():
    v = compare(ours=[1.0, 1.1, 0.9, 1.0], peer=[2.0, 2.1, 2.0, 1.9])
    assert v.ratio == pytest.approx(2.0 / 1.0)
    assert v.lo == pytest.approx(1.9 / 1.0) and v.hi == pytest.approx(2.0 / 0.9)
    assert not v.noisy
    assert "ours faster" in v.line("wall")


def test_compare_rates_use_ours_over_peer():
    v = compare(ours=[30.0, 31.0, 29.0], peer=[10.0, 10.0, 10.0], higher_is_better=True)
    assert v.ratio == pytest.approx(3.0) and not v.noisy


def test_compare_is_noisy_when_the_pair_spread_reaches_one():
    # median ratio 1.1x, but one pair says the peer was faster: spread 0.8-1.3 overlaps the distance to 1
    v = compare(ours=[1.0, 1.0, 1.0, 1.0], peer=[1.1, 0.8, 1.3, 1.1])
    assert v.ratio == pytest.approx(1.1)
    assert v.lo == pytest.approx(0.8) and v.noisy
    assert "NOISY" in v.line("decode")


def test_compare_a_single_outlier_pair_does_not_flip_the_verdict():
    # one peer sample 200x slow: the median ratio stays ~0.5 and the outlier pair is left out of the spread
    v = compare(ours=[2.0, 2.0, 2.0, 2.0, 2.0], peer=[1.0, 1.0, 200.0, 1.0, 1.0])
    assert v.ratio == pytest.approx(0.5) and v.hi == pytest.approx(0.5) and not v.noisy
    assert "peer faster" in v.line("dequant")


def test_compare_with_too_few_pairs_is_noisy():
    v = compare(ours=[1.0, 1.0], peer=[3.0, 3.0])
    assert v.noisy and "too few" in v.line("x")


def test_compare_needs_paired_samples():
    with pytest.raises(ValueError, match="paired"):
        compare([1.0, 2.0], [1.0])


def test_pin_threads_sets_the_environment_for_children(monkeypatch):
    import torch

    for k in _timing.THREAD_ENV:
        monkeypatch.setenv(k, "0")  # restored after the test
    before = torch.get_num_threads()
    try:
        assert _timing.pin_threads(1) == 1
        assert all(os.environ[k] == "1" for k in _timing.THREAD_ENV)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit, match="--threads 0"):
        _timing.pin_threads(0)
