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

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from packrat.bench.configs import (
    DEFAULT_OUT,
    MAX_BATCH_DELAY_MS,
    QUIET_WAIT_S,
    Config,
    RoundResult,
    baseline_config,
    build_row,
    default_config,
    default_seconds,
    estimated_ms,
    oracle_configs,
    predicted_ms,
    rotated,
    round_result,
    warmup_seconds,
)
from packrat.core.optimizer import Optimizer
from packrat.errors import PackratError, TorchServeError
from packrat.measure.foreign import (
    ATTEMPTS,
    FOREIGN_LIMIT_CORES,
    ForeignCpu,
    wait_quiet,
)
from packrat.serving.rundir import RUN_DIR_ENV, RunDir, ServedPlan
from packrat.torchserve import MAX_SOCKET_PATH

log = logging.getLogger(__name__)



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
        from packrat.core.policy import manual_plan
        from packrat.serving.controller import deploy_version

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
        from packrat.serving.controller import remove_version_files

        versions = sorted(self.client.versions(m.name), key=lambda x: x.is_default)
        for x in versions:
            self.client.unregister(m.name, x.version)
            remove_version_files(self.run, m.name, x.version)

    def calibrate(self, m: _Model) -> None:
        """Plan with the profile calibrated through this TorchServe (cached beside it), as
        `packrat serve` does."""
        from packrat.core.profile import read_profile
        from packrat.core.calibration import default_target, scale_profile
        from packrat.serving.calibrate import (
            calibrate, calibration_path, load_calibration, save_calibration, version_numbers,
        )

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

        from packrat.measure.loadgen import ClosedLoop

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
        from packrat.core.policy import plan_for_batch

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
    from packrat.measure.profiler import (
        ProfileSettings,
        default_threads,
        profile_archive,
    )
    from packrat.model.archive import build_zoo_archive, extract_archive
    from packrat.model.spec import ModelSpec
    from packrat.model.wire import encode_example

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
    from packrat.measure.cpus import usable_cores
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
