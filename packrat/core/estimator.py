"""The estimator: the batch size B to plan for, from TorchServe's live counters.

Pure code: samples in, state out; no clock, no I/O. The controller scrapes the model's
Prometheus counters (summed over versions) about once a second and passes each scrape to
`observe`; `state.estimate` is the B it plans for.

Little's law. `latency_us` sums the end-to-end latency (queue time included) of completed
requests, so over an interval of dt seconds the mean number of requests in the system is

    L = (latency_us[now] - latency_us[before]) / 1e6 / dt

and with C closed-loop clients L ~ C. A counter that goes down (TorchServe restarted, a version
deleted) is a reset: that interval is skipped. Latency is counted when a request completes and a
request when it arrives, so a slow model may see nothing arrive in one scrape while its clients
wait for answers: an interval with no arrival is extended to the next scrape while it is shorter
than `hold` times the mean latency of the requests seen so far; after that it counts as idle
(L = 0). A fast model is never held.

Smoothing. The level is the median of the last `window` loads, which ignores single-interval
spikes and follows a step within half a window; `smoothed` is an EWMA (weight `alpha`) of the
level, for the decisions that noise could sway. B = round(level), half up, at least 1 and at
most `max_batch`: rounding down (as the paper does, to a power of two) plans for fewer requests
than arrive, and the extra ones wait a whole round.

Hysteresis and patience. A change of plan costs seconds of worker start-up, and memory for two
versions while the old one drains, so a flap (a change soon undone) is expensive. The estimate
moves only after the load has stayed out of a band around it, on the same side, for several
consecutive intervals: `patience` intervals when the level is off by a factor 1 + `wide_change`
or more (up or down), `slow_patience` intervals when only the smoothed load is off by more than
`min_change` (relative). A large change is followed at once, a moderate one only if it lasts,
noise inside the band never moves the estimate, and a burst shorter than the patience is
ignored. A move jumps straight to the current level (one move per step, not a staircase), and
the EWMA restarts there.

Rate. `rate` is an EWMA (weight `alpha`) of arrivals per second, with no patience: Little's L
says how many requests wait, not whether the live plan keeps up with their arrival; the
policy compares the rate with a plan's throughput to see a queue that can only grow.
`slow_rate` (weight SLOW_ALPHA) decides whether an idle model has turned busy: a few requests
in a row must not take cores. `sure_rate` is the last interval's arrivals less two standard
deviations of Poisson noise (n - 2 sqrt(n), per second): a rate the arrivals exceed with ~98%
confidence, known one interval into a burst where the EWMA needs four to cross the same line
(small-cnn's bursts from 106 to 548 requests/s), and near nothing where counts are small and
noisy (ResNet-50's 13/s: a sure rate of 6/s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from statistics import median


@dataclass(frozen=True)
class Sample:
    """One scrape of the counters of a model, summed over its versions."""

    time_s: float  # monotonic seconds
    requests: float  # cumulative requests (TorchServe counts a request when it arrives)
    latency_us: float  # cumulative latency sum, microseconds


# The slow rate's weight: about 20 intervals. At 0.2 requests/s one request in a 1 s interval
# lifts the fast EWMA to 0.3/s, a few in a row above an idle model's line; this one stays put.
SLOW_ALPHA = 0.05


@dataclass(frozen=True)
class EstimatorParams:
    alpha: float = 0.3  # EWMA weight of the newest interval
    patience: int = 3  # consecutive intervals a new value must persist before it is adopted
    min_change: float = 0.25  # relative change in the smoothed load needed to move the estimate
    max_batch: int = 1024  # clamp
    window: int = 3  # loads in the median that rejects single-interval spikes
    wide_change: float = 1.0  # a level off by a factor above 1 + this needs `patience` ...
    slow_patience: int = 12  # ... a smaller change needs this many intervals
    hold: float = 2.0  # an interval with nothing completed waits this many request latencies

    def __post_init__(self) -> None:
        checks = {
            "alpha": 0 < self.alpha <= 1,
            "patience": self.patience >= 1,
            "min_change": self.min_change >= 0,
            "max_batch": self.max_batch >= 1,
            "window": self.window >= 1,
            "wide_change": self.wide_change >= self.min_change,
            "slow_patience": self.slow_patience >= self.patience,
            "hold": self.hold >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"EstimatorParams.{name}: bad value {getattr(self, name)!r}")


@dataclass(frozen=True)
class EstimatorState:
    last: Sample | None = None  # start of the current interval
    smoothed: float | None = None  # EWMA of the level (median of `recent`)
    estimate: int = 1  # the adopted batch size B (>= 1)
    candidate: int | None = None  # value waiting to be adopted
    streak: int = 0  # consecutive intervals out of the band on the candidate's side
    recent: tuple[float, ...] = ()  # the last `window` loads, oldest first
    request_s: float = 0.0  # mean latency of one request in the last interval that had any
    rate: float | None = None  # EWMA (weight alpha) of arrivals per second: is a plan overloaded
    slow_rate: float | None = None  # the same with weight SLOW_ALPHA: is an idle model busy again
    sure_rate: float | None = None  # last interval's arrivals less 2 sigma: surely exceeded


def load_from(prev: Sample, cur: Sample) -> float | None:
    """Little's law L for the interval prev -> cur; None for a reset, dt <= 0 or bad numbers."""
    dt = cur.time_s - prev.time_s
    d_lat = cur.latency_us - prev.latency_us
    if not (dt > 0 and d_lat >= 0 and cur.requests >= prev.requests):  # False for NaN too
        return None
    load = d_lat / 1e6 / dt
    return load if math.isfinite(load) else None


def _to_batch(load: float, params: EstimatorParams) -> int:
    return max(1, min(params.max_batch, math.floor(load + 0.5)))


def observe(
    state: EstimatorState, sample: Sample, params: EstimatorParams = EstimatorParams()
) -> EstimatorState:
    """The state after one more scrape; `.estimate` is the B to plan for."""
    last = state.last
    load = None if last is None else load_from(last, sample)
    if load is None:  # first sample, reset, or no time passed: the next interval starts here
        return replace(state, last=sample)
    # TorchServe counts a request when it arrives, and its latency when it completes. No
    # arrival in the interval while requests take longer than it: the clients (a closed
    # loop sends again only on an answer) are waiting for answers, not gone; wait.
    arrived = sample.requests - last.requests
    if arrived == 0 and sample.time_s - last.time_s < params.hold * state.request_s:
        return state
    # latency completed per request arrived: the mean request latency once the load is steady
    request_s = ((sample.latency_us - last.latency_us) / 1e6 / arrived if arrived
                 else state.request_s)
    dt = sample.time_s - last.time_s
    per_s = arrived / dt
    sure_rate = max(0.0, arrived - 2 * math.sqrt(max(0.0, arrived))) / dt
    rate = per_s if state.rate is None else params.alpha * per_s + (1 - params.alpha) * state.rate
    slow_rate = (per_s if state.slow_rate is None
                 else SLOW_ALPHA * per_s + (1 - SLOW_ALPHA) * state.slow_rate)
    recent = (state.recent + (min(load, params.max_batch),))[-params.window :]
    level = median(recent)
    if state.smoothed is None:
        smoothed = level
    else:
        smoothed = params.alpha * level + (1 - params.alpha) * state.smoothed
    est = state.estimate
    target = _to_batch(level, params)
    side = (target > est) - (target < est)
    fast = max(target / est, est / target) >= 1 + params.wide_change  # up or down
    slow = abs(smoothed - est) > params.min_change * est and (smoothed > est) == (side > 0)
    new = replace(state, last=sample, recent=recent, smoothed=smoothed, candidate=None, streak=0,
                  rate=rate, slow_rate=slow_rate, sure_rate=sure_rate,
                  request_s=request_s if math.isfinite(request_s) else 0.0)
    if side == 0 or not (fast or slow):  # inside the band
        return new
    same_side = state.candidate is not None and (state.candidate > est) == (side > 0)
    streak = state.streak + 1 if same_side else 1
    if streak >= params.slow_patience or (fast and streak >= params.patience):
        return replace(new, smoothed=level, estimate=target)
    return replace(new, candidate=target, streak=streak)
