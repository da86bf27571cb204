"""The several-models benchmark's results (pure): requests per phase, switches and the
allocation over time, SLOs, the JSON and the table. See packrat.bench.multi for the design.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packrat.bench.configs import Config
from packrat.bench.multi_load import PHASES, SLO_BASIS, ModelLoad, phase_names, rounded
from packrat.bench.trace import (
    SLO_FACTOR,
    ConfigResult,
    SwitchRecord,
)
from packrat.core.plan import describe
from packrat.core.stats import percentile
from packrat.measure.foreign import FOREIGN_LIMIT_CORES
from packrat.measure.openloop import OpenLoopResult


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
        return {"at_s": rounded(self.at_s), "models": self.models, "reason": self.reason}


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
                "foreign_cores": rounded(self.foreign_cores), "error": self.error}


def phase_json(r: OpenLoopResult, slo_ms: float) -> dict:
    return {"requests": r.count, "lost": r.failed + r.unanswered + r.dropped,
            "p50_ms": rounded(r.p50_ms()), "p99_ms": rounded(r.p99_ms()),
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
            "mean_ms": rounded(sum(lat) / len(lat)) if lat else None,
            "p50_ms": rounded(percentile(lat, 50)) if lat else None,
            "p99_ms": rounded(percentile(lat, 99)) if lat else None,
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
            "models": {m.name: {**m.to_json(), "slo_ms": rounded(self.slos[m.name]),
                                "slo_source": self.slo_sources[m.name]} for m in self.loads},
            "cores": self.cores, "phase_s": self.phase_s, "seed": self.seed,
            "busy_fraction": self.busy_fraction,
            "phases": [{"name": label, "start_s": i * self.phase_s,
                        "end_s": (i + 1) * self.phase_s,
                        "rps": {m.name: rounded(m.rate(PHASES[i][k]))
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


