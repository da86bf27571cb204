"""Several models on one core budget, measured: two zoo models served together under shifted
loads, each configuration on its own fresh server, one after the other, with the same arrivals
(`scripts/bench_models.py`; issue 12's evidence).

The load. Three phases of `phase_s` seconds each: A busy and B idle, A idle and B busy, both
busy. Each model has its own open-loop Poisson arrivals (`core.trace.arrivals` of a piecewise-
constant trace per model, seeded: model k's trace uses seed 1000 x seed + k), the same for every
configuration. A model's busy rate is `busy_fraction` (default 50%) of its best-plan throughput
on all the cores (`bench.trace.best_throughput` of the profile as calibrated, as the trace
benchmark computes it), so two busy models ask for about the whole machine; its idle rate is a
trickle so that an idle model still answers, and is measured, while it is idle: `idle_rps`
(default 0.5 requests/s), at most half the allocator's idle line (`core.reallocate.IDLE_SHARE`
of one 1-thread worker's requests per second, 1 / L(1 thread, batch 1)), so that the allocator
sees it idle (for ResNet-50 on this machine that is about 0.2 requests/s).

Profiles: each zoo model is archived into OUT, profiled and calibrated as `packrat serve` will
(`bench.trace_serve.prepare`, cached, so every serve finds them), or read from `--profiles
NAME=CSV` (then passed to every `packrat serve` as they are, uncalibrated: tests use it).

The configurations, in this order, each on its own server on loopback (a config.properties
with loopback listeners and a queue no phase fills):

- `torchserve-default`: a plain TorchServe 0.12 that Packrat starts, both archives registered
  as TorchServe runs them out of the box: one unpinned worker per core per model, torch's
  default threads, batch size 1 (no controller, so no switches);
- `overlap`: `packrat serve --core-split overlap`, each model planned for all the cores, the
  plans overlapping (Packrat before issue 12; a serve without --core-split does the same, and is
  used when that flag is unknown);
- `even`: `packrat serve --core-split even`, a static even split, each model planned
  automatically within its own cores;
- `allocator`: `packrat serve --core-split auto`, the global allocator (idle models on a shared
  core, busy ones on dedicated cores, reallocated live).

A configuration whose `packrat serve` rejects one of these flags (an older Packrat) is skipped
and said so, not failed. Each is first warmed up, not measured: the first phase's arrivals for
at least `trace.warmup_seconds` of the whole trace and until no model is switching or has
switched in the last SETTLE_S and none holds a backlog, at most WARMUP_EXTRA_S longer; the
phases follow at once.

The SLO. Per model, `--slo NAME=MS`, or by default SLO_FACTOR (2) x its p50 on a settled
single-model plan: its requests in the second half of the phase where it is the only busy model,
in the `overlap` configuration (there it is planned for all the cores and the other model is
idle; the first half leaves time for the plan to grow to the load). Without an `overlap` run,
the first configuration run in CONFIGURATIONS order that answered requests there. The SLOs known
when `even` and `allocator` start (given, or measured by then) are passed to them as `--slo`.
SLO attainment is the share of a model's requests answered within its SLO (failed, unanswered
and dropped ones miss it); `all` pools both models' requests, each judged by its own SLO, so its
mean and percentiles are request-weighted.

Switches come from RUN/switches.jsonl: the live plan's successful switches in the phases
(manual ones and prewarms left out), with their reason. The allocation over time comes from
`packrat status` (per model: its cores, shared or not, its plan), sampled every second and kept
where it changed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packrat.bench.configs import Config
from packrat.bench.trace import (
    DRAINED_BATCHES,
    JOB_QUEUE_SIZE,
    MAX_BATCH,
    MAX_BATCH_DELAY_MS,
    PROGRESS_EVERY_S,
    SERVE_START_S,
    SETTLE_S,
    SLO_FACTOR,
    TIMEOUT_S,
    WARMUP_EXTRA_S,
    ConfigResult,
    SwitchRecord,
    best_throughput,
    warmup_seconds,
)
from packrat.core.optimizer import Optimizer
from packrat.core.plan import describe
from packrat.core.reallocate import IDLE_SHARE
from packrat.core.stats import percentile
from packrat.core.trace import Step, Trace
from packrat.errors import PackratError
from packrat.measure.foreign import FOREIGN_LIMIT_CORES
from packrat.measure.openloop import OpenLoopResult

CONFIGURATIONS = ("torchserve-default", "overlap", "even", "allocator")
CORE_SPLIT = {"overlap": "overlap", "even": "even", "allocator": "auto"}  # --core-split
SLO_BASIS = ("overlap", "torchserve-default", "even", "allocator")  # where the SLO comes from
TAKES_SLO = ("even", "allocator")  # configurations `--slo` is passed to
DEFAULT_MODELS = "small-cnn,resnet50"
DEFAULT_PHASE_S = 60.0
BUSY_FRACTION = 0.5   # of a model's best-plan throughput on all the cores
IDLE_RPS = 0.5        # an idle model's trickle of requests
PHASES = ((True, False), (False, True), (True, True))  # per phase: (A busy, B busy)
SAMPLE_EVERY_S = 1.0  # the allocation, from `packrat status`


class UnknownFlag(PackratError):
    """`packrat serve` does not know a flag this configuration needs (an older Packrat)."""


# -- the load (pure) -------------------------------------------------------------------------

def parse_models(spec: str) -> tuple[tuple[str, str], ...]:
    """(name, zoo model) pairs from "a=small-cnn,b=resnet50" or "small-cnn,resnet50" (a zoo
    name alone is also the model's name): exactly two, with distinct names."""
    pairs = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, zoo = item.partition("=")
        name, zoo = name.strip(), zoo.strip()
        if not sep:
            zoo = name
        if not name or not zoo:
            raise PackratError(f"--models {spec}: {item!r} is not NAME=ZOO or ZOO")
        pairs.append((name, zoo))
    names = [n for n, _ in pairs]
    if len(pairs) != 2:
        raise PackratError(f"--models {spec}: the benchmark takes exactly two models, got "
                           f"{len(pairs)} (e.g. a=small-cnn,b=resnet50)")
    if len(set(names)) != len(names):
        raise PackratError(f"--models {spec}: model {names[0]!r} is named twice; give the "
                           "same zoo model two names, e.g. a=small-cnn,b=small-cnn")
    return tuple(pairs)


def parse_slos(specs: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """{model: SLO ms} from NAME=MS items (each spec may hold several, comma-separated)."""
    out: dict[str, float] = {}
    for spec in specs:
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            name, sep, ms = item.partition("=")
            name = name.strip()
            if not sep:
                raise PackratError(f"--slo {item}: expected NAME=MS")
            if name not in names:
                raise PackratError(f"--slo {item}: no model {name!r} (models: "
                                   f"{', '.join(names)})")
            try:
                value = float(ms)
            except ValueError:
                raise PackratError(f"--slo {item}: {ms.strip()!r} is not a number of "
                                   "milliseconds") from None
            if not (math.isfinite(value) and value > 0):
                raise PackratError(f"--slo {item}: the SLO must be > 0 ms")
            out[name] = value
    return out


@dataclass(frozen=True)
class ModelLoad:
    """One model's load: `busy_rps` while busy, `idle_rps` while idle."""

    name: str
    zoo: str
    best_rps: float   # the best plan's throughput on all the cores
    busy_rps: float
    idle_rps: float

    def rate(self, busy: bool) -> float:
        return self.busy_rps if busy else self.idle_rps

    def to_json(self) -> dict:
        return {"zoo": self.zoo, "best_rps": _r(self.best_rps), "busy_rps": _r(self.busy_rps),
                "idle_rps": _r(self.idle_rps)}


def idle_ceiling(opt: Optimizer) -> float:
    """Half the allocator's idle line: IDLE_SHARE of one 1-thread worker's requests per
    second at batch 1 (inf where the profile cannot tell)."""
    ms = opt.latency(1, 1)
    return 0.5 * IDLE_SHARE * 1000.0 / ms if ms > 0 and math.isfinite(ms) else math.inf


def model_load(name: str, zoo: str, opt: Optimizer, busy_fraction: float = BUSY_FRACTION,
               idle_rps: float = IDLE_RPS) -> ModelLoad:
    """busy = busy_fraction x the best served plan's throughput on opt's cores; idle =
    idle_rps, at most idle_ceiling(opt)."""
    if not 0 < busy_fraction <= 1:
        raise PackratError(f"--busy-fraction must be in (0, 1], got {busy_fraction}")
    if not (math.isfinite(idle_rps) and idle_rps >= 0):
        raise PackratError(f"--idle-rps must be >= 0, got {idle_rps}")
    best = best_throughput(opt)[0]
    busy = busy_fraction * best
    idle_rps = min(idle_rps, idle_ceiling(opt))
    if not idle_rps < busy:
        raise PackratError(f"{name}: its idle rate {idle_rps:g} rps is not below its busy rate "
                           f"{busy:.2f} rps ({busy_fraction:g} x {best:.2f}); lower --idle-rps")
    return ModelLoad(name, zoo, best, busy, idle_rps)


def model_trace(load: ModelLoad, k: int, phase_s: float) -> Trace:
    """Model k's rate over the three phases (k = 0: A, 1: B)."""
    if not (math.isfinite(phase_s) and phase_s > 0):
        raise PackratError(f"--phase-s must be > 0, got {phase_s}")
    return Trace(load.name, len(PHASES) * phase_s,
                 tuple(Step(i * phase_s, load.rate(p[k])) for i, p in enumerate(PHASES)))


def phase_names(names: Sequence[str]) -> tuple[str, ...]:
    """e.g. ("a busy, b idle", "a idle, b busy", "both busy")."""
    a, b = names
    return tuple("both busy" if pa and pb else
                 f"{a} {'busy' if pa else 'idle'}, {b} {'busy' if pb else 'idle'}"
                 for pa, pb in PHASES)


def trace_seed(seed: int, k: int) -> int:
    return 1000 * seed + k


def warmup_seed(seed: int, k: int) -> int:
    return 1000 * seed + 500 + k


# -- results (pure) --------------------------------------------------------------------------

def between(result: OpenLoopResult, start_s: float, end_s: float) -> OpenLoopResult:
    """The requests scheduled in [start_s, end_s), as a result of their own."""
    return OpenLoopResult(tuple(r for r in result.records if start_s <= r.scheduled_s < end_s),
                          result.elapsed_s, result.timeout_s, result.max_in_flight)


@dataclass(frozen=True)
class ModelSwitch:
    """A switch of one model's live plan: the trace benchmark's record, its reason (auto, or
    whatever the allocator logs) and its cores where the log says."""

    record: SwitchRecord
    reason: str
    cores: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        return {**self.record.to_json(), "reason": self.reason,
                "cores": None if self.cores is None else list(self.cores)}


def read_model_switches(path: Path, model: str, since_unix: float) -> tuple[ModelSwitch, ...]:
    """The successful switches of model's live plan in a switches.jsonl, decided at or after
    since_unix, whatever decided them but `packrat reconfigure` (manual) and prewarms (the
    live plan stays); unreadable lines are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return ()
    out = []
    for line in lines:
        try:
            d = json.loads(line)
            if (d["model"] != model or not d["ok"] or d["reason"] in ("manual", "prewarm")
                    or d["at_unix"] < since_unix):
                continue
            p = d["plan"]
            cores = p.get("cores", d.get("cores"))
            out.append(ModelSwitch(
                SwitchRecord(float(d["at_unix"]) - since_unix, float(d["seconds"]),
                             bool(d["warm"]),
                             Config(int(p["threads"]), int(p["instances"]), int(p["batch"]))),
                str(d["reason"]), None if cores is None else tuple(int(c) for c in cores)))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return tuple(sorted(out, key=lambda s: s.record.at_s))


def allocation_of(status: Mapping, names: Sequence[str]) -> dict[str, dict]:
    """Per model, from `packrat status --json`: its cores (the `cores` field; where that is
    "shared" or empty, those its live plan's workers are pinned to), whether it is on the
    shared core, its live plan."""
    out = {}
    for name in names:
        m = (status.get("models") or {}).get(name) or {}
        insts = (m.get("plan") or {}).get("instances") or []
        cores = m.get("cores")
        if not isinstance(cores, list) or not cores:  # "shared", or none allocated yet
            cores = sorted({c for i in insts for c in i.get("planned_cores", ())})
        out[name] = {"cores": [int(c) for c in cores], "shared": bool(m.get("shared", False)),
                     "plan": describe(len(insts), insts[0]["threads"], insts[0]["batch"])
                     if insts else "-"}
    return out


@dataclass(frozen=True)
class AllocationSample:
    at_s: float                 # seconds into the phases
    models: dict[str, dict]     # allocation_of
    reason: str | None = None   # the status' allocation.reason, where it has one

    def to_json(self) -> dict:
        return {"at_s": _r(self.at_s), "models": self.models, "reason": self.reason}


def describe_allocation(models: Mapping[str, dict]) -> str:
    """e.g. "a 2x<t=1,b=4> on 0,1; b 1x<t=1,b=1> shared on 0"."""
    return "; ".join(f"{n} {m['plan']}" + (" shared" if m["shared"] else "")
                     + (f" on {','.join(map(str, m['cores']))}" if m["cores"] else "")
                     for n, m in models.items())


@dataclass(frozen=True)
class ConfigRun:
    """One configuration: per model its open-loop result (the phases' requests, scheduled
    from their start) and switches; the allocation over time."""

    name: str
    serve: str                                # how it was served, in words
    loads: dict[str, OpenLoopResult]
    switches: dict[str, tuple[ModelSwitch, ...]]
    allocations: tuple[AllocationSample, ...] = ()
    foreign_cores: float = 0.0                # CPU other processes used meanwhile
    error: str | None = None                  # the server died during the run

    def model_json(self, name: str, slo_ms: float, phase_s: float) -> dict:
        out = ConfigResult(self.name, None, self.loads[name], ()).to_json(slo_ms)
        del out["plan"]
        out["switches"] = [s.to_json() for s in self.switches.get(name, ())]
        out["phases"] = [phase_json(between(self.loads[name], i * phase_s, (i + 1) * phase_s),
                                    slo_ms) for i in range(len(PHASES))]
        return out

    def to_json(self, slos: Mapping[str, float], phase_s: float) -> dict:
        return {"serve": self.serve,
                "models": {n: self.model_json(n, slos[n], phase_s) for n in self.loads},
                "all": pooled_json(self.loads, slos,
                                   sum(len(s) for s in self.switches.values())),
                "allocations": [a.to_json() for a in self.allocations],
                "foreign_cores": _r(self.foreign_cores), "error": self.error}


def phase_json(r: OpenLoopResult, slo_ms: float) -> dict:
    return {"requests": r.count, "lost": r.failed + r.unanswered + r.dropped,
            "p50_ms": _r(r.p50_ms()), "p99_ms": _r(r.p99_ms()),
            "slo_attainment": round(r.slo_attainment(slo_ms), 4)}


def pooled_json(loads: Mapping[str, OpenLoopResult], slos: Mapping[str, float],
                switches: int) -> dict:
    """Both models' requests together, each judged by its own model's SLO: request-weighted."""
    lat = [x for r in loads.values() for x in r.latencies_ms()]
    n = sum(r.count for r in loads.values())
    met = sum(r.slo_attainment(slos[name]) * r.count for name, r in loads.items())
    return {"requests": n, "failed": sum(r.failed for r in loads.values()),
            "unanswered": sum(r.unanswered for r in loads.values()),
            "dropped": sum(r.dropped for r in loads.values()),
            "mean_ms": _r(sum(lat) / len(lat)) if lat else None,
            "p50_ms": _r(percentile(lat, 50)) if lat else None,
            "p99_ms": _r(percentile(lat, 99)) if lat else None,
            "slo_attainment": round(met / n, 4) if n else 1.0, "switches": switches}


def alone_window(k: int, phase_s: float) -> tuple[float, float]:
    """The second half of the phase where model k is the only busy one."""
    return (k + 0.5) * phase_s, (k + 1) * phase_s


def choose_slos(names: Sequence[str], given: Mapping[str, float],
                runs: Mapping[str, ConfigRun], phase_s: float
                ) -> tuple[dict[str, float], dict[str, str]]:
    """({model: SLO ms}, {model: where it came from}) for the models with a given SLO or one
    the runs so far can tell (see the module's docstring); the others are left out."""
    slos, sources = {}, {}
    for k, name in enumerate(names):
        if name in given:
            slos[name], sources[name] = given[name], "--slo"
            continue
        start, end = alone_window(k, phase_s)
        for config in SLO_BASIS:
            if config not in runs:
                continue
            p50 = between(runs[config].loads[name], start, end).p50_ms()
            if p50 is not None:
                slos[name] = SLO_FACTOR * p50
                sources[name] = (f"{SLO_FACTOR:g} x its p50 in {config}, {start:g}-{end:g} s "
                                 f"(the only busy model)")
                break
    return slos, sources


@dataclass(frozen=True)
class MultiResult:
    loads: tuple[ModelLoad, ...]
    cores: int
    phase_s: float
    seed: int
    busy_fraction: float
    slos: dict[str, float]
    slo_sources: dict[str, str]
    configurations: dict[str, ConfigRun]
    skipped: dict[str, str] = field(default_factory=dict)  # configuration: why

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.loads)

    def to_json(self) -> dict:
        names = self.names
        return {
            "models": {m.name: {**m.to_json(), "slo_ms": _r(self.slos[m.name]),
                                "slo_source": self.slo_sources[m.name]} for m in self.loads},
            "cores": self.cores, "phase_s": self.phase_s, "seed": self.seed,
            "busy_fraction": self.busy_fraction,
            "phases": [{"name": label, "start_s": i * self.phase_s,
                        "end_s": (i + 1) * self.phase_s,
                        "rps": {m.name: _r(m.rate(PHASES[i][k]))
                                for k, m in enumerate(self.loads)}}
                       for i, label in enumerate(phase_names(names))],
            "configurations": {n: c.to_json(self.slos, self.phase_s)
                               for n, c in self.configurations.items()},
            "skipped": dict(self.skipped),
        }


def render_table(result: MultiResult) -> str:
    """The readable table: per configuration a row per model and one for both (`all`)."""
    names = result.names
    who = " + ".join(m.name if m.zoo == m.name else f"{m.zoo} ({m.name})" for m in result.loads)
    out = [(f"{who} on {result.cores} cores; phases of {result.phase_s:g} s: "
           f"{' | '.join(phase_names(names))}; seed {result.seed}")]
    for m in result.loads:
        out.append(f"  {m.name}: busy {m.busy_rps:.1f} rps ({result.busy_fraction:.0%} of its "
                   f"best plan's {m.best_rps:.1f}), idle {m.idle_rps:g} rps; SLO "
                   f"{result.slos[m.name]:.1f} ms ({result.slo_sources[m.name]})")
    out.append(f"{'configuration':<20}{'model':<10}{'mean ms':>9}{'p50 ms':>9}{'p99 ms':>9}"
               f"{'SLO met':>9}  {'p50 by phase':<20}{'failed/unans.':<15}switches")
    for cname, c in result.configurations.items():
        j = c.to_json(result.slos, result.phase_s)
        rows = [(n, j["models"][n]) for n in names] + [("all", j["all"])]
        for k, (n, d) in enumerate(rows):
            lost = f"{d['failed']}/{d['unanswered']}" + (f" +{d['dropped']}dr"
                                                         if d["dropped"] else "")
            phases = ("/".join(_ms(p["p50_ms"], 0) for p in d["phases"]) if "phases" in d
                      else "")
            sw = d["switches"] if isinstance(d["switches"], int) else len(d["switches"])
            out.append(f"{cname if k == 0 else '':<20}{n:<10}{_ms(d['mean_ms']):>9}"
                       f"{_ms(d['p50_ms']):>9}{_ms(d['p99_ms']):>9}"
                       f"{d['slo_attainment']:>9.1%}  {phases:<20}{lost:<15}{sw}")
        if c.foreign_cores > FOREIGN_LIMIT_CORES:
            out.append(f"{'':<20}disturbed: other processes used {c.foreign_cores:.2f} cores")
        if c.error:
            out.append(f"{'':<20}FAILED: {c.error}")
    for cname, why in result.skipped.items():
        out.append(f"skipped {cname}: {why}")
    return "\n".join(out) + "\n"


def _ms(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


# -- the run ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class MultiOptions:
    models: tuple[tuple[str, str], ...]      # (name, zoo model), two
    phase_s: float = DEFAULT_PHASE_S
    busy_fraction: float = BUSY_FRACTION
    idle_rps: float = IDLE_RPS
    seed: int = 0
    slos: dict[str, float] = field(default_factory=dict)  # given; the others measured
    profiles: dict[str, Path] = field(default_factory=dict)  # given (model: CSV); others measured
    configurations: tuple[str, ...] = CONFIGURATIONS
    out: Path = Path("bench-out")
    cores: int | None = None                 # None: all usable
    max_batch: int = MAX_BATCH
    max_batch_delay_ms: int = MAX_BATCH_DELAY_MS
    calibrate: bool = True
    quiet_wait_s: float = 120.0              # before each warm-up, for other processes to end

    def check(self) -> None:
        """Errors found before anything starts."""
        parse_models(",".join(f"{n}={z}" for n, z in self.models))
        unknown = [c for c in self.configurations if c not in CONFIGURATIONS]
        if unknown or not self.configurations:
            raise PackratError(f"--configs: {', '.join(unknown) or 'none given'}; choose among "
                               f"{', '.join(CONFIGURATIONS)}")
        if not (math.isfinite(self.phase_s) and self.phase_s > 0):
            raise PackratError(f"--phase-s must be > 0, got {self.phase_s}")
        if not 0 < self.busy_fraction <= 1:
            raise PackratError(f"--busy-fraction must be in (0, 1], got {self.busy_fraction}")
        if not (math.isfinite(self.idle_rps) and self.idle_rps >= 0):
            raise PackratError(f"--idle-rps must be >= 0, got {self.idle_rps}")
        names = [n for n, _ in self.models]
        parse_slos([f"{n}={v}" for n, v in self.slos.items()], names)
        for name, csv in self.profiles.items():
            if name not in names:
                raise PackratError(f"--profiles {name}={csv}: no model {name!r} (models: "
                                   f"{', '.join(names)})")
            if not Path(csv).is_file():
                raise PackratError(f"--profiles {name}={csv}: no such file")


def parse_profiles(spec: str | None) -> dict[str, Path]:
    """{model: profile CSV} from "a=A.csv,b=B.csv" (MultiOptions.check checks them)."""
    out: dict[str, Path] = {}
    for item in (s.strip() for s in (spec or "").split(",")):
        if not item:
            continue
        name, sep, csv = item.partition("=")
        if not sep or not name.strip() or not csv.strip():
            raise PackratError(f"--profiles {item}: expected NAME=FILE.csv")
        out[name.strip()] = Path(csv.strip())
    return out


def run_multi_bench(options: MultiOptions, say: Callable[[str], None] = lambda s: None
                    ) -> MultiResult:
    """Run the configurations one after the other; every server is stopped on the way out."""
    from packrat.core.trace import arrivals
    from packrat.model.zoo import get_zoo_model

    options.check()
    for _, zoo in options.models:
        get_zoo_model(zoo)  # an unknown name fails before anything starts
    started = time.monotonic()

    def tell(msg: str) -> None:
        say(f"[{time.monotonic() - started:5.0f} s] {msg}")

    names = tuple(n for n, _ in options.models)
    ready = _prepare(options, tell)
    models = tuple(_Model(name, ready[name], model_load(name, zoo, ready[name].optimizer,
                                                        options.busy_fraction,
                                                        options.idle_rps))
                   for name, zoo in options.models)
    cores = len(models[0].ready.cores)
    traces = [model_trace(m.load, k, options.phase_s) for k, m in enumerate(models)]
    schedules = {m.name: arrivals(t, trace_seed(options.seed, k))
                 for k, (m, t) in enumerate(zip(models, traces))}
    duration = traces[0].duration_s
    warm_s = warmup_seconds(duration)
    for m, t in zip(models, traces):
        tell(f"{m.name} ({m.load.zoo}): busy {m.load.busy_rps:.1f} rps "
             f"({options.busy_fraction:.0%} of {m.load.best_rps:.1f}), idle "
             f"{m.load.idle_rps:g} rps; {len(schedules[m.name])} requests over "
             f"{duration:g} s")
    tell(f"phases of {options.phase_s:g} s: {' | '.join(phase_names(names))}; warm-ups of at "
         f"least {warm_s:g} s at the first phase's rates")
    runs: dict[str, ConfigRun] = {}
    skipped: dict[str, str] = {}
    for name in (c for c in CONFIGURATIONS if c in options.configurations):
        slos = choose_slos(names, options.slos, runs, options.phase_s)[0]
        try:
            with _server(name, models, options, slos if name in TAKES_SLO else {}, tell) as srv:
                run = _Session(srv, models, options, tell).run(schedules, duration, warm_s)
        except UnknownFlag as e:
            skipped[name] = str(e)
            tell(f"{name}: skipped: {e}")
            continue
        runs[name] = run
        for m in models:
            tell(f"{name}: {m.name}: {run.loads[m.name].summary()}; "
                 f"{len(run.switches[m.name])} switches")
    if not runs:
        raise PackratError("no configuration ran: " + "; ".join(f"{k}: {v}"
                                                                 for k, v in skipped.items()))
    slos, sources = choose_slos(names, options.slos, runs, options.phase_s)
    missing = [n for n in names if n not in slos]
    if missing:
        raise PackratError(f"no request of {', '.join(missing)} was answered while it was the "
                           "only busy model, so there is no default SLO; give --slo NAME=MS")
    tell("SLOs " + ", ".join(f"{n} {slos[n]:.1f} ms" for n in names) + "; done")
    return MultiResult(tuple(m.load for m in models), cores, options.phase_s, options.seed,
                       options.busy_fraction, slos, sources, runs, skipped)


def _prepare(options: MultiOptions, tell: Callable[[str], None]) -> dict:
    """{model: trace_serve.Prepared}: each zoo model archived into OUT once; profiled and
    calibrated as `packrat serve` will (trace_serve.prepare), unless its profile is given."""
    from packrat.bench.trace import TraceOptions
    from packrat.bench.trace_serve import Prepared, prepare
    from packrat.core.profile import read_profile
    from packrat.measure.cpus import usable_cores
    from packrat.model.archive import build_zoo_archive

    usable = usable_cores()
    n = options.cores or len(usable)
    if not 1 <= n <= len(usable):
        raise PackratError(f"--cores {n}: this process may use 1..{len(usable)} cores")
    out = Path(options.out).absolute()
    measured = {}
    for zoo in dict.fromkeys(z for name, z in options.models if name not in options.profiles):
        measured[zoo] = prepare(TraceOptions(
            zoo=zoo, trace="steady", out=out, cores=n, max_batch=options.max_batch,
            max_batch_delay_ms=options.max_batch_delay_ms, calibrate=options.calibrate,
            quiet_wait_s=options.quiet_wait_s), tell)
    ready = {}
    for name, zoo in options.models:
        if name not in options.profiles:
            ready[name] = measured[zoo]
            continue
        if zoo in measured:
            archive, body = measured[zoo].archive, measured[zoo].body
        else:
            archive, example = out / f"{zoo}.mar", out / f"{zoo}.example.json"
            if not archive.is_file():
                tell(f"{zoo}: archiving into {out}")
                built = build_zoo_archive(zoo, out, progress=lambda msg, z=zoo: tell(f"{z}: {msg}"))
                archive, example = built.mar_path, built.example_path
            body = example.read_bytes()
        csv = Path(options.profiles[name]).absolute()
        tell(f"{name}: profile {csv} (given)")
        ready[name] = Prepared(zoo, archive, body, tuple(usable[:n]),
                               Optimizer(read_profile(csv), n), out)
    return ready


@dataclass(frozen=True)
class _Model:
    name: str
    ready: object   # trace_serve.Prepared of its zoo model
    load: ModelLoad


def _server(name: str, models: Sequence[_Model], options: MultiOptions,
            slos: Mapping[str, float], tell: Callable[[str], None]):
    if name == "torchserve-default":
        return _PlainServer(name, models, options, tell)
    return _packrat_server(name, models, options, slos, tell)


class _PlainServer:
    """`with _PlainServer(...) as s:` TorchServe 0.12 as it runs out of the box, both models
    registered with one unpinned worker per core and batch size 1 (Packrat starts it; its
    versions carry no plan, so the handler pins nothing and keeps torch's threads)."""

    def __init__(self, name: str, models: Sequence[_Model], options: MultiOptions,
                 tell: Callable[[str], None]) -> None:
        from packrat.bench.trace_serve import _fresh_run_dir

        self.name, self.models, self.options, self.tell = name, models, options, tell
        out = models[0].ready.out
        self.home = out / "runs" / name
        self.run, self.temp = _fresh_run_dir(self.home)
        self.server = None
        self.describe = (f"TorchServe 0.12 default: {len(models[0].ready.cores)}x<unpinned,b=1> "
                         "per model")

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        from packrat.bench.runner import start_on_free_ports
        from packrat.core.plan import Unpinned
        from packrat.model.archive import extract_archive
        from packrat.model.sample import Sample
        from packrat.serving.versions import deploy_version
        from packrat.torchserve import ServerSettings, TorchServeClient

        self.run.create()
        settings, self.server = start_on_free_ports(lambda ports: ServerSettings(
            workdir=self.run.torchserve, model_store=self.run.model_store, ports=ports,
            properties=(("job_queue_size", str(JOB_QUEUE_SIZE)),)))
        self.client = TorchServeClient(settings, timeout_s=60)
        n = len(self.models[0].ready.cores)
        for m in self.models:
            self.tell(f"{self.name}: registering {m.name} as {describe(n, None, 1)}")
            base = extract_archive(m.ready.archive, self.run.path / "archives" / m.name)
            deploy_version(self.run, self.client, base, m.name, "1", Unpinned(n, 1),
                           max_batch_delay_ms=self.options.max_batch_delay_ms,
                           warm=Sample(m.ready.body, "application/json", "the zoo example"),
                           response_timeout_s=int(TIMEOUT_S))

    def stop(self) -> None:
        import shutil

        from packrat.torchserve import stop_server

        if self.server is not None:
            stop_server(self.server)
            self.server = None
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp = None

    def watch(self):
        from packrat.measure.foreign import ForeignCpu
        from packrat.torchserve import server_processes

        return ForeignCpu(lambda: server_processes(self.run.torchserve))

    def status_json(self) -> dict | None:
        return None

    def died(self, stopped: bool = False) -> str | None:
        """Why the server is gone before it was stopped; None while it runs."""
        from packrat.torchserve import find_server

        if not stopped and find_server(self.run.torchserve) is None:
            return f"TorchServe died during the run; see {self.run.torchserve / 'logs'}"
        return None

    @property
    def switch_log(self) -> Path | None:
        return None


def _packrat_server(name: str, models: Sequence[_Model], options: MultiOptions,
                    slos: Mapping[str, float], tell: Callable[[str], None]):
    """One `packrat serve` of both models for configuration `name`: the trace benchmark's
    Served (fresh run directory, loopback config.properties, start on free ports, stop with
    `packrat stop` whatever happens), with both models on its command line."""
    from packrat.bench.trace import TraceOptions
    from packrat.bench.trace_serve import Served

    class MultiServed(Served):
        describe = f"packrat serve --core-split {CORE_SPLIT[name]}"

        def _spawn(self, conf: Path) -> None:
            o = options
            argv = [sys.executable, "-m", "packrat.cli", "serve", "--run-dir",
                    str(self.run.path), "--models",
                    ",".join(f"{m.name}={m.ready.archive}" for m in models),
                    "--cores", str(len(models[0].ready.cores)), "--max-batch",
                    str(o.max_batch), "--max-batch-delay", str(o.max_batch_delay_ms),
                    "--ts-config", str(conf)]
            if self.core_split:
                argv += ["--core-split", CORE_SPLIT[name]]
            for model, ms in slos.items():
                argv += ["--slo", f"{model}={ms:.1f}"]
            given = [f"{m.name}={Path(o.profiles[m.name]).absolute()}" for m in models
                     if m.name in o.profiles]
            if given:
                argv += ["--profiles", ",".join(given)]
            if not o.calibrate:
                argv.append("--no-calibrate")
            self.tell(f"{self.name}: starting {' '.join(argv[3:6])} ... "
                      f"{' '.join(argv[argv.index('--ts-config') + 2:])}")
            self.log_from = self.log.stat().st_size if self.log.is_file() else 0
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True)
            self.relay = threading.Thread(target=self._relay, args=(self.proc.stderr,),
                                          daemon=True)
            self.relay.start()

        def _wait_serving(self) -> None:
            from packrat.serving.ops import status

            deadline = time.monotonic() + SERVE_START_S
            while True:
                if self.proc.poll() is not None:
                    self.relay.join(5)
                    text = (self.log.read_bytes()[self.log_from:].decode(errors="replace")
                            if self.log.is_file() else "")  # this attempt's lines
                    bad = [ln for ln in text.splitlines() if "unrecognized arguments" in ln]
                    if self.proc.returncode == 2 and bad:
                        raise UnknownFlag(f"packrat serve refused its flags ({bad[-1].strip()})")
                    raise PackratError(f"{self.name}: packrat serve exited with "
                                       f"{self.proc.returncode}; see {self.log}")
                try:
                    st = status(self.run.path)
                    if (st.controller_pid == self.proc.pid and st.torchserve_pid and all(
                            st.models.get(m.name) and st.models[m.name].version
                            for m in models)):
                        return
                except PackratError:
                    pass
                if time.monotonic() > deadline:
                    raise PackratError(f"{self.name}: packrat serve did not serve every model "
                                       f"within {SERVE_START_S:.0f} s; see {self.log}")
                time.sleep(0.5)

        def watch(self):
            return self._watch()

        def died(self, stopped: bool = False) -> str | None:
            """Why packrat serve is gone before it was stopped (its last error line); None
            while it runs, or once stopped, if it exited cleanly."""
            if self.proc is None or self.proc.poll() is None:
                return None
            if stopped and self.proc.returncode == 0:
                return None
            self.relay.join(5)
            text = (self.log.read_bytes()[self.log_from:].decode(errors="replace")
                    if self.log.is_file() else "")
            errors = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
            when = ("when stopped (it was on its way out already, or `packrat stop` failed)"
                    if stopped else "during the run")
            return (f"packrat serve exited with {self.proc.returncode} {when}"
                    + (f" ({errors[-1][:300]})" if errors else "") + f"; see {self.log}")

        def status_json(self) -> dict | None:
            from packrat.serving.ops import status

            try:
                return status(self.run.path).to_json()
            except PackratError:
                return None

    ready = models[0].ready
    trace_options = TraceOptions(zoo=ready.zoo, trace="steady", out=ready.out,
                                 cores=len(ready.cores), max_batch=options.max_batch,
                                 max_batch_delay_ms=options.max_batch_delay_ms,
                                 calibrate=options.calibrate,
                                 quiet_wait_s=options.quiet_wait_s)

    class Fallback:
        """overlap on a Packrat without --core-split: plain serve plans the same way."""

        def __init__(self) -> None:
            self.srv = None

        def __enter__(self):
            srv = MultiServed(name, ready, trace_options, tell)
            srv.core_split = True
            try:
                self.srv = srv.__enter__()
            except UnknownFlag as e:
                if name != "overlap" or "--core-split" not in str(e):
                    raise
                tell(f"{name}: {e}; serving without --core-split, which plans each model "
                     "for all the cores: the same overlap")
                srv = MultiServed(name, ready, trace_options, tell)
                srv.core_split = False
                srv.describe = "packrat serve (no --core-split: overlapping plans)"
                self.srv = srv.__enter__()
            return self.srv

        def __exit__(self, *exc) -> None:
            if self.srv is not None:
                self.srv.__exit__(*exc)

    return Fallback()


class _Session:
    """One configuration's warm-up and phases on a started server."""

    def __init__(self, srv, models: Sequence[_Model], options: MultiOptions,
                 tell: Callable[[str], None]) -> None:
        self.srv, self.models, self.options, self.tell = srv, models, options, tell
        self.name = srv.name

    def run(self, schedules: Mapping[str, Sequence[float]], duration_s: float,
            warm_s: float) -> ConfigRun:
        from packrat.core.trace import arrivals
        from packrat.measure.foreign import wait_quiet

        wait_quiet(self.srv.watch(), self.tell, f"measuring {self.name}",
                   self.options.quiet_wait_s)
        first = {m.name: m.load.rate(PHASES[0][k]) for k, m in enumerate(self.models)}
        max_s = warm_s + WARMUP_EXTRA_S
        warm = {m.name: arrivals(Trace("warm-up", max_s, (Step(0.0, first[m.name]),)),
                                 warmup_seed(self.options.seed, k))
                for k, m in enumerate(self.models)}
        got, _ = self._drive(warm, first, lambda t, flight: t >= warm_s and self._settled(
            first, flight), lambda t: f"warm-up, {t:.0f} s (at least {warm_s:g} s, until "
            "the plans settle)")
        self.tell(f"{self.name}: warmed up for {max(r.elapsed_s for r in got.values()):.0f} s")
        watch = self.srv.watch()
        watch.start()
        since = time.time()
        peaks = {m.name: m.load.busy_rps for m in self.models}
        phase_s = self.options.phase_s
        labels = phase_names([m.name for m in self.models])

        def what(t: float) -> str:
            if t >= duration_s:
                return "phases over, waiting for the requests in flight"
            i = min(len(PHASES) - 1, int(t // phase_s))
            return f"phase {i + 1}/{len(PHASES)} ({labels[i]}), {duration_s - t:.0f} s left"

        loads, allocations = self._drive(schedules, peaks, lambda t, flight: False, what,
                                         sample=True)
        foreign = watch.cores()
        error = self.srv.died()
        self.srv.stop()  # before reading its switches: none is logged after this
        error = error or self.srv.died(stopped=True)  # it may have been on its way out
        if error:
            self.tell(f"{self.name}: FAILED: {error}")
        log = self.srv.switch_log
        switches = {m.name: read_model_switches(log, m.name, since) if log else ()
                    for m in self.models}
        return ConfigRun(self.name, self.srv.describe, loads, switches, allocations, foreign,
                         error)

    def _drive(self, schedules: Mapping[str, Sequence[float]], peaks: Mapping[str, float],
               enough: Callable[[float, dict[str, int]], bool], what: Callable[[float], str],
               sample: bool = False
               ) -> tuple[dict[str, OpenLoopResult], tuple[AllocationSample, ...]]:
        """One open loop per model, each on its thread, started together and stopped early
        once enough(seconds in, {model: requests in flight}); a progress line every
        PROGRESS_EVERY_S; with sample, the allocation every SAMPLE_EVERY_S where it changed."""
        from packrat.measure.openloop import OpenLoop

        lock = threading.Lock()
        flight = {m.name: 0 for m in self.models}
        client = self.srv.client

        def sender(m: _Model):
            def send():
                with lock:
                    flight[m.name] += 1
                try:
                    return client.predict(m.name, m.ready.body, timeout_s=TIMEOUT_S)
                finally:
                    with lock:
                        flight[m.name] -= 1
            return send

        loops = {m.name: OpenLoop(sender(m), schedules[m.name], timeout_s=TIMEOUT_S,
                                  max_in_flight=min(4096, max(64, math.ceil(
                                      10 * peaks[m.name]))))
                 for m in self.models}
        box: dict = {}

        def run(name: str) -> None:
            try:
                box[name] = loops[name].run()
            except BaseException as e:  # noqa: BLE001 - raised below, in the caller's thread
                box[f"error {name}"] = e

        threads = [threading.Thread(target=run, args=(n,), daemon=True,
                                    name=f"multi-{self.name}-{n}") for n in loops]
        samples: list[AllocationSample] = []
        start = told = time.monotonic()
        sampled = -math.inf
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.25 / len(threads))
                now = time.monotonic()
                if sample and now - sampled >= SAMPLE_EVERY_S:
                    sampled = now
                    self._sample(now - start, samples)
                if now - told >= PROGRESS_EVERY_S:
                    told = now
                    st = self.srv.status_json()
                    plans = ("" if st is None else "; " + describe_allocation(
                        allocation_of(st, list(loops))))
                    self.tell(f"{self.name}: {what(now - start)}{plans}")
                with lock:
                    inflight = dict(flight)
                if enough(now - start, inflight):
                    for loop in loops.values():
                        loop.stop()  # then each waits for its requests in flight
        except BaseException:
            for loop in loops.values():
                loop.stop()
            raise
        for key, value in box.items():
            if key.startswith("error "):
                raise value
        return {n: box[n] for n in loops}, tuple(samples)

    def _sample(self, at_s: float, samples: list[AllocationSample]) -> None:
        st = self.srv.status_json()
        if st is None:
            return
        models = allocation_of(st, [m.name for m in self.models])
        reason = (st.get("allocation") or {}).get("reason")
        if not samples or samples[-1].models != models or samples[-1].reason != reason:
            samples.append(AllocationSample(at_s, models, reason))

    def _settled(self, rates: Mapping[str, float], flight: Mapping[str, int]) -> bool:
        """Every model: no switch under way, none in the last SETTLE_S, and no backlog (at
        most what its plan holds in its batches plus DRAINED_BATCHES batch latencies of
        requests at its rate in flight). TorchServe's default has nothing to settle."""
        st = self.srv.status_json()
        if st is None:
            return self.srv.switch_log is None
        for m in self.models:
            d = (st.get("models") or {}).get(m.name)
            if not d or d.get("switching") is not None:
                return False
            last = d.get("last_reconfiguration_s")
            insts = (d.get("plan") or {}).get("instances") or []
            if not insts or (last is not None and last < SETTLE_S):
                return False
            held = len(insts) * insts[0]["batch"]
            batch_s = ((d["plan"].get("latency_ms") or 0.0)
                       + self.options.max_batch_delay_ms) / 1000.0
            if flight.get(m.name, 0) > held + rates[m.name] * DRAINED_BATCHES * batch_s:
                return False
        return True


def write_result(result: MultiResult, out: Path) -> Path:
    """OUT/models.json, written atomically."""
    from packrat.jsonfile import write_json

    path = Path(out) / "models.json"
    write_json(path, result.to_json())
    return path
