"""Load traces (packrat.core.trace): shapes, scaling, CSV parsing and seeded arrivals."""

import math
from itertools import pairwise

import pytest

from packrat.core.trace import (
    SHAPES,
    Step,
    Trace,
    TraceError,
    arrivals,
    bursty,
    diurnal,
    scaled,
    steady,
    step,
    trace_from_csv,
)


def test_steady_is_sixty_percent_of_peak():
    t = steady(100, 50)
    assert t.mean_rps == pytest.approx(30) and t.peak_rps == pytest.approx(30)
    assert t.rate_at(0) == t.rate_at(99.9) == pytest.approx(30)
    assert t.rate_at(100) == 0 and t.rate_at(-1) == 0


def test_step_is_low_high_low():
    t = step(90, 40)
    assert [t.rate_at(x) for x in (0, 29.9, 30, 59.9, 60, 89.9)] == [10, 10, 40, 40, 10, 10]
    assert t.mean_rps == pytest.approx(20) and t.peak_rps == 40


def test_diurnal_is_smooth_low_at_night_peak_at_noon():
    t = diurnal(240, 100)
    assert t.peak_rps == pytest.approx(100)
    assert t.mean_rps == pytest.approx(55, abs=1)
    assert t.rate_at(1) < 15 and t.rate_at(239) < 15
    assert t.rate_at(120) == pytest.approx(100)
    rates = [s.rps for s in t.steps]
    assert max(abs(a - b) for a, b in pairwise(rates)) < 10  # no jumps
    assert rates[:24] == sorted(rates[:24]) and rates[24:] == sorted(rates[24:], reverse=True)


def test_bursty_is_seeded_and_bursts_over_a_base():
    a, b, c = bursty(600, 100, seed=1), bursty(600, 100, seed=1), bursty(600, 100, seed=2)
    assert a == b and a != c
    for t in (bursty(600, 100, seed=s) for s in range(20)):
        assert {s.rps for s in t.steps} == {20, 100}  # base and bursts only
        assert t.steps[0].rps == 20 and t.peak_rps == 100
        assert 30 < t.mean_rps < 75


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_are_valid_and_scale(name):
    t = SHAPES[name](60, 10, 3)
    s = scaled(t, 80)
    assert s.peak_rps == pytest.approx(80)
    assert s.mean_rps / s.peak_rps == pytest.approx(t.mean_rps / t.peak_rps)
    assert s.duration_s == 60 and [x.start_s for x in s.steps] == [x.start_s for x in t.steps]
    assert t.expected_requests == pytest.approx(t.mean_rps * 60)


@pytest.mark.parametrize("bad", [(0, 10), (10, 0), (-1, 10), (10, math.nan), (math.inf, 1)])
def test_shapes_refuse_bad_arguments(bad):
    with pytest.raises(TraceError):
        steady(*bad)


def test_scaled_refuses_zero_trace_and_bad_peak():
    with pytest.raises(TraceError, match="rate is 0 throughout"):
        scaled(Trace("idle", 10, (Step(0, 0),)), 5)
    with pytest.raises(TraceError, match="positive"):
        scaled(steady(10, 5), 0)


def test_trace_checks_its_steps():
    with pytest.raises(TraceError, match="start at 0"):
        Trace("x", 10, (Step(1, 1),))
    with pytest.raises(TraceError, match="must increase"):
        Trace("x", 10, (Step(0, 1), Step(5, 1), Step(5, 2)))
    with pytest.raises(TraceError, match="not before the end"):
        Trace("x", 10, (Step(0, 1), Step(10, 1)))
    with pytest.raises(TraceError, match=">= 0"):
        Trace("x", 10, (Step(0, -1),))


# -- CSV


def test_csv_with_header_comments_and_blank_lines():
    t = trace_from_csv("# from a log\nseconds,requests_per_second\n\n0,5\n10, 20\n20,0\n",
                       "log.csv")
    assert t.steps == (Step(0, 5), Step(10, 20), Step(20, 0))
    assert t.duration_s == 30  # the last row holds as long as the interval before it
    assert t.rate_at(15) == 20 and t.rate_at(25) == 0
    assert t.name == "log.csv"


def test_csv_without_header_and_explicit_duration():
    t = trace_from_csv("0,1.5\n2.5,3\n", "t.csv", duration_s=100)
    assert t.steps == (Step(0, 1.5), Step(2.5, 3)) and t.duration_s == 100
    assert trace_from_csv("0,7", "one.csv").duration_s == 1


@pytest.mark.parametrize("text,message", [
    ("", "t.csv: no rows"),
    ("seconds,rps\n", "t.csv: no rows"),
    ("0,1\n5\n", "t.csv line 2: expected 2 columns"),
    ("0,1,2\n", "t.csv line 1: expected 2 columns"),
    ("0,1\n5,fast\n", "t.csv line 2: 'fast' is not a number"),
    ("seconds,rps\nten,1\n", "t.csv line 2: 'ten' is not a number"),
    ("0,abc\n", "t.csv line 1: 'abc' is not a number"),
    ("0,-1\n", "t.csv line 1: rate -1 must be"),
    ("0,nan\n", "t.csv line 1: rate nan must be"),
    ("3,1\n", "t.csv line 1: the first row must be at second 0"),
    ("0,1\n5,1\n5,2\n", "t.csv line 3: second 5 does not come after"),
    ("0,1\n-2,1\n", "t.csv line 2: second -2 must be"),
])
def test_csv_errors_name_the_line_and_the_problem(text, message):
    with pytest.raises(TraceError) as e:
        trace_from_csv(text, "t.csv")
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_csv_duration_must_be_after_last_row():
    with pytest.raises(TraceError, match=r"after the last row's second \(10, line 2\)"):
        trace_from_csv("0,1\n10,2\n", "t.csv", duration_s=10)


# -- arrivals


def test_arrivals_are_deterministic_per_seed():
    t = bursty(60, 50, seed=4)
    a = arrivals(t, seed=7)
    assert a == arrivals(t, seed=7)
    assert a != arrivals(t, seed=8)
    assert list(a) == sorted(a) and all(0 <= x < 60 for x in a)


def test_arrivals_count_of_a_long_steady_trace_is_poisson():
    t = steady(2000, 50)  # 30 rps: 60,000 expected, sigma ~245
    for seed in (0, 1, 2):
        n = len(arrivals(t, seed))
        assert abs(n - 60_000) < 4 * math.sqrt(60_000), n


def test_arrivals_gaps_are_exponential():
    a = arrivals(steady(1000, 100), seed=5)  # 60 rps
    gaps = [y - x for x, y in pairwise(a)]
    mean = sum(gaps) / len(gaps)
    assert mean == pytest.approx(1 / 60, rel=0.03)
    # exponential: the fraction of gaps over the mean is e^-1
    assert sum(g > mean for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.02)


def test_arrivals_follow_the_rate_per_step():
    t = Trace("x", 300, (Step(0, 10), Step(100, 0), Step(200, 40)))
    a = arrivals(t, seed=3)
    counts = [sum(lo <= x < lo + 100 for x in a) for lo in (0, 100, 200)]
    assert abs(counts[0] - 1000) < 4 * math.sqrt(1000)
    assert counts[1] == 0
    assert abs(counts[2] - 4000) < 4 * math.sqrt(4000)


def test_arrivals_are_capped_by_max_requests():
    t = steady(100, 100)
    assert len(arrivals(t, 1, max_requests=250)) == 250
    assert arrivals(t, 1, max_requests=250) == arrivals(t, 1)[:250]
    assert arrivals(t, 1, max_requests=0) == ()
    with pytest.raises(TraceError):
        arrivals(t, 1, max_requests=-1)


def test_arrivals_of_an_idle_trace_are_empty():
    assert arrivals(Trace("idle", 10, (Step(0, 0),)), 1) == ()
