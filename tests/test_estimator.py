"""The estimator on synthetic traces, against the paper's method, plus properties.

A trace is a concurrency per interval (about 1 s each); `samples` turns it into the cumulative
counters TorchServe would show. Scores: `changes` counts moves of the estimate (a plan switch
each, starting from B = 1); `log_error` is the mean |log2(estimate / true B)|, so planning for
half or double the load costs the same.
"""

import math
import random
from collections import Counter, deque

import pytest
from hypothesis import given, settings, strategies as st

from packrat.core.estimator import EstimatorParams, EstimatorState, Sample, load_from, observe

P = EstimatorParams()
SEEDS = range(10)


def samples(concurrency, seed=0, noise=0.15, request_s=0.05):
    """Cumulative counters: latency grows by C*dt*(1+noise) s, requests by C*dt/request_s."""
    rng = random.Random(seed)
    t = req = lat = 0.0
    out = [Sample(t, req, lat)]
    for c in concurrency:
        dt = 1.0 + rng.uniform(-0.05, 0.05)  # the controller's scrapes are not exactly 1 s apart
        t += dt
        lat += c * dt * 1e6 * (1 + rng.uniform(-noise, noise))
        req += c * dt / request_s
        out.append(Sample(t, req, lat))
    return out


def estimates(trace, params=P):
    """The estimate after each interval (one per sample after the first)."""
    state, out = EstimatorState(), []
    for s in trace:
        state = observe(state, s, params)
        out.append(state.estimate)
    return out[1:]


def paper_estimates(trace, alpha=0.3, k=5):
    """The paper's method as we read it: EWMA of L, rounded down to a power of two, then the
    mode of the last k such values (a tie keeps the current estimate)."""
    ewma, recent, est, out = None, deque(maxlen=k), 1, []
    for prev, cur in zip(trace, trace[1:]):
        load = load_from(prev, cur)
        if load is not None:
            ewma = load if ewma is None else alpha * load + (1 - alpha) * ewma
            recent.append(2 ** math.floor(math.log2(max(ewma, 1.0))))
            counts = Counter(recent)
            top = max(counts.values())
            if counts[est] < top:
                est = next(v for v in reversed(recent) if counts[v] == top)
        out.append(est)
    return out


def changes(ests):
    return sum(a != b for a, b in zip([1] + ests, ests))


def moves(ests):
    """Changes within the list, not counting a move away from B = 1 at its start."""
    return sum(a != b for a, b in zip(ests, ests[1:]))


def log_error(ests, truth):
    return sum(abs(math.log2(e / max(1, t))) for e, t in zip(ests, truth)) / len(ests)


def within(ests, truth, factor=1.5):
    ok = [max(1, t) / factor <= e <= factor * max(1, t) for e, t in zip(ests, truth)]
    return sum(ok) / len(ok)


def diurnal(n=400, period=200):
    return [round(8.5 - 7.5 * math.cos(2 * math.pi * i / period)) for i in range(n)]


def bursty(seed, n=300, base=2, peak=16, rate=0.1):
    """Single-interval spikes to `peak` in `rate` of the intervals, never two in a row."""
    rng, out = random.Random(1000 + seed), []
    for _ in range(n):
        spike = (not out or out[-1] == base) and rng.random() < rate / (1 - rate)
        out.append(peak if spike else base)
    return out


def traces(seed):
    """name -> (concurrency per interval, the B a good estimator should report)."""
    out = {f"steady {c}": ([c] * 200,) * 2 for c in (1, 2, 4, 8, 16)}
    out["step 1->8"] = ([1] * 50 + [8] * 50,) * 2
    out["step 8->2"] = ([8] * 50 + [2] * 50,) * 2
    out["diurnal"] = (diurnal(),) * 2
    out["bursty"] = (bursty(seed), [2] * 300)
    out["idle"] = ([6] * 30 + [0] * 30,) * 2
    return out


# --- Little's law ---------------------------------------------------------------------------


def test_load_is_littles_law():
    assert load_from(Sample(10, 100, 5e6), Sample(12, 140, 13e6)) == pytest.approx(4.0)
    assert load_from(Sample(10, 100, 5e6), Sample(11, 100, 5e6)) == 0.0  # idle


def test_load_is_none_for_resets_and_no_time():
    assert load_from(Sample(10, 100, 5e6), Sample(11, 3, 1e6)) is None  # restarted
    assert load_from(Sample(10, 100, 5e6), Sample(11, 101, 1e6)) is None  # version deleted
    assert load_from(Sample(10, 100, 5e6), Sample(10, 120, 6e6)) is None  # dt = 0
    assert load_from(Sample(10, 100, 5e6), Sample(9, 120, 6e6)) is None  # dt < 0


def test_bad_params_name_the_field():
    with pytest.raises(ValueError, match="EstimatorParams.patience: bad value 0"):
        EstimatorParams(patience=0)
    with pytest.raises(ValueError, match="wide_change"):
        EstimatorParams(min_change=0.5, wide_change=0.3)


# --- the traces -----------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1, 2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("seed", SEEDS)
def test_steady_load_settles_once_and_never_flaps(c, seed):
    ests = estimates(samples([c] * 200, seed))
    assert changes(ests) == (0 if c == 1 else 1)
    assert ests.index(ests[-1]) <= P.patience  # settled at once ...
    assert abs(ests[-1] - c) <= (0 if c <= 3 else P.min_change * c)  # ... inside the band


@pytest.mark.parametrize("before, after", [(1, 8), (8, 2), (2, 16), (16, 1)])
@pytest.mark.parametrize("seed", SEEDS)
def test_step_is_followed_in_one_move(before, after, seed):
    ests = estimates(samples([before] * 50 + [after] * 50, seed))
    tail = ests[50:]
    assert abs(tail[P.patience] - after) <= P.min_change * after  # patience + 1 intervals on
    assert moves(ests[P.patience :]) == 1 and set(tail[P.patience :]) == {ests[-1]}


@pytest.mark.parametrize("seed", SEEDS)
def test_moderate_change_waits_for_slow_patience(seed):
    ests = estimates(samples([8] * 50 + [12] * 50, seed, noise=0.05))  # +50%: under a factor 2
    assert set(ests[10:50]) == {8}
    assert ests[50 + P.patience + 2] == 8  # not at once ...
    assert abs(ests[50 + P.slow_patience + 6] - 12) <= 1 and moves(ests[10:]) == 1  # ... once


@pytest.mark.parametrize("seed", SEEDS)
def test_diurnal_is_tracked_with_few_changes(seed):
    load = diurnal(n=400, period=200)
    ests = estimates(samples(load, seed))
    assert within(ests, load) >= 0.75
    assert changes(ests) <= 2 * 10  # two cycles


@pytest.mark.parametrize("seed", SEEDS)
def test_isolated_spikes_are_ignored(seed):
    load = bursty(seed)
    assert sum(c == 16 for c in load) >= 20
    ests = estimates(samples(load, seed))
    assert set(ests[P.patience :]) == {2}
    assert changes(ests) == 1


def test_a_burst_that_lasts_is_a_load_change():
    ests = estimates(samples([2] * 30 + [16] * 10 + [2] * 30))
    assert ests[35] == 16 and ests[-1] == 2 and changes(ests) == 3


@pytest.mark.parametrize("seed", SEEDS)
def test_idle_decays_to_one_after_patience(seed):
    ests = estimates(samples([6] * 30 + [0] * 30, seed))
    assert 5 <= ests[29] <= 7
    assert set(ests[30 + P.patience + 1 :]) == {1}


@pytest.mark.parametrize("case", ["restart", "version deleted", "latency sum only"])
def test_counter_reset_leaves_the_estimate_alone(case):
    trace = samples([8] * 60)
    drop = {
        "restart": (trace[30].requests - 5, trace[30].latency_us - 1e5),  # counters start over
        "version deleted": (1000, 20e6),  # its share leaves both sums
        "latency sum only": (0, 20e6),
    }[case]
    after = [Sample(s.time_s, s.requests - drop[0], s.latency_us - drop[1]) for s in trace[31:]]
    assert estimates(trace[:31] + after) == estimates(trace)


def slow_model(clients, busy_s, request_s=2.5, scrape_s=1.0):
    """Closed loop on a model that takes `request_s` per request: the counters move only when
    the batch of `clients` requests completes, every `request_s` seconds, for `busy_s` seconds."""
    out, done, t = [], 0, 0.0
    while t < busy_s + 30:
        done = min(int(t // request_s), int(busy_s // request_s))
        out.append(Sample(t, done * clients, done * clients * request_s * 1e6))
        t += scrape_s
    return out


def test_slow_model_is_not_mistaken_for_idle():
    ests = estimates(slow_model(clients=4, busy_s=100))
    assert ests[10] in (3, 4, 5) and set(ests[10:100]) == {ests[10]}
    assert ests[-1] == 1  # and when it is really idle, it decays


# --- against the paper ----------------------------------------------------------------------


def test_no_more_changes_and_no_larger_error_than_the_papers_method():
    """Totals over the same seeded traces for both methods; run with -s to see the table."""
    rows = {}
    for seed in SEEDS:
        for name, (load, truth) in traces(seed).items():
            trace = samples(load, seed)
            ours, paper = estimates(trace), paper_estimates(trace)
            row = rows.setdefault(name, [0, 0, 0.0, 0.0])
            row[0] += changes(ours)
            row[1] += changes(paper)
            row[2] += log_error(ours, truth) / len(SEEDS)
            row[3] += log_error(paper, truth) / len(SEEDS)
    header = ("trace", "changes: ours", "paper", "log2 error: ours", "paper")
    print("\n{:11} {:>13} {:>6} {:>17} {:>6}".format(*header))
    for name, (ch, chp, err, errp) in rows.items():
        print(f"{name:11} {ch:13} {chp:6} {err:17.3f} {errp:6.3f}")
    for name, (ch, chp, err, errp) in rows.items():
        assert ch <= chp and err <= errp, name


# --- properties -----------------------------------------------------------------------------

any_float = st.floats(allow_nan=True, allow_infinity=True)
any_sample = st.builds(Sample, any_float, any_float, any_float)
finite = st.floats(-1e12, 1e12)


@settings(max_examples=300, deadline=None)
@given(st.lists(any_sample, max_size=30), st.integers(1, 64))
def test_estimate_stays_in_range_whatever_the_samples(trace, max_batch):
    params = EstimatorParams(max_batch=max_batch)
    state = EstimatorState()
    for s in trace:
        state = observe(state, s, params)
        assert 1 <= state.estimate <= max_batch


@st.composite
def monotone_traces(draw):
    step = st.tuples(st.floats(0.01, 5), st.floats(0, 1e3), st.floats(0, 1e9))
    steps = draw(st.lists(step, max_size=40))
    t = req = lat = 0.0
    out = [Sample(t, req, lat)]
    for dt, dreq, dlat in steps:
        t, req, lat = t + dt, req + dreq, lat + dlat
        out.append(Sample(t, req, lat))
    return out


@settings(max_examples=200, deadline=None)
@given(monotone_traces())
def test_estimate_stays_in_range_on_monotone_counters(trace):
    for e in estimates(trace, EstimatorParams(max_batch=100)):
        assert 1 <= e <= 100


@settings(max_examples=300, deadline=None)
@given(st.lists(st.builds(Sample, finite, finite, finite), min_size=1, max_size=20))
def test_the_same_sample_twice_changes_nothing(trace):
    state = EstimatorState()
    for s in trace:
        state = observe(state, s)
        assert observe(state, s) == state


def test_rate_is_an_ewma_of_arrivals_per_second():
    s = observe(EstimatorState(), Sample(0.0, 0.0, 0.0))
    assert s.rate is None  # one sample: no interval yet
    s = observe(s, Sample(1.0, 10.0, 1e6))  # 10 arrivals in 1 s
    assert s.rate == 10.0
    s = observe(s, Sample(3.0, 50.0, 2e6))  # 40 in 2 s: 20/s, weighed by alpha
    assert s.rate == pytest.approx(P.alpha * 20.0 + (1 - P.alpha) * 10.0)


def test_sure_rate_is_the_last_interval_less_two_sigma_of_poisson_noise():
    s = observe(EstimatorState(), Sample(0.0, 0.0, 0.0))
    s = observe(s, Sample(1.0, 106.0, 1e6))
    s = observe(s, Sample(2.0, 106.0 + 548.0, 2e6))  # one second into a burst of 548/s
    assert s.sure_rate == pytest.approx(548 - 2 * math.sqrt(548))  # 501/s
    assert s.rate < 300  # the EWMA has a quarter of the way
    s = observe(s, Sample(4.0, 654.0 + 26.0, 3e6))  # ResNet-50's 13/s over 2 s
    assert s.sure_rate == pytest.approx((26 - 2 * math.sqrt(26)) / 2)  # 7.9/s
    s = observe(s, Sample(5.0, 680.0, 4e6))  # nothing arrived
    assert s.sure_rate == 0.0
