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

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from packrat.bench.multi_load import (
    CONFIGURATIONS,
    PHASES,
    SAMPLE_EVERY_S,
    TAKES_SLO,
    MultiOptions,
    model_load,
    model_trace,
    phase_names,
    trace_seed,
    warmup_seed,
)
from packrat.bench.multi_results import (
    AllocationSample,
    ConfigRun,
    MultiResult,
    allocation_of,
    choose_slos,
    describe_allocation,
    read_model_switches,
)
from packrat.bench.multi_servers import BenchModel, UnknownFlag, config_server
from packrat.bench.trace import (
    DRAINED_BATCHES,
    PROGRESS_EVERY_S,
    SETTLE_S,
    TIMEOUT_S,
    WARMUP_EXTRA_S,
    warmup_seconds,
)
from packrat.core.optimizer import Optimizer
from packrat.core.trace import Step, Trace
from packrat.errors import PackratError
from packrat.measure.openloop import OpenLoopResult

# -- the run ---------------------------------------------------------------------------------

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
    models = tuple(BenchModel(name, ready[name], model_load(name, zoo, ready[name].optimizer,
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
            with config_server(name, models, options, slos if name in TAKES_SLO else {}, tell) as srv:
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


class _Session:
    """One configuration's warm-up and phases on a started server."""

    def __init__(self, srv, models: Sequence[BenchModel], options: MultiOptions,
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

        def sender(m: BenchModel):
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
