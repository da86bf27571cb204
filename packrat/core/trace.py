"""Load traces for open-loop runs: a request rate over time, and seeded arrivals following it.

A `Trace` is piecewise constant: `steps[i].rps` holds from `steps[i].start_s` until the next
step's start (the last one until `duration_s`). Piecewise constant rather than linear because
a CSV of per-interval request rates means exactly that, and because the cumulative rate is
then piecewise linear, so arrivals invert it exactly. Smooth shapes (`diurnal`) are
stepped finely enough (48 steps) that the steps do not show in a latency plot.

Built-in shapes take (duration_s, peak_rps, seed); all but `steady` (60% of it throughout)
reach exactly `peak_rps`. Only `bursty` uses its seed. Scale a shape to a model with
`scaled(trace, 0.8 * best_plan_throughput)`.

Pure: no clock, no I/O; `trace_from_csv` parses text its caller read.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

from packrat.errors import PackratError


class TraceError(PackratError):
    """A trace is malformed (bad CSV row, negative rate, steps out of order)."""


@dataclass(frozen=True)
class Step:
    start_s: float
    rps: float  # requests per second from start_s until the next step


@dataclass(frozen=True)
class Trace:
    name: str
    duration_s: float
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise TraceError(f"trace {self.name}: duration {self.duration_s} s must be > 0")
        if not self.steps or self.steps[0].start_s != 0:
            raise TraceError(f"trace {self.name}: the first step must start at 0 s")
        for a, b in zip(self.steps, self.steps[1:]):
            if not a.start_s < b.start_s:
                raise TraceError(f"trace {self.name}: step at {b.start_s} s does not come "
                                 f"after the step at {a.start_s} s; starts must increase")
        if self.steps[-1].start_s >= self.duration_s:
            raise TraceError(f"trace {self.name}: step at {self.steps[-1].start_s} s is not "
                             f"before the end ({self.duration_s} s)")
        for s in self.steps:
            if not (math.isfinite(s.rps) and s.rps >= 0):
                raise TraceError(f"trace {self.name}: rate {s.rps} at {s.start_s} s must be "
                                 "a finite number >= 0")

    def _ends(self) -> list[float]:
        return [s.start_s for s in self.steps[1:]] + [self.duration_s]

    def rate_at(self, t: float) -> float:
        """The rate at t seconds; 0 outside [0, duration_s)."""
        if not 0 <= t < self.duration_s:
            return 0.0
        i = bisect.bisect_right([s.start_s for s in self.steps], t) - 1
        return self.steps[i].rps

    @property
    def expected_requests(self) -> float:
        """The integral of the rate: the mean number of arrivals over the trace."""
        return sum(s.rps * (end - s.start_s) for s, end in zip(self.steps, self._ends()))

    @property
    def mean_rps(self) -> float:
        return self.expected_requests / self.duration_s

    @property
    def peak_rps(self) -> float:
        return max(s.rps for s in self.steps)

    def describe(self) -> str:
        """e.g. "bursty: 60 s, mean 12.3 rps, peak 40.0 rps, ~738 requests"."""
        return (f"{self.name}: {self.duration_s:g} s, mean {self.mean_rps:.1f} rps, "
                f"peak {self.peak_rps:.1f} rps, ~{self.expected_requests:.0f} requests")


def scaled(trace: Trace, peak_rps: float) -> Trace:
    """The same shape with its highest rate at peak_rps (e.g. 80% of a plan's throughput)."""
    if not (math.isfinite(peak_rps) and peak_rps > 0):
        raise TraceError(f"cannot scale trace {trace.name} to a peak of {peak_rps} rps: "
                         "the peak must be a positive number")
    if trace.peak_rps == 0:
        raise TraceError(f"cannot scale trace {trace.name}: its rate is 0 throughout")
    k = peak_rps / trace.peak_rps
    return Trace(trace.name, trace.duration_s,
                 tuple(Step(s.start_s, s.rps * k) for s in trace.steps))


# -- built-in shapes ------------------------------------------------------------------------

def _check(duration_s: float, peak_rps: float) -> None:
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise TraceError(f"trace duration {duration_s} s must be > 0")
    if not (math.isfinite(peak_rps) and peak_rps > 0):
        raise TraceError(f"trace peak {peak_rps} rps must be > 0")


def steady(duration_s: float, peak_rps: float, seed: int = 0) -> Trace:
    """60% of the peak throughout (`peak_rps` is the ceiling the other shapes reach)."""
    _check(duration_s, peak_rps)
    return Trace("steady", duration_s, (Step(0.0, 0.6 * peak_rps),))


def step(duration_s: float, peak_rps: float, seed: int = 0) -> Trace:
    """25% of the peak for the first third, the peak for the second, 25% for the last:
    the plan must grow for the rise and shrink back after it."""
    _check(duration_s, peak_rps)
    low = 0.25 * peak_rps
    third = duration_s / 3
    return Trace("step", duration_s,
                 (Step(0.0, low), Step(third, peak_rps), Step(2 * third, low)))


def bursty(duration_s: float, peak_rps: float, seed: int = 0) -> Trace:
    """Bursts at the peak over a base of 20% of it. Seeded lengths: the base lasts
    0.5-1.5 x duration/6, a burst 0.5-1.5 x duration/10, so a trace holds about 4 bursts
    and its mean is about half the peak. Starts on the base and always holds one burst."""
    _check(duration_s, peak_rps)
    rng = random.Random(seed)
    base = 0.2 * peak_rps
    steps: list[Step] = []
    t, on = 0.0, False
    while t < duration_s:
        steps.append(Step(t, peak_rps if on else base))
        t += rng.uniform(0.5, 1.5) * duration_s / (10 if on else 6)
        on = not on
    # The first base step lasts at most 1.5/6 of the trace, so a burst always starts.
    return Trace("bursty", duration_s, tuple(steps))


def diurnal(duration_s: float, peak_rps: float, seed: int = 0) -> Trace:
    """A day compressed into the duration: 10% of the peak at the start and end (night),
    the peak half-way, a raised cosine between, in 48 steps; each step holds the mean of
    the curve over it, so the trace's mean is the curve's (about 55% of the peak)."""
    _check(duration_s, peak_rps)
    n, low = 48, 0.1

    def integral(x: float) -> float:  # of low + (1 - low)(1 - cos 2πx)/2 over [0, x], x in days
        return low * x + (1 - low) / 2 * (x - math.sin(2 * math.pi * x) / (2 * math.pi))

    means = [(integral((i + 1) / n) - integral(i / n)) * n for i in range(n)]
    top = max(means)  # the stepped curve reaches the peak exactly
    return Trace("diurnal", duration_s, tuple(
        Step(duration_s * i / n, peak_rps * m / top) for i, m in enumerate(means)))


SHAPES = {"steady": steady, "step": step, "bursty": bursty, "diurnal": diurnal}


# -- CSV ------------------------------------------------------------------------------------

def trace_from_csv(text: str, source: str, duration_s: float | None = None) -> Trace:
    """A trace from `seconds,requests_per_second` rows (a header line is optional; blank lines
    and lines starting with # are skipped). Each row's rate holds from its second until the
    next row's; the last row's holds until duration_s, or by default for as long as the
    interval before it (1 s if there is one row), as for a regularly sampled log.
    Errors name `source` and the line."""
    rows: list[tuple[int, float, float]] = []
    first = True
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {lineno}"
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 2:
            raise TraceError(f"{where}: expected 2 columns (seconds,requests_per_second), "
                             f"found {len(cells)}: {line[:80]!r}")
        try:
            sec, rps = float(cells[0]), float(cells[1])
        except ValueError:
            if first and not _is_number(cells[0]):
                first = False
                continue  # a header
            bad = cells[0] if not _is_number(cells[0]) else cells[1]
            raise TraceError(f"{where}: {bad!r} is not a number; rows are "
                             "seconds,requests_per_second") from None
        first = False
        if not math.isfinite(sec) or sec < 0:
            raise TraceError(f"{where}: second {cells[0]} must be a finite number >= 0")
        if not math.isfinite(rps) or rps < 0:
            raise TraceError(f"{where}: rate {cells[1]} must be a finite number >= 0")
        if not rows and sec != 0:
            raise TraceError(f"{where}: the first row must be at second 0, not {cells[0]} "
                             "(add a row '0,0' for an idle start)")
        if rows and sec <= rows[-1][1]:
            raise TraceError(f"{where}: second {cells[0]} does not come after the previous "
                             f"row's {rows[-1][1]:g}; seconds must increase")
        rows.append((lineno, sec, rps))
    if not rows:
        raise TraceError(f"{source}: no rows; expected seconds,requests_per_second lines")
    last = rows[-1][1]
    if duration_s is None:
        duration_s = last + (last - rows[-2][1] if len(rows) > 1 else 1.0)
    elif not duration_s > last:
        raise TraceError(f"{source}: duration {duration_s} s must be after the last row's "
                         f"second ({last:g}, line {rows[-1][0]})")
    return Trace(source, duration_s, tuple(Step(s, r) for _, s, r in rows))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


# -- arrivals -------------------------------------------------------------------------------

def arrivals(trace: Trace, seed: int, max_requests: int = 1_000_000) -> tuple[float, ...]:
    """Arrival times (seconds from the start, increasing) of a non-homogeneous Poisson process
    with the trace's rate, cut at max_requests. Inverts the cumulative rate: unit-rate
    exponential gaps, each mapped through the step it falls in, so the same seed gives the
    same arrivals (random.Random is stable across platforms)."""
    if max_requests < 0:
        raise TraceError(f"max_requests {max_requests} must be >= 0")
    rng = random.Random(seed)
    out: list[float] = []
    need = rng.expovariate(1.0)  # cumulative rate left until the next arrival
    for s, end in zip(trace.steps, trace._ends()):
        t = s.start_s
        if s.rps == 0:
            continue
        while len(out) < max_requests:
            room = (end - t) * s.rps
            if need >= room:
                need -= room
                break
            # need < room, so t stays inside the step; min() guards the last ulp
            t = min(t + need / s.rps, math.nextafter(end, 0.0))
            out.append(t)
            need = rng.expovariate(1.0)
        if len(out) >= max_requests:
            break
    return tuple(out)
