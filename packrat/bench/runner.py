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

import logging
import os
import shutil
import tempfile
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
    Row,
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
from packrat.bench.models import BenchModel, prepare_model
from packrat.errors import PackratError, TorchServeError
from packrat.jsonfile import write_json
from packrat.measure.foreign import ForeignCpu, least_disturbed
from packrat.serving.rundir import RunDir
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


@dataclass(frozen=True)
class _Version:
    config: Config
    version: str


@dataclass
class _Bench:
    """One TorchServe, one model at a time: register a B's configurations as versions,
    calibrate the model's profile, measure each version in rounds, make the B's row."""

    options: BenchOptions
    run: RunDir
    client: object  # TorchServeClient
    cores: tuple[int, ...]
    say: Callable[[str], None]
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> str:
        return f"[{time.monotonic() - self.started:6.0f} s]"

    def tell(self, msg: str) -> None:
        self.say(f"{self.elapsed()} {msg}")

    def watch(self) -> ForeignCpu:
        """Other processes' CPU; TorchServe's processes are ours."""
        from packrat.torchserve import server_processes

        return ForeignCpu(lambda: server_processes(self.run.torchserve))

    # -- versions

    def register(self, m: BenchModel, cfg: Config, batch: int) -> _Version:
        from packrat.core.plan import Unpinned
        from packrat.core.policy import manual_plan
        from packrat.serving.versions import deploy_version

        version = str(m.next_version)
        m.next_version += 1
        layout = Unpinned(cfg.instances, cfg.batch_size)
        if cfg.pinned:
            plan = manual_plan(m.opt, m.name, version, cfg.instances, cfg.threads,
                               cfg.batch_size, self.cores)
            layout = replace(plan, predicted_ms=predicted_ms(m.opt, cfg, batch), for_batch=batch)
        est = estimated_ms(m.opt, cfg, batch)
        self.tell(f"{m.name} B={batch}: registering {cfg.describe()} as version {version}")
        deploy_version(self.run, self.client, m.base_dir, m.name, version, layout,
                       max_batch_delay_ms=self.options.max_batch_delay_ms, warm=m.sample,
                       response_timeout_s=max(120, int(20 * est / 1000)))
        return _Version(cfg, version)

    def unregister_all(self, m: BenchModel) -> None:
        """Delete every version of the model (the default last: TorchServe refuses it first)."""
        from packrat.serving.versions import retire_version

        for x in sorted(self.client.versions(m.name), key=lambda x: x.is_default):
            retire_version(self.run, self.client, m.name, x.version)

    # -- calibration

    def calibrate(self, m: BenchModel) -> None:
        """Plan with the profile calibrated through this TorchServe (cached beside it), as
        `packrat serve` does; measured again while other processes disturb it."""
        from packrat.serving.calibrate import calibrated_profile, version_numbers

        found = calibrated_profile(
            self.run, self.client, m.base_dir, m.name, m.profile_path, self.cores, m.sample,
            version_numbers(m), max_batch_delay_ms=self.options.max_batch_delay_ms,
            say=self.tell, watch=self.watch(),
            quiet_wait_s=self.options.quiet_wait_s)
        m.opt = found.optimizer
        m.calibration = found.calibration.describe()
        self.tell(f"{m.name}: calibrated profile ({m.calibration}; {found.path})")

    # -- measurement

    def measure(self, m: BenchModel, v: _Version, batch: int) -> RoundResult:
        """One round of one configuration; measured again (up to ATTEMPTS times) when other
        processes used the cores meanwhile; the least disturbed is kept (and counted in the
        row's disturbed_rounds if still over the limit)."""
        watch = self.watch()
        return least_disturbed(lambda: self._measure_once(m, v, batch, watch),
                               lambda r: r.foreign_cores, watch, self.tell,
                               f"{m.name} B={batch} {v.config.describe()}",
                               self.options.quiet_wait_s)

    def _measure_once(self, m: BenchModel, v: _Version, batch: int, watch: ForeignCpu) -> RoundResult:
        from packrat.measure.loadgen import measure_closed_loop

        what = f"{m.name} B={batch} {v.config.describe()}"
        est = estimated_ms(m.opt, v.config, batch)
        seconds = self.options.seconds or default_seconds(est)
        timeout = max(60.0, 20 * est / 1000.0)
        got = measure_closed_loop(
            lambda: self.client.predict(m.name, m.body, version=v.version, timeout_s=timeout),
            clients=batch, warmup_s=warmup_seconds(est), seconds=seconds, timeout_s=timeout,
            watch=watch)
        if got.lost:
            self.tell(f"{what}: {got.lost} requests failed or unanswered, e.g. "
                      f"{(got.failures + got.unanswered)[0]}")
        out = replace(round_result(list(got.samples), got.start, got.end, got.lost),
                      foreign_cores=got.foreign_cores)
        if out.answered == 0:
            raise PackratError(f"{what}: no request was answered in {seconds:.1f} s "
                               f"({got.lost} failed); see {self.run.torchserve / 'logs'}")
        return out

    # -- one model, one B

    def bench_batch(self, m: BenchModel, batch: int) -> Row:
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
        self.tell(f"{m.name} B={batch}: packrat serves {packrat.describe()} "
                  f"(predicted {served.predicted_ms:.1f} ms); {len(configs)} configurations")
        measured: dict[Config, list[RoundResult]] = {c: [] for c in configs}
        try:
            versions = {cfg: self.register(m, cfg, batch) for cfg in configs}
            for r in range(self.options.rounds):
                for cfg in rotated(configs, r):
                    res = self.measure(m, versions[cfg], batch)
                    measured[cfg].append(res)
                    label = "+".join(roles[cfg]) or "oracle candidate"
                    self.tell(f"{m.name} B={batch} round {r + 1}/{self.options.rounds} "
                              f"{cfg.describe()} ({label}): p50 {res.p50_ms:.1f} ms, p99 "
                              f"{res.p99_ms:.1f} ms, {res.throughput_rps:.1f} req/s, "
                              f"{res.answered} answered")
        finally:
            try:
                self.unregister_all(m)
            except PackratError as e:
                self.say(f"{m.name}: could not delete the versions of B={batch}: {e}")
        row = build_row(m.name, batch, n, m.opt, packrat, measured, served.predicted_ms,
                        raw=m.raw_opt, calibration=m.calibration)
        self.tell(f"{m.name} B={batch}: packrat {row.packrat.latency_ms} ms, baseline "
                  f"{row.baseline.latency_ms} ms, oracle {row.oracle.plan} "
                  f"{row.oracle.latency_ms} ms, speedup {row.speedup}, "
                  f"packrat/oracle {row.vs_oracle}")
        return row


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


def run_bench(options: BenchOptions, say: Callable[[str], None] = lambda s: None) -> list[Row]:
    """Run the whole benchmark; its rows (`Row.to_json()` is what `packrat bench --json`
    prints). TorchServe is stopped on the way out, whatever happens."""
    from packrat.measure.cpus import usable_cores
    from packrat.torchserve import ServerSettings, TorchServeClient, stop_server

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
    rows: list[Row] = []
    try:
        models = [prepare_model(name, out, cores, run, say,
                                max_batch=max(options.max_batch or 0, max(options.batches)),
                                largest_b=max(options.batches), quiet_wait_s=options.quiet_wait_s)
                  for name in options.models]
        queue = max(100, 2 * len(cores) * max(options.batches))  # warm-up sends i x b at once
        settings, server = start_on_free_ports(lambda ports: ServerSettings(
            workdir=run.torchserve, model_store=run.model_store, ports=ports,
            properties=(("job_queue_size", str(queue)),)))
        client = TorchServeClient(settings, timeout_s=60)
        bench = _Bench(options, run, client, cores, say, started)
        bench.tell(f"TorchServe up (pid {server.frontend_pid}), inference port "
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
        bench.tell("done")
    return rows


def start_on_free_ports(settings_for):
    """(settings, server): TorchServe started on free ports.

    Ports.free() finds five free ports but cannot hold them while TorchServe's JVM starts and
    binds them, seconds later; a process that takes one meanwhile makes the start fail. Rather
    than guess that from the wording of TorchServe's error, ask the machine: after a failed
    start (start_server leaves none of its processes behind) a chosen port that another socket
    listens on or connects from was taken, and one more start on fresh ports is the remedy.
    Any other failure is raised as it is.
    """
    from packrat.torchserve import Ports, start_server

    settings = settings_for(Ports.free())
    try:
        return settings, start_server(settings)
    except TorchServeError:
        taken = ports_in_use(settings.ports)
        if not taken:
            raise
        log.info("ports %s were taken while TorchServe started; starting on fresh ports", taken)
    settings = settings_for(Ports.free())
    return settings, start_server(settings)


def ports_in_use(ports) -> list[int]:
    """Those of ports that a socket on this machine listens on or connects from."""
    import psutil

    active = {psutil.CONN_LISTEN, psutil.CONN_ESTABLISHED, psutil.CONN_SYN_SENT,
              psutil.CONN_SYN_RECV, psutil.CONN_CLOSE_WAIT}  # not a closed server's leftovers
    ours = set(ports.as_dict().values())
    return sorted({c.laddr.port for c in psutil.net_connections("inet")
                   if c.laddr and c.laddr.port in ours and c.status in active})


def write_results(rows: list[Row], out: Path) -> Path:
    """OUT/bench.json, written atomically."""
    path = Path(out) / "bench.json"
    write_json(path, [r.to_json() for r in rows])
    return path
