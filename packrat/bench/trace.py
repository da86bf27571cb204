"""`packrat bench --trace`: one load trace replayed against four configurations, each on its
own fresh `packrat serve` (own run directory and TorchServe, loopback only), one after the
other, with the same seeded arrivals (`core.trace.arrivals`) and the same archive and profile:

- `baseline`: one all-cores instance, batch = the B of the trace's peak, held by a manual plan;
- `static`: the optimizer's plan for the trace's mean load, held the same way;
- `packrat-cold`: `packrat serve --standby-memory 0`, automatic;
- `packrat-warm`: `packrat serve` with its default standby budget, automatic.

The B of a rate: the smallest B whose served plan's throughput, B / its predicted latency,
covers the rate (the smallest batch that keeps up, which is where the estimator's B = rate x
latency settles); a rate no plan covers gets the B of the highest throughput. Built-in shapes
are scaled to a peak of PEAK_FRACTION of that highest throughput; a CSV trace is used as given.
Rates and plans come from the profile calibrated through TorchServe before the first
configuration, as `packrat serve` calibrates it (cached beside the profile, so every serve
plans with the same figures; as measured with --no-calibrate or if calibration fails).

Each configuration is first warmed up, not measured: Poisson arrivals at the trace's mean
rate for at least `warmup_seconds` and until its plan has settled (no switch under way, none
in the last SETTLE_S, and no backlog left in flight: an automatic controller starts from the
plan for B = 1 and may switch more than once), at most WARMUP_EXTRA_S longer; the trace
follows at once (the warm-up stops sending and waits for its few requests in flight).
The default SLO is SLO_FACTOR x the baseline's p50 over its warm-up, which is at the mean rate.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from packrat.bench.configs import QUIET_WAIT_S, Config
from packrat.core.optimizer import Optimizer
from packrat.core.policy import served_latency
from packrat.core.stats import percentile
from packrat.core.trace import SHAPES, Trace, arrivals, scaled, trace_from_csv
from packrat.errors import PackratError
from packrat.measure.foreign import FOREIGN_LIMIT_CORES

if TYPE_CHECKING:  # the open-loop generator imports requests: only when a trace runs
    from packrat.measure.openloop import OpenLoopResult

CONFIGURATIONS = ("baseline", "static", "packrat-cold", "packrat-warm")
DEFAULT_DURATION_S = 180.0
PEAK_FRACTION = 0.8     # built-in shapes peak at this fraction of the best plan's throughput
SLO_FACTOR = 2.0        # default SLO: this x the baseline's p50 at the mean rate
JOB_QUEUE_SIZE = 10000  # TorchServe's queue: no request refused for a full queue
MAX_BATCH = 32          # profiling grid, as `packrat serve`
MAX_BATCH_DELAY_MS = 10  # as `packrat serve`
TIMEOUT_S = 120.0       # per request
SERVE_START_S = 900.0   # profiling and calibrating a large model the first time
PROGRESS_EVERY_S = 10.0
WARMUP_EXTRA_S = 60.0   # the warm-up waits at most this long past its minimum for a plan to settle
SETTLE_S = 5.0          # settled: no switch under way, none promoted in this long,
DRAINED_BATCHES = 4     # and no more in flight than this many batch latencies bring


def warmup_seconds(duration_s: float) -> float:
    return min(15.0, max(5.0, 0.1 * duration_s))


# -- rates and plans (pure) ------------------------------------------------------------------

def plan_throughput(opt: Optimizer, batch: int) -> float:
    """Requests per second of the served plan for B running back to back: B / its latency."""
    served = opt.plan(batch).served
    return 0.0 if served is None else batch * 1000.0 / served.latency_ms


def best_throughput(opt: Optimizer) -> tuple[float, int]:
    """(the highest throughput of any B's served plan, the smallest B that reaches it)."""
    rps, neg_b = max((plan_throughput(opt, b), -b) for b in range(1, opt.max_servable + 1))
    return rps, -neg_b


def batch_for_rate(opt: Optimizer, rps: float) -> int:
    """The smallest B whose served plan keeps up with rps; the best plan's B if none does."""
    for b in range(1, opt.max_servable + 1):
        if plan_throughput(opt, b) >= rps:
            return b
    return best_throughput(opt)[1]


def load_trace(spec: str, duration_s: float | None, seed: int) -> tuple[Trace, bool]:
    """(the trace, whether it is a built-in shape to scale): a shape name or a CSV file."""
    if spec in SHAPES:
        return SHAPES[spec](duration_s or DEFAULT_DURATION_S, 1.0, seed), True
    path = Path(spec)
    if not path.is_file():
        raise PackratError(f"--trace {spec}: neither a shape ({', '.join(SHAPES)}) nor a "
                           "CSV file of seconds,requests_per_second rows")
    return trace_from_csv(path.read_text(), spec, duration_s), False


def rated(trace: Trace, is_shape: bool, opt: Optimizer) -> Trace:
    return scaled(trace, PEAK_FRACTION * best_throughput(opt)[0]) if is_shape else trace


@dataclass(frozen=True)
class HeldPlan:
    """A manual plan a configuration holds, and the profile's prediction (None: unknown)."""

    config: Config
    predicted_ms: float | None

    def to_json(self) -> dict:
        inst = {"threads": self.config.threads, "batch": self.config.batch_size}
        return {"instances": [dict(inst) for _ in range(self.config.instances)],
                "latency_ms": _r(self.predicted_ms)}


def baseline_plan(opt: Optimizer, rps: float) -> HeldPlan:
    b = batch_for_rate(opt, rps)
    return HeldPlan(Config(opt.cores, 1, b), _finite(served_latency(opt, opt.cores, 1, b, b)))


def static_plan(opt: Optimizer, rps: float) -> HeldPlan:
    served = opt.plan(batch_for_rate(opt, rps)).served
    assert served is not None  # batch_for_rate only picks a B with a served plan
    size = max(i.batch for i in served.instances)
    return HeldPlan(Config(served.instances[0].threads, len(served.instances), size),
                    served.latency_ms)


# -- results (pure) --------------------------------------------------------------------------

@dataclass(frozen=True)
class SwitchRecord:
    at_s: float      # decision, seconds after the trace started
    seconds: float   # decision to new default
    warm: bool
    to: Config

    def to_json(self) -> dict:
        inst = {"threads": self.to.threads, "batch": self.to.batch_size}
        return {"at_s": _r(self.at_s), "seconds": _r(self.seconds), "warm": self.warm,
                "to": {"instances": [dict(inst) for _ in range(self.to.instances)]}}


def read_switches(path: Path, model: str, since_unix: float) -> tuple[SwitchRecord, ...]:
    """The controller's own (reason auto or overload) successful switches of model in a
    switches.jsonl, decided at or after since_unix; unreadable lines are skipped."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return ()
    for line in lines:
        try:
            d = json.loads(line)
            if (d["model"] != model or d["reason"] not in ("auto", "overload") or not d["ok"]
                    or d["at_unix"] < since_unix):
                continue
            p = d["plan"]
            to = Config(int(p["threads"]), int(p["instances"]), int(p["batch"]))
            out.append(SwitchRecord(float(d["at_unix"]) - since_unix, float(d["seconds"]),
                                    bool(d["warm"]), to))
        except (ValueError, KeyError, TypeError):
            continue
    return tuple(sorted(out, key=lambda s: s.at_s))


LOAD_CHANGE = 1.5  # a step of the trace whose rate changes by this factor or more


@dataclass(frozen=True)
class Reaction:
    """A load change of the trace and how long until a new plan served after it."""
    at_s: float
    rps_from: float
    rps_to: float
    serving_after_s: float | None  # load change to the first switch's new default; None: none

    def to_json(self) -> dict:
        return {"at_s": _r(self.at_s), "rps_from": _r(self.rps_from), "rps_to": _r(self.rps_to),
                "serving_after_s": _r(self.serving_after_s)}


def reactions(trace: Trace, switches: tuple[SwitchRecord, ...]) -> tuple[Reaction, ...]:
    """Per load change of the trace (a step whose rate differs by LOAD_CHANGE or more from
    the one before): seconds from it to the new default of the first switch decided after it
    and before the next load change (None where no switch came)."""
    changes = [(b.start_s, a.rps, b.rps) for a, b in zip(trace.steps, trace.steps[1:])
               if max(a.rps, b.rps) >= LOAD_CHANGE * min(a.rps, b.rps) and max(a.rps, b.rps) > 0]
    out = []
    for k, (at, before, after) in enumerate(changes):
        until = changes[k + 1][0] if k + 1 < len(changes) else math.inf
        first = next((s for s in switches if at <= s.at_s < until), None)
        out.append(Reaction(at, before, after,
                            None if first is None else first.at_s + first.seconds - at))
    return tuple(out)


@dataclass(frozen=True)
class StandbyMemory:
    """The standby budget against what was in it: the PSS of every version of the model but
    the default (standby versions, and one loading ahead of need), sampled while no switch
    was under way (a switch's versions are the switch's, not standby)."""

    budget_mb: float
    max_mb: float | None             # None: no sample
    samples: int

    @property
    def honoured(self) -> bool | None:
        return None if self.max_mb is None else self.max_mb <= self.budget_mb

    def to_json(self) -> dict:
        return {"budget_mb": _r(self.budget_mb, 1), "max_mb": _r(self.max_mb, 1),
                "samples": self.samples, "honoured": self.honoured}


@dataclass(frozen=True)
class ConfigResult:
    name: str
    plan: HeldPlan | None            # None: Packrat chooses
    load: OpenLoopResult             # the trace's requests, scheduled from its start
    switches: tuple[SwitchRecord, ...]
    warmup_p50_ms: float | None = None  # over the warm-up, at the trace's mean rate
    foreign_cores: float = 0.0       # CPU other processes used meanwhile (not in the JSON)
    standby: StandbyMemory | None = None  # sampled over the trace (automatic plans only)

    def to_json(self, slo_ms: float, trace: Trace | None = None) -> dict:
        r = self.load
        changes = {} if trace is None or self.plan is not None else {
            "load_changes": [x.to_json() for x in reactions(trace, self.switches)]}
        if self.standby is not None:
            changes["standby_memory"] = self.standby.to_json()
        return {"plan": None if self.plan is None else self.plan.to_json(),
                "requests": r.count, "failed": r.failed, "unanswered": r.unanswered,
                "dropped": r.dropped, "mean_ms": _r(r.mean_ms()), "p50_ms": _r(r.p50_ms()),
                "p99_ms": _r(r.p99_ms()), "slo_ms": _r(slo_ms),
                "slo_attainment": round(r.slo_attainment(slo_ms), 4),
                "switches": [s.to_json() for s in self.switches], **changes}


@dataclass(frozen=True)
class TraceResult:
    model: str
    trace: Trace                     # as replayed (scaled)
    seed: int
    slo_ms: float
    slo_source: str                  # how slo_ms was chosen, in words
    configurations: dict[str, ConfigResult]

    def to_json(self) -> dict:
        return {"model": self.model, "trace": self.trace.name,
                "duration_s": self.trace.duration_s, "seed": self.seed,
                "configurations": {k: c.to_json(self.slo_ms, self.trace)
                                   for k, c in self.configurations.items()}}


def ts_config_text(ports, queue: int = JOB_QUEUE_SIZE) -> str:
    """A config.properties for `serve --ts-config`: every listener on loopback, these ports,
    a queue no trace fills."""
    host = "127.0.0.1"
    return (f"inference_address=http://{host}:{ports.inference}\n"
            f"management_address=http://{host}:{ports.management}\n"
            f"metrics_address=http://{host}:{ports.metrics}\n"
            f"grpc_inference_address={host}\ngrpc_inference_port={ports.grpc_inference}\n"
            f"grpc_management_address={host}\ngrpc_management_port={ports.grpc_management}\n"
            f"job_queue_size={queue}\n")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


# -- the run ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TraceOptions:
    zoo: str
    trace: str                      # a shape name or a CSV file
    duration_s: float | None = None  # None: DEFAULT_DURATION_S for shapes, the CSV's own
    seed: int = 0
    slo_ms: float | None = None     # None: SLO_FACTOR x the baseline's warm-up p50
    out: Path = Path("bench-out")
    cores: int | None = None        # None: all usable
    max_batch: int = MAX_BATCH
    max_batch_delay_ms: int = MAX_BATCH_DELAY_MS
    calibrate: bool = True          # False: serve --no-calibrate, rates from the raw profile
    quiet_wait_s: float = QUIET_WAIT_S  # before each measurement, for other processes to finish


def run_trace_bench(options: TraceOptions, say: Callable[[str], None] = lambda s: None
                    ) -> TraceResult:
    """Run the four configurations; every `packrat serve` is stopped on the way out."""
    from packrat.bench.trace_serve import Served, prepare

    if options.duration_s is not None and not 0 < options.duration_s < math.inf:
        raise PackratError(f"--duration must be > 0 seconds, got {options.duration_s}")
    if options.slo_ms is not None and not 0 < options.slo_ms < math.inf:
        raise PackratError(f"--slo-ms must be > 0, got {options.slo_ms}")
    base, is_shape = load_trace(options.trace, options.duration_s, options.seed)
    started = time.monotonic()

    def tell(msg: str) -> None:
        say(f"[{time.monotonic() - started:5.0f} s] {msg}")

    ready = prepare(options, tell)
    trace = rated(base, is_shape, ready.optimizer)
    plans = {"baseline": baseline_plan(ready.optimizer, trace.peak_rps),
             "static": static_plan(ready.optimizer, trace.mean_rps)}
    warm_s = warmup_seconds(trace.duration_s)
    tell(f"trace {trace.describe()}; warm-ups of at least {warm_s:g} s at "
         f"{trace.mean_rps:.1f} rps; "
         f"baseline {plans['baseline'].config.describe()}, static "
         f"{plans['static'].config.describe()}")
    schedule = arrivals(trace, options.seed)
    results: dict[str, ConfigResult] = {}
    for name in CONFIGURATIONS:
        with Served(name, ready, options, tell) as served:
            if name in plans:
                served.hold(plans[name].config)
            head = served.warm_up(trace.mean_rps, warm_s, warm_s + WARMUP_EXTRA_S,
                                  options.seed + 1)
            load, since, foreign, standby = served.replay(schedule, trace.duration_s,
                                                          trace.peak_rps)
            served.stop()  # before reading its switches: none is logged after this
            switches = read_switches(served.switch_log, options.zoo, since)
        results[name] = ConfigResult(name, plans.get(name), load, switches,
                                     percentile(head, 50) if head else None, foreign,
                                     None if name in plans else standby)
        tell(f"{name}: {load.summary()}; {len(switches)} switches"
             + (f"; other processes used {foreign:.2f} cores meanwhile: disturbed"
                if foreign > FOREIGN_LIMIT_CORES else ""))
    slo, source = _slo(options.slo_ms, results["baseline"])
    tell(f"SLO {slo:.1f} ms ({source}); done")
    return TraceResult(options.zoo, trace, options.seed, slo, source, results)


def _slo(given: float | None, baseline: ConfigResult) -> tuple[float, str]:
    if given is not None:
        return given, "--slo-ms"
    if baseline.warmup_p50_ms is not None:
        return (SLO_FACTOR * baseline.warmup_p50_ms,
                f"{SLO_FACTOR:g} x the baseline's p50 over its warm-up at the mean rate")
    p50 = baseline.load.p50_ms()
    if p50 is None:
        raise PackratError("the baseline answered no request, so there is no default SLO; "
                           "give --slo-ms")
    return SLO_FACTOR * p50, f"{SLO_FACTOR:g} x the baseline's p50 over the trace"
