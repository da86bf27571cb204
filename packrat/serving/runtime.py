"""What the controller keeps per model, and its sampling: TorchServe's counters summed over a
model's versions feed the estimator, the history of B levels and the measured cost of each
switch (how long it took, how much slower requests were meanwhile)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from packrat.core.decide import PEAK_WINDOW_S
from packrat.core.estimator import EstimatorParams, EstimatorState, Sample, observe
from packrat.core.optimizer import Optimizer
from packrat.core.plan import ServedPlan
from packrat.core.policy import PolicyParams
from packrat.core.reallocate import BUSY_AGAIN, FALLING, idle_line
from packrat.core.switchcost import (
    NO_LEVELS,
    NO_MEASUREMENTS,
    Kind,
    LevelHistory,
    SwitchStats,
    mean_latency_ms,
    observe_level,
)
from packrat.core.switchcost import observe as observe_cost
from packrat.model.sample import Sample as RequestSample

log = logging.getLogger(__name__)

HISTORY = 64            # samples kept per model: a switch's before and during fit
BEFORE_INTERVALS = 3    # serving before a switch: the mean over this many intervals

METRICS = ("ts_inference_requests_total", "ts_inference_latency_microseconds")


class CoreSplit(Enum):
    """How several models of one server share its cores."""

    AUTO = "auto"        # the allocator, live: busy models on dedicated cores, idle ones shared
    EVEN = "even"        # a fixed even split, each model planned within its share
    OVERLAP = "overlap"  # every model planned for all cores (Packrat before the allocator)


@dataclass(frozen=True)
class ControllerParams:
    interval_s: float = 1.0       # between two scrapes of the metrics (and decisions)
    tick_s: float = 0.05          # between two ticks while a switch is under way
    max_batch_delay_ms: int = 10
    # Old versions kept registered and idle after a switch, for all models together, in MB of
    # their workers' PSS (0: every old version is deleted once drained).
    standby_memory_mb: float = 0.0
    drain_timeout_s: float = 120.0
    retry_after_s: float = 30.0   # after a failed switch, wait this long before trying again
    policy: PolicyParams = PolicyParams()
    estimator: EstimatorParams = EstimatorParams()
    core_split: CoreSplit = CoreSplit.AUTO
    # after a reallocation, the loads settle (estimators, rates) before the next is weighed
    realloc_hold_s: float = 10.0


@dataclass
class ModelRuntime:
    """What the controller knows of one model; mutable, owned by the controller loop."""

    name: str
    base_dir: Path                 # the unpacked archive every version is made from
    optimizer: Optimizer
    cores: tuple[int, ...]
    warm: RequestSample            # a valid request, to warm new versions
    plan: ServedPlan | None = None
    auto: bool = True
    estimator: EstimatorState = field(default_factory=EstimatorState)
    totals: tuple[float, float] = (0.0, 0.0)   # requests, latency_us summed over versions
    # (time, requests, latency_us) of the last samples: what serving was like around a switch
    history: tuple[tuple[float, float, float], ...] = ()
    stats: SwitchStats = NO_MEASUREMENTS        # what its switches cost, warm and cold
    levels: LevelHistory = NO_LEVELS            # how long its B levels lasted
    costing: tuple[Kind, float, float] | None = None  # a switch to measure: kind, start, drained
    prewarming: tuple[float, float] | None = None     # a prewarm to measure: start, end
    last_prewarm: str | None = None   # what the last prewarm cost the live plan
    last_counters: dict[tuple[str, str], float] = field(default_factory=dict)
    next_version: int = 1
    reconfigurations: int = 0
    last_reconfiguration_unix: float | None = None
    last_error: str | None = None
    hold_until: float = 0.0        # no automatic switch before this (monotonic seconds)
    profile_path: Path | None = None  # a profile Packrat measured (and may calibrate)
    calibration: str | None = None    # Calibration.describe() of the profile planned with
    last_stay: str | None = None      # why the last faster plan was not worth its switch
    slo_ms: float | None = None       # --slo: on the batch latency, for the allocator
    shared: bool = False              # idle: one 1-thread worker on the shared core
    whole: Optimizer | None = None    # the optimizer for every core of the server (the
                                      # allocator's); `optimizer` is for `cores` alone
    busy_rate: float | None = None    # its arrivals' slow average when last busy and steady:
                                      # the rate it will likely reach when it wakes again
    rates: tuple[tuple[float, float], ...] = ()  # (time, rate) of the last PEAK_WINDOW_S

    def peak_rate(self) -> float | None:
        """The highest arrival rate (the estimator's EWMA) of the last PEAK_WINDOW_S."""
        return max((r for _, r in self.rates), default=None)


def sample_model(m: ModelRuntime, metrics: dict[tuple[str, str, str], float], now: float,
                 params: ControllerParams, estimator: EstimatorParams | None = None) -> None:
    """Add this scrape to the model's running totals (versions come and go, so their own
    counters restart; only their increases count) and feed the estimator."""
    requests, latency = m.totals
    seen = {}
    for (metric, model, version), value in metrics.items():
        if model != m.name or metric not in METRICS:
            continue
        seen[(metric, version)] = value
        prev = m.last_counters.get((metric, version), 0.0)
        delta = value - prev if value >= prev else value  # a reset starts from 0
        if metric == METRICS[0]:
            requests += delta
        else:
            latency += delta
    m.last_counters = seen
    m.totals = (requests, latency)
    m.estimator = observe(m.estimator, Sample(now, requests, latency),
                          estimator or params.estimator)
    m.levels = observe_level(m.levels, m.estimator.estimate, now)
    rate, slow = m.estimator.rate, m.estimator.slow_rate
    if (not m.shared and rate is not None and slow is not None and rate >= FALLING * slow
            and slow >= BUSY_AGAIN * idle_line(m.optimizer)):
        m.busy_rate = slow  # (not once it falls: on its way to idle the average decays)
    if rate is not None:
        m.rates = tuple(x for x in m.rates if x[0] > now - PEAK_WINDOW_S) + ((now, rate),)
    m.history = (m.history + ((now, requests, latency),))[-HISTORY:]
    _cost_of_switch(m, now, params.interval_s)
    _cost_of_prewarm(m, now, params.interval_s)


def _slowdown(m: ModelRuntime, start: float, now: float, interval_s: float) -> float | None:
    """How much slower requests were from start to now than in the intervals before."""
    before = mean_latency_ms(m.history, start - BEFORE_INTERVALS * interval_s, start)
    during = mean_latency_ms(m.history, start, now)
    if before is None or during is None or before <= 0:
        return None  # no traffic to be slowed down
    return (during - before) / before


def _cost_of_prewarm(m: ModelRuntime, now: float, interval_s: float) -> None:
    """Loading a plan ahead of need shares the cores with the live plan: what it cost."""
    if m.prewarming is None or now < m.prewarming[1]:
        return
    start, end = m.prewarming
    m.prewarming = None
    slowdown = _slowdown(m, start, now, interval_s)
    m.last_prewarm = (f"{end - start:.1f} s, live requests "
                      + (f"{100 * slowdown:+.0f}%" if slowdown is not None else "not measured"))
    log.info("%s: prewarming took %s", m.name, m.last_prewarm)


def _cost_of_switch(m: ModelRuntime, now: float, interval_s: float) -> None:
    """Once a sample follows a switch's end (the old version drained): its duration, from
    the decision, and how much slower requests were during it than in the intervals before,
    into the model's stats. (Decision to new default would make a warm switch look free: 0.1
    s for ResNet-50, while its drain, with both versions on the same cores, took 5-20 s.)"""
    if m.costing is None or now < m.costing[2]:
        return
    kind, start, drained = m.costing
    m.costing = None
    slowdown = _slowdown(m, start, now, interval_s)
    if slowdown is None:
        return
    m.stats = observe_cost(m.stats, kind, drained - start, slowdown)
    log.info("%s: a %s switch took %.1f s to drain, requests %.0f%% slower meanwhile; now %s",
             m.name, kind.value, drained - start, 100 * slowdown, m.stats.of(kind).describe())
