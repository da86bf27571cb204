"""`packrat bench`: Packrat's plan against the baseline, TorchServe's default and the measured
best configuration, end to end through one real TorchServe on loopback.

For each model and each batch size B, every configuration is served as its own model version
and loaded by a closed loop of B clients (so each batch holds about B requests and a request's
latency is its batch's latency):

- `packrat`: the plan Packrat serves for B (`policy.plan_for_batch`), pinned per its plan;
- `baseline`: one instance with all N cores and N threads, batch size B;
- `torchserve_default`: TorchServe out of the box: N workers (its CPU default, one per core),
  batch size B, no thread setting and no pinning (the version has no plan file, so the handler
  runs unpinned with torch's default threads);
- `oracle`: the fastest of every servable <i, t, b> (t = 1..N, i = 1..N//t, b = ceil(B/i)),
  each MEASURED; packrat's and the baseline's configurations are among them;
- `ideal_ms`: L[1][1] x B / N from the profile, a bound (perfect scaling, no overheads).

Measurements alternate: for each B all its versions are registered, then each round runs every
configuration once, in an order rotated by one per round, for a fixed time after a short
warm-up; a configuration's figure is the median over rounds of the per-round p50 (p99 and
throughput likewise). The versions of a B are deleted before the next B.

The load generator runs in this process, on the same cores as the workers (a 2-core machine
has no spare core): its cost is part of every figure, as TorchServe's frontend is.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from packrat.errors import PackratError, TorchServeError
from packrat.optimizer import Optimizer
from packrat.rundir import RUN_DIR_ENV, RunDir, ServedPlan
from packrat.torchserve import MAX_SOCKET_PATH

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("bench-out")
MAX_BATCH_DELAY_MS = 20
PREDICTION_TOLERANCE = 0.15  # |predicted / measured - 1| above this is flagged
ORACLE_TARGET = 1.05         # the target: packrat within 5% of the oracle
MIN_SECONDS, MAX_SECONDS, MIN_BATCHES = 2.0, 15.0, 8
# Other processes on the machine (other users, tests, a demo) distort every figure: a
# measurement during which they used more than this many cores is repeated.
FOREIGN_LIMIT_CORES = 0.2
ATTEMPTS = 3
QUIET_WAIT_S = 120.0


# -- configurations (pure) -------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Config:
    """One TorchServe version: `instances` workers with `batch_size`; `threads` pinned threads
    each on their own cores, or None for TorchServe's default (unpinned, torch's threads)."""

    threads: int | None
    instances: int
    batch_size: int

    @property
    def pinned(self) -> bool:
        return self.threads is not None

    def describe(self) -> str:
        inner = f"t={self.threads}" if self.pinned else "unpinned"
        return f"{self.instances}x<{inner},b={self.batch_size}>"


def normalized(threads: int | None, instances: int, batch: int) -> Config:
    """The configuration that serves B with `instances` workers of batch size ceil(B / i),
    counting only the workers that get a share of B (ceil(B / b)); an extra worker would stand
    idle, so i and that smaller i are the same configuration."""
    size = -(-batch // instances)
    return Config(threads, -(-batch // size), size)


def oracle_configs(cores: int, batch: int) -> tuple[Config, ...]:
    """Every servable <i, t, b> for B on N cores: t = 1..N, i = 1..N//t, b = ceil(B/i),
    deduplicated (see `normalized`), sorted by threads, instances."""
    if cores < 1 or batch < 1:
        raise PackratError(f"need cores >= 1 and B >= 1, got cores={cores}, B={batch}")
    found = {normalized(t, i, batch) for t in range(1, cores + 1) for i in range(1, cores // t + 1)}
    return tuple(sorted(found))


def baseline_config(cores: int, batch: int) -> Config:
    return Config(cores, 1, batch)


def default_config(cores: int, batch: int) -> Config:
    """TorchServe's CPU default: one worker per core, no pinning, batch size B."""
    return Config(None, cores, batch)


def rotated(items: list, r: int) -> list:
    if not items:
        return []
    k = r % len(items)
    return items[k:] + items[:k]


def predicted_ms(opt: Optimizer, cfg: Config, batch: int) -> float:
    """The profile's latency for B requests on cfg (inf where the profile cannot tell);
    TorchServe's default is predicted as the baseline (one N-thread worker runs the batch)."""
    from packrat.policy import served_latency

    threads = cfg.threads if cfg.pinned else opt.cores
    return served_latency(opt, threads, cfg.instances, cfg.batch_size, batch)


def estimated_ms(opt: Optimizer, cfg: Config, batch: int) -> float:
    """predicted_ms, or where the profile skipped the point, the nearest profiled smaller
    batch at the same threads scaled linearly: only to choose how long to measure."""
    pred = predicted_ms(opt, cfg, batch)
    if math.isfinite(pred):
        return pred
    threads = cfg.threads if cfg.pinned else opt.cores
    size = min(cfg.batch_size, batch)
    batches = -(-batch // size)
    rounds = -(-batches // cfg.instances)
    for b in range(min(size, opt.max_batch), 0, -1):
        lat = opt.latency(threads, b)
        if math.isfinite(lat):
            return rounds * lat * size / b
    return MAX_SECONDS * 1000.0 / MIN_BATCHES


def default_seconds(batch_ms: float) -> float:
    """Long enough for MIN_BATCHES batches (with a margin) and MIN_SECONDS, at most MAX_SECONDS."""
    return min(MAX_SECONDS, max(MIN_SECONDS, 1.25 * MIN_BATCHES * batch_ms / 1000.0))


def warmup_seconds(batch_ms: float) -> float:
    return min(3.0, max(0.5, 1.5 * batch_ms / 1000.0))


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class RoundResult:
    p50_ms: float
    p99_ms: float
    throughput_rps: float
    answered: int
    failed: int
    window_s: float
    foreign_cores: float = 0.0  # CPU other processes used meanwhile (see ForeignCpu)

    def to_json(self) -> dict:
        return {"p50_ms": _r(self.p50_ms), "p99_ms": _r(self.p99_ms),
                "throughput_rps": _r(self.throughput_rps), "answered": self.answered,
                "failed": self.failed, "window_s": _r(self.window_s),
                "foreign_cores": _r(self.foreign_cores)}


def round_result(samples: list[tuple[float, float]], start: float, end: float,
                 failed: int = 0) -> RoundResult:
    """From (sent, answered) times of successful requests: latency of those sent inside the
    window [start, end), throughput of those answered inside it."""
    lat = [(b - a) * 1000.0 for a, b in samples if start <= a < end]
    done = sum(1 for _, b in samples if start <= b <= end)
    window = end - start
    return RoundResult(percentile(lat, 50), percentile(lat, 99),
                       done / window if window > 0 else math.nan, len(lat), failed, window)


def _r(x: float | None, digits: int = 3) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def summarize(rounds: list[RoundResult]) -> dict:
    """Median over rounds of the per-round p50, p99 and throughput."""
    def med(values):
        values = [v for v in values if math.isfinite(v)]
        return statistics.median(values) if values else math.nan

    return {
        "latency_ms": _r(med([r.p50_ms for r in rounds])),
        "p99_ms": _r(med([r.p99_ms for r in rounds])),
        "throughput_rps": _r(med([r.throughput_rps for r in rounds])),
        "answered": sum(r.answered for r in rounds),
        "failed": sum(r.failed for r in rounds),
        "disturbed_rounds": sum(r.foreign_cores > FOREIGN_LIMIT_CORES for r in rounds),
    }


def build_row(model: str, batch: int, cores: int, opt: Optimizer, packrat: Config,
              measured: dict[Config, list[RoundResult]], packrat_predicted: float,
              raw: Optimizer | None = None, calibration: str | None = None) -> dict:
    """One result row for (model, B) from every configuration's rounds; pure. opt: the
    profile Packrat plans with (calibrated, if it was); raw: the profile as measured."""
    base, default = baseline_config(cores, batch), default_config(cores, batch)
    stats = {cfg: summarize(rounds) for cfg, rounds in measured.items()}

    def entry(cfg: Config, pred: float | None = None) -> dict:
        out = {"plan": cfg.describe(), **stats[cfg]}
        if pred is not None:
            out["predicted_ms"] = _r(pred)
        return out

    candidates = [c for c in oracle_configs(cores, batch) if c in stats
                  and stats[c]["latency_ms"] is not None]
    if not candidates:
        raise PackratError(f"{model} B={batch}: no configuration was measured")
    best = min(candidates, key=lambda c: (stats[c]["latency_ms"], c))
    row = {
        "model": model,
        "batch": batch,
        "cores": cores,
        "packrat": entry(packrat, packrat_predicted),
        "baseline": entry(base, predicted_ms(opt, base, batch)),
        "torchserve_default": entry(default) if default in stats else None,
        "oracle": entry(best, predicted_ms(opt, best, batch)),
        "ideal_ms": _r((raw or opt).latency(1, 1) * batch / cores),
        "calibration": calibration,
    }
    result = opt.plan(min(batch, opt.max_servable))
    row["dp_optimal"] = {"plan": result.optimal.describe(),
                         "predicted_ms": _r(result.optimal.latency_ms)}
    p, b, o = (row[k]["latency_ms"] for k in ("packrat", "baseline", "oracle"))
    row["speedup"] = _r(b / p, 4) if p and b else None
    row["vs_oracle"] = _r(p / o, 4) if p and o else None
    row["configs"] = [
        {**entry(cfg, predicted_ms(opt, cfg, batch)), "threads": cfg.threads,
         "instances": cfg.instances, "batch_size": cfg.batch_size,
         "rounds": [r.to_json() for r in measured[cfg]]}
        for cfg in sorted(measured, key=lambda c: (c.threads is None, c))
    ]
    return row


def prediction_error(row: dict) -> float | None:
    """packrat's predicted / measured - 1, None if either is unknown."""
    pred, meas = row["packrat"].get("predicted_ms"), row["packrat"]["latency_ms"]
    if not pred or not meas:
        return None
    return pred / meas - 1.0


# -- text and plot ---------------------------------------------------------------------------

def render_text(rows: list[dict]) -> str:
    lines: list[str] = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        n = mine[0]["cores"]
        lines.append(f"{model}: N = {n} cores; batch latency p50 in ms under B closed-loop "
                     "clients, median over rounds (p99 and throughput in the JSON)")
        lines.append(f"{'B':>4}  {'packrat plan':<14}{'measured':>9}{'predicted':>10}{'err':>6}  "
                     f"{'baseline':>9}{'predicted':>10}  {'ts default':>10}  "
                     f"{'oracle plan':<14}{'oracle':>9}{'ideal':>8}  {'speedup':>7}  {'/oracle':>7}")
        for r in mine:
            err = prediction_error(r)
            ts = r["torchserve_default"]
            flag = "*" if err is not None and abs(err) > PREDICTION_TOLERANCE else " "
            lines.append(
                f"{r['batch']:>4}  {r['packrat']['plan']:<14}{_f(r['packrat']['latency_ms']):>9}"
                f"{_f(r['packrat'].get('predicted_ms')):>10}"
                f"{(f'{err:+.0%}' if err is not None else '-'):>6}{flag} "
                f"{_f(r['baseline']['latency_ms']):>9}{_f(r['baseline'].get('predicted_ms')):>10}  "
                f"{_f(ts['latency_ms'] if ts else None):>10}  "
                f"{r['oracle']['plan']:<14}{_f(r['oracle']['latency_ms']):>9}{_f(r['ideal_ms']):>8}  "
                f"{(_f(r['speedup'], 2) + 'x') if r['speedup'] else '-':>7}  "
                f"{_f(r['vs_oracle'], 3):>7}"
            )
        lines.extend(summary_lines(mine))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def summary_lines(rows: list[dict]) -> list[str]:
    model = rows[0]["model"]
    out = []
    speedups = [r["speedup"] for r in rows if r["speedup"]]
    if speedups:
        slower = [r["batch"] for r in rows if r["speedup"] and r["speedup"] < 1.0]
        out.append(f"{model}: average speedup over the baseline {statistics.mean(speedups):.3f}x "
                   f"(B = {','.join(str(r['batch']) for r in rows)}); "
                   + (f"packrat slower than the baseline at B = {','.join(map(str, slower))}"
                      if slower else "never slower than the baseline"))
    ratios = [(r["vs_oracle"], r["batch"]) for r in rows if r["vs_oracle"]]
    if ratios:
        worst, at = max(ratios)
        over = [b for v, b in ratios if v > ORACLE_TARGET]
        out.append(f"{model}: worst packrat/oracle {worst:.3f} at B = {at}; "
                   + (f"over {ORACLE_TARGET:.2f} at B = {','.join(map(str, over))}"
                      if over else f"within {ORACLE_TARGET - 1:.0%} of the oracle at every B"))
    off = []
    for r in rows:
        err = prediction_error(r)
        if err is not None and abs(err) > PREDICTION_TOLERANCE:
            off.append(f"B={r['batch']} ({r['packrat']['predicted_ms']:.1f} predicted, "
                       f"{r['packrat']['latency_ms']:.1f} measured, {err:+.0%})")
    out.append(f"{model}: prediction off by more than {PREDICTION_TOLERANCE:.0%} at "
               + ("; ".join(off) if off else "no B"))
    disturbed = [f"B={r['batch']} {c['plan']}" for r in rows for c in r.get("configs", ())
                 if c.get("disturbed_rounds")]
    if disturbed:
        out.append(f"{model}: rounds disturbed by other processes (> {FOREIGN_LIMIT_CORES} "
                   f"cores) even after {ATTEMPTS} attempts: {', '.join(disturbed)}")
    return out


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def plot_bench(rows: list[dict], path: Path) -> Path:
    """Per model: latency vs B for each configuration (log-x), and predicted vs measured
    packrat latency."""
    from packrat.plot import _pyplot, save_figure

    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda x, _: f"{x:g}")

    def plain_log(axis) -> None:
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(NullFormatter())

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False)
    for (left, right), model in zip(axes, models):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["batch"])
        bs = [r["batch"] for r in mine]

        def series(key, field="latency_ms", mine=mine):
            return [(r[key] or {}).get(field) if isinstance(r[key], dict) else r[key]
                    for r in mine]

        def nan(values):
            return [math.nan if v is None else v for v in values]

        left.plot(bs, nan(series("packrat")), "o-", label="packrat (measured)", lw=2)
        left.plot(bs, nan(series("packrat", "predicted_ms")), "o:", label="packrat (predicted)",
                  color="C0", alpha=0.6)
        left.plot(bs, nan(series("baseline")), "s-", label="baseline: 1 worker, N threads")
        left.plot(bs, nan(series("torchserve_default")), "^-", label="TorchServe default")
        left.plot(bs, nan(series("oracle")), "x--", label="oracle (best measured)")
        left.plot(bs, nan(series("ideal_ms")), "k--", lw=0.8, label="ideal: L[1][1]·B/N")
        left.set_xscale("log", base=2)
        left.set_yscale("log")
        left.set_xticks(bs)
        plain_log(left.xaxis)
        plain_log(left.yaxis)
        left.set(xlabel="batch B (closed-loop clients)", ylabel="p50 batch latency (ms)",
                 title=f"{model}, N = {mine[0]['cores']} cores, measured on TorchServe")
        left.legend(fontsize=8)

        pred, meas = nan(series("packrat", "predicted_ms")), nan(series("packrat"))
        right.scatter(pred, meas)
        for b, x, y in zip(bs, pred, meas):
            if math.isfinite(x) and math.isfinite(y):
                right.annotate(f"B={b}", (x, y), textcoords="offset points", xytext=(4, 4),
                               fontsize=8)
        finite = [v for v in pred + meas if math.isfinite(v)]
        if finite:
            lo, hi = min(finite) * 0.8, max(finite) * 1.25
            xs = [lo, hi]
            right.plot(xs, xs, "k-", lw=0.8, label="measured = predicted")
            right.fill_between(xs, [x * (1 - PREDICTION_TOLERANCE) for x in xs],
                               [x * (1 + PREDICTION_TOLERANCE) for x in xs], color="grey",
                               alpha=0.2, label=f"±{PREDICTION_TOLERANCE:.0%}")
            right.set_xlim(lo, hi)
            right.set_ylim(lo, hi)
        right.set_xscale("log")
        right.set_yscale("log")
        plain_log(right.xaxis)
        plain_log(right.yaxis)
        right.set(xlabel="predicted latency (ms, profile)",
                  ylabel="measured p50 latency (ms, TorchServe)",
                  title="packrat plan: predicted vs measured")
        right.legend(fontsize=8)
    return save_figure(fig, path)


# -- other processes ------------------------------------------------------------------------

class ForeignCpu:
    """CPU used on this machine by processes that are not ours, in cores, over an interval.

    Ours: this process (its threads: the load generator) and the children it has reaped (the
    profiler's workers), its live descendants (the TorchServe launcher, frontend and workers)
    and the processes of the server of `workdir`. Everything else that ran (another user's
    tests, a demo, the hypervisor's steal) is foreign: it competes for the cores the workers
    are pinned to, and a pinned multi-thread instance slows down far more than its share when
    one of its threads is descheduled (measured here: 2.4 s instead of 70 ms for ResNet-50).
    """

    def __init__(self, workdir: Path | None = None) -> None:
        self.workdir = workdir
        self._t0 = self._busy0 = 0.0
        self._ours0: dict[int, float] = {}

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        guest = getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)  # inside user, nice
        return sum(t) - idle - guest

    def _ours(self) -> dict[int, float]:
        me = psutil.Process()
        t = me.cpu_times()
        out = {me.pid: t.user + t.system + t.children_user + t.children_system}
        procs = me.children(recursive=True)
        if self.workdir is not None:
            from packrat.torchserve import server_processes

            for pid in server_processes(self.workdir):
                try:
                    procs.append(psutil.Process(pid))
                except psutil.Error:
                    pass
        for p in procs:
            if p.pid in out:
                continue
            try:
                c = p.cpu_times()
                out[p.pid] = c.user + c.system
            except psutil.Error:
                pass
        return out

    def start(self) -> None:
        self._ours0 = self._ours()
        self._busy0 = self._busy()
        self._t0 = time.monotonic()

    def cores(self) -> float:
        """Foreign CPU since start(), in cores (0.5 = half a core on average)."""
        busy = self._busy() - self._busy0
        ours1 = self._ours()
        elapsed = time.monotonic() - self._t0
        ours = sum(max(0.0, v - self._ours0.get(pid, 0.0)) for pid, v in ours1.items())
        return max(0.0, busy - ours) / elapsed if elapsed > 0 else 0.0


def wait_quiet(watch: ForeignCpu, say, what: str, limit_s: float) -> float:
    """Wait (up to limit_s) until other processes use at most FOREIGN_LIMIT_CORES over a
    second; returns the last reading."""
    deadline = time.monotonic() + limit_s
    told = 0.0
    while True:
        watch.start()
        time.sleep(1.0)
        foreign = watch.cores()
        if foreign <= FOREIGN_LIMIT_CORES or time.monotonic() >= deadline:
            return foreign
        if time.monotonic() - told > 15:
            told = time.monotonic()
            waited = limit_s - (deadline - time.monotonic())
            say(f"waiting for a quiet machine before {what}: other processes use "
                f"{foreign:.2f} cores (waited {waited:.0f} s of at most {limit_s:.0f} s)")


# -- the benchmark (TorchServe) --------------------------------------------------------------

@dataclass(frozen=True)
class BenchOptions:
    models: tuple[str, ...]
    batches: tuple[int, ...]
    out: Path = DEFAULT_OUT
    rounds: int = 3
    seconds: float | None = None  # per configuration and round; None: from the profile
    max_batch: int | None = None  # profiling grid; at least max(batches)
    max_batch_delay_ms: int = MAX_BATCH_DELAY_MS
    quiet_wait_s: float = QUIET_WAIT_S  # per measurement, for other processes to finish
    calibrate: bool = True  # plan with the profile calibrated through TorchServe


@dataclass
class _Model:
    name: str
    archive: Path
    base_dir: Path
    body: bytes
    opt: Optimizer       # what Packrat plans with: the profile, calibrated once TorchServe runs
    profile_path: Path
    raw_opt: Optimizer   # the profile as measured
    calibration: str | None = None
    next_version: int = 1


@dataclass(frozen=True)
class _Version:
    config: Config
    version: str
    plan: ServedPlan | None


@dataclass
class _Bench:
    options: BenchOptions
    run: RunDir
    client: object  # TorchServeClient
    cores: tuple[int, ...]
    say: Callable[[str], None]
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> str:
        return f"[{time.monotonic() - self.started:6.0f} s]"

    # -- versions

    def register(self, m: _Model, cfg: Config, batch: int) -> _Version:
        from packrat.controller import deploy_version
        from packrat.policy import manual_plan

        version = str(m.next_version)
        m.next_version += 1
        plan = None
        if cfg.pinned:
            plan = manual_plan(m.opt, m.name, version, cfg.instances, cfg.threads,
                               cfg.batch_size, self.cores)
            plan = replace(plan, predicted_ms=predicted_ms(m.opt, cfg, batch), for_batch=batch)
            self.run.write_plan(plan)
        est = estimated_ms(m.opt, cfg, batch)
        self.say(f"{self.elapsed()} {m.name} B={batch}: registering {cfg.describe()} as "
                 f"version {version}")
        deploy_version(self.run, self.client, m.base_dir, m.name, version, plan,
                       instances=cfg.instances, batch_size=cfg.batch_size,
                       max_batch_delay_ms=self.options.max_batch_delay_ms, warm_body=m.body,
                       response_timeout_s=max(120, int(20 * est / 1000)))
        return _Version(cfg, version, plan)

    def unregister_all(self, m: _Model) -> None:
        """Delete every version of the model (the default last: TorchServe refuses it first)."""
        from packrat.controller import remove_version_files

        versions = sorted(self.client.versions(m.name), key=lambda x: x.is_default)
        for x in versions:
            self.client.unregister(m.name, x.version)
            remove_version_files(self.run, m.name, x.version)

    def calibrate(self, m: _Model) -> None:
        """Plan with the profile calibrated through this TorchServe (cached beside it), as
        `packrat serve` does."""
        from packrat.calibration import (
            calibrate, calibration_path, default_target, load_calibration, save_calibration,
            scale_profile, version_numbers,
        )
        from packrat.profile import read_profile

        n = len(self.cores)
        path = calibration_path(m.profile_path, n, self.options.max_batch_delay_ms,
                                default_target(n))
        cal = load_calibration(path)
        profile = read_profile(m.profile_path)
        if cal is None:
            watch = ForeignCpu(self.run.torchserve)
            for attempt in range(1, ATTEMPTS + 1):
                wait_quiet(watch, self.say, f"calibrating {m.name}", self.options.quiet_wait_s)
                cal = calibrate(self.run, self.client, m.base_dir, m.name, profile, self.cores,
                                m.body, version_numbers(m),
                                max_batch_delay_ms=self.options.max_batch_delay_ms,
                                say=lambda msg: self.say(f"{self.elapsed()} {msg}"), watch=watch)
                # read over each measurement only: workers that started and stopped between
                # them are ours but gone, and would count as foreign over the whole span
                foreign = max(p.foreign_cores for p in cal.points)
                if foreign <= FOREIGN_LIMIT_CORES:
                    break
                # a disturbed calibration misranks plans as surely as a disturbed profile
                self.say(f"{m.name}: other processes used {foreign:.2f} cores while calibrating"
                         + ("; calibrating again" if attempt < ATTEMPTS else "; keeping it"))
            save_calibration(cal, path)
        m.opt = Optimizer(scale_profile(profile, cal), n)
        m.calibration = cal.describe()
        self.say(f"{self.elapsed()} {m.name}: calibrated profile ({m.calibration}; {path})")

    # -- load

    def measure(self, m: _Model, v: _Version, batch: int) -> RoundResult:
        """One round of one configuration; repeated (up to ATTEMPTS) when other processes
        used the cores meanwhile, else the least disturbed attempt is kept and flagged."""
        watch = ForeignCpu(self.run.torchserve)
        best = None
        for attempt in range(1, ATTEMPTS + 1):
            wait_quiet(watch, self.say, f"{m.name} B={batch} {v.config.describe()}",
                       self.options.quiet_wait_s)
            res = self._measure_once(m, v, batch, watch)
            if best is None or res.foreign_cores < best.foreign_cores:
                best = res
            if res.foreign_cores <= FOREIGN_LIMIT_CORES:
                break
            self.say(f"{self.elapsed()} {m.name} B={batch} {v.config.describe()}: other "
                     f"processes used {res.foreign_cores:.2f} cores during the measurement "
                     f"(p50 {res.p50_ms:.1f} ms)" + ("; measuring again" if attempt < ATTEMPTS
                                                     else "; keeping the least disturbed"))
        return best

    def _measure_once(self, m: _Model, v: _Version, batch: int, watch: ForeignCpu) -> RoundResult:
        est = estimated_ms(m.opt, v.config, batch)
        seconds = self.options.seconds or default_seconds(est)
        timeout = max(60.0, 20 * est / 1000.0)
        samples: list[tuple[float, float]] = []
        lock = threading.Lock()

        def send():
            a = time.perf_counter()
            r = self.client.predict(m.name, m.body, version=v.version, timeout_s=timeout)
            b = time.perf_counter()
            if r.status_code == 200:
                with lock:
                    samples.append((a, b))
            return r

        from packrat.loadgen import ClosedLoop

        load = ClosedLoop(send, timeout_s=timeout)
        try:
            load.set_concurrency(batch)
            time.sleep(warmup_seconds(est))
            watch.start()
            start = time.perf_counter()
            time.sleep(seconds)
            end = time.perf_counter()
            foreign = watch.cores()
        finally:
            result = load.stop()
        failed = len(result.failures) + len(result.unanswered)
        if failed:
            first = (result.failures + result.unanswered)[0]
            self.say(f"{self.elapsed()} {m.name} B={batch} {v.config.describe()}: {failed} "
                     f"requests failed or unanswered, e.g. {first}")
        with lock:
            out = replace(round_result(list(samples), start, end, failed), foreign_cores=foreign)
        if out.answered == 0:
            raise PackratError(f"{m.name} B={batch} {v.config.describe()}: no request was "
                               f"answered in {seconds:.1f} s ({failed} failed); see "
                               f"{self.run.torchserve / 'logs'}")
        return out

    # -- one model, one B

    def bench_batch(self, m: _Model, batch: int) -> dict:
        from packrat.policy import plan_for_batch

        n = len(self.cores)
        served = plan_for_batch(m.opt, m.name, "0", batch, self.cores)
        packrat = Config(served.threads, served.instances, served.batch_size)
        roles: dict[Config, list[str]] = {}
        for cfg in oracle_configs(n, batch):
            roles.setdefault(cfg, [])
        roles.setdefault(packrat, []).insert(0, "packrat")
        roles.setdefault(baseline_config(n, batch), []).append("baseline")
        roles.setdefault(default_config(n, batch), []).append("torchserve_default")
        configs = sorted(roles, key=lambda c: (c.threads is None, c))
        self.say(f"{self.elapsed()} {m.name} B={batch}: packrat serves {packrat.describe()} "
                 f"(predicted {served.predicted_ms:.1f} ms); {len(configs)} configurations")
        measured: dict[Config, list[RoundResult]] = {c: [] for c in configs}
        versions: dict[Config, _Version] = {}
        try:
            for cfg in configs:
                versions[cfg] = self.register(m, cfg, batch)
            for r in range(self.options.rounds):
                for cfg in rotated(configs, r):
                    res = self.measure(m, versions[cfg], batch)
                    measured[cfg].append(res)
                    label = "+".join(roles[cfg]) or "oracle candidate"
                    self.say(f"{self.elapsed()} {m.name} B={batch} round {r + 1}/"
                             f"{self.options.rounds} {cfg.describe()} ({label}): p50 "
                             f"{res.p50_ms:.1f} ms, p99 {res.p99_ms:.1f} ms, "
                             f"{res.throughput_rps:.1f} req/s, {res.answered} answered")
        finally:
            try:
                self.unregister_all(m)
            except PackratError as e:
                self.say(f"{m.name}: could not delete the versions of B={batch}: {e}")
        row = build_row(m.name, batch, n, m.opt, packrat, measured, served.predicted_ms,
                        raw=m.raw_opt, calibration=m.calibration)
        self.say(f"{self.elapsed()} {m.name} B={batch}: packrat {row['packrat']['latency_ms']} ms, "
                 f"baseline {row['baseline']['latency_ms']} ms, oracle {row['oracle']['plan']} "
                 f"{row['oracle']['latency_ms']} ms, speedup {row['speedup']}, "
                 f"packrat/oracle {row['vs_oracle']}")
        return row


def _prepare_model(name: str, options: BenchOptions, cores: tuple[int, ...], run: RunDir,
                   say) -> _Model:
    from packrat.archive import build_zoo_archive, extract_archive
    from packrat.modelspec import ModelSpec, encode_example
    from packrat.profiler import ProfileSettings, default_threads, profile_archive

    out = Path(options.out)
    mar, example = out / f"{name}.mar", out / f"{name}.example.json"
    if not mar.is_file():
        say(f"{name}: archiving into {out}")
        result = build_zoo_archive(name, out, progress=lambda msg: say(f"{name}: {msg}"))
        mar, example = result.mar_path, result.example_path
    base = extract_archive(mar, run.path / "archives" / name)
    if not example.is_file():
        example.write_text(json.dumps(encode_example(ModelSpec.load(base))) + "\n")
    max_batch = max(options.max_batch or 0, max(options.batches))
    settings = ProfileSettings(threads=default_threads(len(cores)), max_batch=max_batch)
    last = [0.0]

    def progress(ev):
        now = time.monotonic()
        if ev.kind == "cached":
            say(f"{name}: profile cached ({ev.total} points)")
        elif ev.kind == "point" and (now - last[0] > 5 or ev.done == ev.total):
            last[0] = now
            say(f"{name}: profiling {ev.done}/{ev.total} t={ev.threads} b={ev.batch} "
                f"{ev.latency_ms:.1f} ms ({ev.elapsed_s:.0f} s)")

    watch = ForeignCpu()
    for attempt in range(1, ATTEMPTS + 1):
        wait_quiet(watch, say, f"profiling {name}", options.quiet_wait_s)
        watch.start()
        profile = profile_archive(mar, settings, force=attempt > 1, progress=progress)
        foreign = watch.cores()
        if profile.cached or foreign <= FOREIGN_LIMIT_CORES:
            break
        say(f"{name}: other processes used {foreign:.2f} cores while profiling"
            + ("; profiling again" if attempt < ATTEMPTS else "; keeping this profile"))
    say(f"{name}: profile {profile.path}")
    opt = Optimizer(profile.profile, len(cores))
    if max(options.batches) > opt.max_servable:
        raise PackratError(f"{name}: B={max(options.batches)} cannot be served on {len(cores)} "
                           f"cores with its profile (at most {opt.max_servable})")
    return _Model(name, mar, base, example.read_bytes(), opt, profile.path, opt)


def _fresh_run_dir(out: Path) -> tuple[RunDir, Path | None]:
    """OUT/run, emptied; a short directory under /tmp if OUT's path is too long for
    TorchServe's worker sockets (returned second, to be removed at the end)."""
    from packrat.torchserve import find_server

    path = Path(out).absolute() / "run"
    socket = path / "torchserve" / "tmp" / ".ts.sock.65535"
    temp = None
    if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
        temp = Path(tempfile.mkdtemp(prefix="packrat-bench-"))
        path = temp / "run"
    if path.exists():
        running = find_server(path / "torchserve")
        if running is not None:
            raise PackratError(f"a TorchServe (pid {running.frontend_pid}) still runs in {path}; "
                               f"stop it with `packrat stop --run-dir {path}` first")
        shutil.rmtree(path)
    return RunDir(path).create(), temp


def run_bench(options: BenchOptions, say: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Run the whole benchmark; rows as `packrat bench --json` prints them. TorchServe is
    stopped on the way out, whatever happens."""
    from packrat.cpus import usable_cores
    from packrat.torchserve import (
        Ports,
        ServerSettings,
        TorchServeClient,
        start_server,
        stop_server,
    )

    if options.rounds < 1:
        raise PackratError(f"--rounds must be >= 1, got {options.rounds}")
    if options.seconds is not None and options.seconds <= 0:
        raise PackratError(f"--seconds must be > 0, got {options.seconds}")
    if not options.batches or min(options.batches) < 1:
        raise PackratError(f"--batch values must be >= 1, got {list(options.batches)}")
    if not options.models:
        raise PackratError("--zoo names no model")
    started = time.monotonic()
    cores = usable_cores()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)
    try:
        run, temp = _fresh_run_dir(out)
    finally:
        os.umask(old_umask)
    say(f"packrat bench: {', '.join(options.models)}, B = {','.join(map(str, options.batches))}, "
        f"N = {len(cores)} cores ({','.join(map(str, cores))}), {options.rounds} rounds; "
        f"run directory {run.path}")
    server = None
    bench = None
    rows: list[dict] = []
    try:
        models = [_prepare_model(name, options, cores, run, say) for name in options.models]
        queue = max(100, 2 * len(cores) * max(options.batches))  # warm-up sends i x b at once
        settings = ServerSettings(
            workdir=run.torchserve, model_store=run.model_store, ports=Ports.free(),
            env=((RUN_DIR_ENV, str(run.path)),),
            properties=(("job_queue_size", str(queue)),),
        )
        try:
            server = start_server(settings)
        except TorchServeError as e:
            if "bind" not in str(e).lower() and "address already in use" not in str(e).lower():
                raise
            settings = replace(settings, ports=Ports.free())  # a port was taken meanwhile
            server = start_server(settings)
        client = TorchServeClient(settings, timeout_s=60)
        bench = _Bench(options, run, client, cores, say, started)
        say(f"{bench.elapsed()} TorchServe up (pid {server.frontend_pid}), inference port "
            f"{settings.ports.inference}")
        for m in models:
            if options.calibrate:
                bench.calibrate(m)
            for batch in options.batches:
                rows.append(bench.bench_batch(m, batch))
                write_results(rows, out)  # partial results survive an interruption
    finally:
        if server is not None:
            say("stopping TorchServe")
            stop_server(server)
        for d in ("model_store", "plans", "slots", "archives"):
            shutil.rmtree(run.path / d, ignore_errors=True)
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    if bench is not None:
        say(f"{bench.elapsed()} done")
    return rows


def write_results(rows: list[dict], out: Path) -> Path:
    path = Path(out) / "bench.json"
    tmp = path.with_name(".bench.json.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# -- command line ----------------------------------------------------------------------------

def add_parser(sub) -> argparse.ArgumentParser:
    """Add `bench` to the CLI's subparsers (it takes their parser class)."""
    from packrat.cli import int_list
    b = sub.add_parser("bench", help="measure Packrat's plans against the baseline, TorchServe's "
                                     "default and the best measured configuration")
    b.add_argument("--zoo", required=True,
                   help="zoo model(s): small-cnn, resnet50, bert-base, gpt2 (comma-separated)")
    b.add_argument("--batch", type=int_list, required=True,
                   help="batch sizes B (closed-loop clients), e.g. 1,2,4,8,16")
    b.add_argument("--json", action="store_true", help="print the rows as JSON")
    b.add_argument("--plot", help="write a PNG: latency vs B per configuration, predicted vs measured")
    b.add_argument("--out", default=str(DEFAULT_OUT),
                   help="archives, run directory and bench.json (default ./bench-out)")
    b.add_argument("--rounds", type=int, default=3,
                   help="rounds over all configurations; figures are medians (default 3)")
    b.add_argument("--seconds", type=float,
                   help=f"seconds of load per configuration and round (default: {MIN_BATCHES} "
                        f"batches, at least {MIN_SECONDS:g} s, at most {MAX_SECONDS:g} s)")
    b.add_argument("--max-batch", type=int,
                   help="largest batch to profile (default and minimum: the largest B)")
    b.add_argument("--max-batch-delay", type=int, default=MAX_BATCH_DELAY_MS,
                   help=f"TorchServe max_batch_delay in ms (default {MAX_BATCH_DELAY_MS})")
    b.add_argument("--quiet-wait", type=float, default=QUIET_WAIT_S,
                   help="seconds to wait for other processes to leave the cores before each "
                        f"measurement (default {QUIET_WAIT_S:g}); a measurement they disturbed "
                        f"(> {FOREIGN_LIMIT_CORES} cores) is repeated up to {ATTEMPTS} times")
    b.add_argument("--no-calibrate", action="store_true",
                   help="plan with the measured profile as it is (default: calibrate it through "
                        "TorchServe first, as packrat serve does)")
    b.set_defaults(func=cmd_bench)
    return b


def cmd_bench(args) -> int:
    from packrat.zoo import get_zoo_model

    names = tuple(dict.fromkeys(n.strip() for n in args.zoo.split(",") if n.strip()))
    for name in names:
        get_zoo_model(name)  # unknown names fail before anything starts
    options = BenchOptions(
        models=names, batches=tuple(sorted(set(args.batch))), out=Path(args.out),
        rounds=args.rounds, seconds=args.seconds, max_batch=args.max_batch,
        max_batch_delay_ms=args.max_batch_delay, quiet_wait_s=args.quiet_wait,
        calibrate=not args.no_calibrate,
    )
    if args.plot:
        from packrat.plot import _pyplot

        _pyplot()  # no matplotlib: fail now, not after the benchmark

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt  # the same clean stop as Ctrl-C

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, on_term)
    try:
        rows = run_bench(options, say)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    path = write_results(rows, options.out)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_text(rows), end="")
        print(f"results: {path}")
    if args.plot:
        print(f"plot: {plot_bench(rows, Path(args.plot))}", file=sys.stderr if args.json else sys.stdout)
    return 0
