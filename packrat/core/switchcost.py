"""What a switch costs, how long a load level lasts, and whether a faster plan repays its switch.

Pure: measurements and times in, values out; no clock, no I/O.

Units. Both sides are integrals of a relative latency change over time, in seconds:
- cost = duration_s x slowdown: for duration_s seconds (from the decision until the new
  version is the default) requests take (1 + slowdown) times as long as before the switch,
  with slowdown = (latency during the switch - latency before) / latency before;
- gain = (live_ms - new_ms) / live_ms x stay_s: once switched, requests are that fraction
  faster for as long as the load stays at this level.
A switch is worth it when gain > cost: e.g. 10% faster over 30 s (gain 3 s) repays a cold
switch of 3 s at half speed (cost 1.5 s), not one of 10 s at half speed (cost 5 s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum
from statistics import median

ALPHA = 0.3            # EWMA weight of the newest switch, once a few are measured
MAX_SLOWDOWN = 10.0    # one bad measurement (a stall, a GC pause) must not forbid switching
LEVELS_KEPT = 20       # completed levels remembered: enough for a median, bounded memory
DEFAULT_STAY_S = 60.0  # no level has ended yet: assume about a minute
STAY_BOUNDS = (10.0, 600.0)


class Kind(Enum):
    WARM = "warm"  # the target shape was loaded as a standby version: set-default and drain
    COLD = "cold"  # a new version: workers start, load and warm on cores that still serve

    @staticmethod
    def of(warm: bool) -> Kind:
        return Kind.WARM if warm else Kind.COLD


@dataclass(frozen=True)
class SwitchCost:
    """One kind's switches: EWMAs of their duration and slowdown, and how many were measured
    (0: the values are the defaults)."""

    duration_s: float
    slowdown: float
    count: int = 0

    @property
    def cost_s(self) -> float:
        return self.duration_s * self.slowdown

    def describe(self) -> str:
        source = f"{self.count} measured" if self.count else "default"
        return f"{self.duration_s:.1f} s x {self.slowdown:.2f} slowdown ({source})"


@dataclass(frozen=True)
class SwitchStats:
    """A model's switch costs by kind. Defaults until measured, deliberately pessimistic:
    cold, 10 s at half speed (slowdown 1.0): a large model's workers load for seconds while
    the old version's workers serve on the same cores, so the first automatic switch must be
    clearly worth it (the README measured 1.5 to 3.5 s for small-cnn; the first measurement
    replaces the default). Warm, 0.5 s at 10% slower: set-default and a drain, no loading."""

    warm: SwitchCost = SwitchCost(0.5, 0.1)
    cold: SwitchCost = SwitchCost(10.0, 1.0)

    def of(self, kind: Kind) -> SwitchCost:
        return self.warm if kind is Kind.WARM else self.cold

    def cost(self, warm: bool) -> tuple[float, float]:
        """(duration_s, slowdown) of a switch of that kind, as worth_switching takes it; the
        slowdown at least MIN_SLOWDOWN of its kind: a switch measured as free (the load fell
        meanwhile) still loads or drains workers on the serving cores."""
        kind = Kind.of(warm)
        c = self.of(kind)
        return (c.duration_s, max(c.slowdown, MIN_SLOWDOWN[kind]))


MIN_SLOWDOWN = {Kind.COLD: 0.25, Kind.WARM: 0.05}
NO_MEASUREMENTS = SwitchStats()  # the defaults, as a shared immutable value


def observe(stats: SwitchStats, kind: Kind, duration_s: float, slowdown: float) -> SwitchStats:
    """The stats after one measured switch. The first measurement replaces the default, the
    next few are averaged (weight 1/(n+1)), then an EWMA of weight ALPHA follows drift.
    slowdown is clipped to [0, MAX_SLOWDOWN] (a switch that sped serving up cost nothing); a
    NaN or infinite measurement is ignored."""
    if not (math.isfinite(duration_s) and math.isfinite(slowdown)):
        return stats
    duration_s = max(0.0, duration_s)
    slowdown = min(MAX_SLOWDOWN, max(0.0, slowdown))
    old = stats.of(kind)
    w = max(ALPHA, 1.0 / (old.count + 1))
    new = SwitchCost(w * duration_s + (1 - w) * old.duration_s,
                     w * slowdown + (1 - w) * old.slowdown, old.count + 1)
    return replace(stats, **{kind.value: new})


@dataclass(frozen=True)
class LevelHistory:
    """How long the estimated B stayed at one value: the current level (batch, since) and the
    durations of the last LEVELS_KEPT completed ones, oldest first."""

    batch: int | None = None
    since: float | None = None
    durations: tuple[float, ...] = ()


NO_LEVELS = LevelHistory()


def observe_level(history: LevelHistory, batch: int, now: float,
                  keep: int = LEVELS_KEPT) -> LevelHistory:
    """Record the estimate B at time now. The same B again changes nothing, so the controller
    may call this after every estimator step; a new B ends the current level."""
    if history.batch == batch:
        return history
    if history.batch is None or history.since is None:
        return LevelHistory(batch, now, history.durations)
    ended = max(0.0, now - history.since)
    return LevelHistory(batch, now, (history.durations + (ended,))[-keep:])


def expected_stay_s(history: LevelHistory, now: float,
                    bounds: tuple[float, float] = STAY_BOUNDS) -> float:
    """How long the current level is expected to last: the median of the completed levels
    (DEFAULT_STAY_S with none), or the current level's age if it has lasted longer already (a
    level that outlived the usual one is likely a long one, and a switch declined at its
    start gets reconsidered), bounded: a level never pays for more than bounds[1] (load
    changes beyond that horizon are not foreseeable) nor less than bounds[0]."""
    low, high = bounds
    stay = median(history.durations) if history.durations else DEFAULT_STAY_S
    if history.since is not None:
        stay = max(stay, now - history.since)
    return min(high, max(low, stay))


@dataclass(frozen=True)
class SwitchJudgement:
    """The numbers behind a switch decision, for the log."""

    relative: float   # (live - new) / live
    stay_s: float
    gain_s: float
    cost_s: float
    min_gain: float
    worth: bool

    def describe(self) -> str:
        pct = f"{self.relative:.0%} faster over {self.stay_s:.0f} s"
        if self.relative < self.min_gain or self.relative <= 0:
            return f"{pct}: below the {self.min_gain:.0%} floor"
        sign = ">" if self.gain_s > self.cost_s else "<="
        return f"gain {self.gain_s:.1f} s {sign} cost {self.cost_s:.1f} s ({pct})"


def judge_switch(live_ms: float, new_ms: float, stay_s: float, cost: tuple[float, float],
                 min_gain: float = 0.0) -> SwitchJudgement:
    """Whether to leave a plan of live_ms for one of new_ms (latencies at the estimated B)
    when the level is expected to last stay_s more and a switch costs cost = (duration_s,
    slowdown). A live latency the profile cannot tell (inf) counts as a 100% gain."""
    duration_s, slowdown = cost
    if math.isinf(live_ms) and math.isfinite(new_ms):
        relative = 1.0
    elif live_ms > 0 and math.isfinite(live_ms) and math.isfinite(new_ms):
        relative = (live_ms - new_ms) / live_ms
    else:
        relative = 0.0  # nothing is known to be gained
    gain_s = relative * stay_s
    cost_s = duration_s * slowdown
    worth = new_ms < live_ms and relative > 0 and relative >= min_gain and gain_s > cost_s
    return SwitchJudgement(relative, stay_s, gain_s, cost_s, min_gain, worth)


def worth_switching(live_ms: float, new_ms: float, stay_s: float, cost: tuple[float, float],
                    min_gain: float = 0.0) -> bool:
    return judge_switch(live_ms, new_ms, stay_s, cost, min_gain).worth


def patience_for(warm: bool, base_patience: int) -> int:
    """Intervals the estimator waits before adopting a new B: a warm switch costs little, so a
    third of the patience (at least one interval) is enough; a cold one keeps it all."""
    return max(1, base_patience // 3) if warm else base_patience


def mean_latency_ms(totals: tuple[tuple[float, float, float], ...], t0: float,
                    t1: float) -> float | None:
    """Mean request latency between t0 and t1 from running totals (time, requests,
    latency_us) sampled now and then: the samples last at or before each end. None where
    no request was answered between them (or a sample is missing)."""
    def at(t):
        return next((s for s in reversed(totals) if s[0] <= t), None)

    a, b = at(t0), at(t1)
    if a is None or b is None or b[1] - a[1] <= 0:
        return None
    return (b[2] - a[2]) / (b[1] - a[1]) / 1000.0
