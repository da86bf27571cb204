"""The trace benchmark's servers: the archive and profile prepared once, then one `packrat
serve` subprocess per configuration, on its own run directory and TorchServe (started from a
config.properties with loopback listeners and a queue no trace fills), driven by the open-loop
generator, and stopped with `packrat stop` (`serving.ops.stop`) whatever happens."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from packrat.bench.configs import Config
from packrat.bench.trace import (
    DRAINED_BATCHES,
    PROGRESS_EVERY_S,
    SERVE_START_S,
    SETTLE_S,
    TIMEOUT_S,
    StandbyMemory,
    TraceOptions,
    ts_config_text,
)
from packrat.core.optimizer import Optimizer
from packrat.core.trace import Step, Trace, arrivals
from packrat.errors import PackratError
from packrat.measure.foreign import (
    ForeignCpu,
    wait_quiet,
)
from packrat.measure.memory import default_standby_memory_mb, pss_mb
from packrat.measure.openloop import OpenLoop, OpenLoopResult
from packrat.serving.rundir import RunDir, controller_pid


@dataclass(frozen=True)
class Prepared:
    zoo: str
    archive: Path
    body: bytes                 # one request (the zoo example)
    cores: tuple[int, ...]
    optimizer: Optimizer        # the profile as calibrated (as measured: --no-calibrate)
    out: Path


def prepare(options: TraceOptions, tell: Callable[[str], None]) -> Prepared:
    """Archive the zoo model into OUT (unless there), profile it as `packrat serve` will (same
    grid and cores, so each serve finds it in the cache), and calibrate it through a TorchServe
    of its own (cached beside the profile, where each serve finds it too); both measured again
    while other processes disturb them (packrat.bench.models, serving.calibrate)."""
    from packrat.bench.models import prepare_model
    from packrat.measure.cpus import usable_cores

    usable = usable_cores()
    n = options.cores or len(usable)
    if not 1 <= n <= len(usable):
        raise PackratError(f"--cores {n}: this process may use 1..{len(usable)} cores")
    if options.max_batch < 1:
        raise PackratError(f"--max-batch must be >= 1, got {options.max_batch}")
    out = Path(options.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    cores = usable[:n]
    with tempfile.TemporaryDirectory(prefix="packrat-trace-") as tmp:
        run = RunDir(Path(tmp)).create()
        m = prepare_model(options.zoo, out, cores, run, tell, max_batch=options.max_batch,
                          largest_b=1, quiet_wait_s=options.quiet_wait_s)
        opt = _calibrated(m, run, cores, options, tell) if options.calibrate else m.opt
    return Prepared(options.zoo, m.archive, m.body, cores, opt, out)


def _calibrated(m, run: RunDir, cores: tuple[int, ...], options: TraceOptions,
                tell: Callable[[str], None]) -> Optimizer:
    """m's profile calibrated as `packrat serve` calibrates it (the cached calibration, else
    one measured now through a TorchServe started for it, then stopped); as measured if
    calibration fails, as serve then plans."""
    from packrat.bench.runner import start_on_free_ports
    from packrat.serving.calibrate import (
        cached_calibration,
        calibrated_profile,
        version_numbers,
    )
    from packrat.torchserve import (
        ServerSettings,
        TorchServeClient,
        server_processes,
        stop_server,
    )

    delay = options.max_batch_delay_ms
    found = cached_calibration(m.profile_path, len(cores), delay)
    if found is None:
        tell(f"{m.name}: calibrating the profile through TorchServe (cached for every serve)")
        settings, server = start_on_free_ports(lambda ports: ServerSettings(
            workdir=run.torchserve, model_store=run.model_store, ports=ports))
        try:
            found = calibrated_profile(
                run, TorchServeClient(settings, timeout_s=60), m.base_dir, m.name,
                m.profile_path, cores, m.sample, version_numbers(m), max_batch_delay_ms=delay,
                say=tell, watch=ForeignCpu(lambda: server_processes(run.torchserve)),
                quiet_wait_s=options.quiet_wait_s)
        except PackratError as e:
            tell(f"{m.name}: calibration failed ({e}); planning with the profile as measured")
            return m.opt
        finally:
            stop_server(server)
    tell(f"{m.name}: calibrated profile ({found.calibration.describe()}; {found.path})")
    return found.optimizer


class Started:
    """`with X(...) as s:` a server started by `_start()` and stopped by `stop()`; a start
    that fails stops what it had started."""

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def wait_serving(proc: subprocess.Popen, run: Path, models: Sequence[str], who: str,
                 log: Path, exited: Callable[[], Exception]) -> None:
    """Until `packrat serve` (proc) serves every model named, its TorchServe up; raises
    exited() if it exits first, PackratError after SERVE_START_S."""
    from packrat.serving.ops import status

    deadline = time.monotonic() + SERVE_START_S
    while True:
        if proc.poll() is not None:
            raise exited()
        try:
            st = status(run)
            if st.controller_pid == proc.pid and st.torchserve_pid and all(
                    st.models.get(m) and st.models[m].version for m in models):
                return
        except PackratError:
            pass
        if time.monotonic() > deadline:
            raise PackratError(f"{who}: packrat serve did not serve {', '.join(models)} "
                               f"within {SERVE_START_S:.0f} s; see {log}")
        time.sleep(0.5)


class Served(Started):
    """`with Served(...) as s:` one `packrat serve` for configuration `name`, serving."""

    def __init__(self, name: str, ready: Prepared, options: TraceOptions,
                 tell: Callable[[str], None]) -> None:
        self.name, self.ready, self.options, self.tell = name, ready, options, tell
        self.proc: subprocess.Popen | None = None
        self.home = ready.out / "runs" / name  # run directory, or its logs if that was too long
        self.run, self.temp = _fresh_run_dir(self.home)
        self.log = ready.out / "runs" / f"{name}.serve.log"
        # (only packrat-warm keeps old versions; the others delete them)
        self.standby_mb = default_standby_memory_mb() if name == "packrat-warm" else 0

    # -- start and stop

    def _start(self) -> None:
        from packrat.torchserve import TorchServeClient, load_settings

        self._launch()
        settings = load_settings(self.run.torchserve)
        urls = settings.endpoints()
        exposed = [a.url for a in (urls.inference, urls.management, urls.metrics)
                   if not a.is_loopback]
        if exposed:
            raise PackratError(f"{self.name}: TorchServe listens beyond loopback ({exposed}); "
                               "the benchmark refuses to run so")
        self.client = TorchServeClient(settings)

    def _launch(self) -> None:
        """serve on fresh loopback ports (again on others if one was taken meanwhile)."""
        from packrat.bench.runner import ports_in_use
        from packrat.torchserve import Ports

        for attempt in (1, 2):
            ports = Ports.free()
            conf = self.ready.out / "runs" / f"{self.name}.config.properties"
            conf.write_text(ts_config_text(ports))
            self._spawn(conf)
            try:
                return self._wait_serving()
            except PackratError:
                if attempt == 2 or self.proc.poll() is None or not ports_in_use(ports):
                    raise
                self.tell(f"{self.name}: ports {ports_in_use(ports)} were taken meanwhile; "
                          "starting again on fresh ports")

    def _watch(self):
        from packrat.torchserve import server_processes

        return ForeignCpu(lambda: server_processes(self.run.torchserve))

    def _spawn(self, conf: Path) -> None:
        o, r = self.options, self.ready
        argv = [sys.executable, "-m", "packrat.cli", "serve", "--run-dir", str(self.run.path),
                "--models", f"{r.zoo}={r.archive}", "--cores", str(len(r.cores)),
                "--max-batch", str(o.max_batch), "--max-batch-delay", str(o.max_batch_delay_ms),
                "--ts-config", str(conf)]
        if not o.calibrate:
            argv.append("--no-calibrate")
        argv += ["--standby-memory", str(self.standby_mb)]
        self.tell(f"{self.name}: starting packrat serve on {self.run.path}")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._relay, args=(self.proc.stderr,), daemon=True).start()

    def _relay(self, stream) -> None:
        with open(self.log, "a") as log:
            for line in stream:
                log.write(line)
                log.flush()
                if line.strip():
                    self.tell(f"{self.name}: serve: {line.rstrip()}")

    def _wait_serving(self) -> None:
        def exited() -> Exception:
            return PackratError(f"{self.name}: packrat serve exited with "
                                f"{self.proc.returncode}; see {self.log}")

        wait_serving(self.proc, self.run.path, [self.ready.zoo], self.name, self.log, exited)

    def stop(self) -> None:
        """`packrat stop`; then whatever is left of this serve and its TorchServe."""
        from packrat.serving.ops import stop
        from packrat.torchserve import find_server, stop_server

        if self.proc is not None and self.proc.poll() is None:
            try:
                self.tell(f"{self.name}: {stop(self.run.path, timeout_s=120)}")
            except PackratError as e:
                self.tell(f"{self.name}: packrat stop failed ({e}); terminating serve")
                self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        server = find_server(self.run.torchserve)
        if server is not None:
            stop_server(server)
        if self.temp is not None:  # keep the logs where the run directory would have been
            self.home.mkdir(parents=True, exist_ok=True)
            for f in (self.run.log_file, self.run.switch_log):
                if f.is_file():
                    shutil.copy(f, self.home / f.name)
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp = None

    # -- what each configuration does

    @property
    def switch_log(self) -> Path:
        """RUN/switches.jsonl, or its copy once a run directory under /tmp is gone."""
        return self.run.switch_log if self.temp is not None else self.home / "switches.jsonl"

    def hold(self, config: Config) -> None:
        """Serve config as a manual plan (it holds: the controller does not switch it)."""
        from packrat.core.decide import Reconfigure
        from packrat.serving.ops import reconfigure

        self.tell(f"{self.name}: packrat reconfigure to {config.describe()}")
        answer = reconfigure(self.run.path, Reconfigure(
            self.ready.zoo, instances=config.instances, threads=config.threads,
            batch=config.batch_size))
        if not answer.ok:
            raise PackratError(f"{self.name}: could not serve {config.describe()}: "
                               f"{answer.message}")

    def warm_up(self, rate: float, min_s: float, max_s: float, seed: int) -> list[float]:
        """Once the machine is quiet (or quiet_wait_s), Poisson arrivals at rate for at least
        min_s and until the plan has settled (see _settled), at most max_s; the answered
        latencies (ms)."""
        wait_quiet(self._watch(), self.tell, f"measuring {self.name}", self.options.quiet_wait_s)
        steady = Trace("warm-up", max_s, (Step(0.0, rate),))
        got = self._drive(arrivals(steady, seed) if rate > 0 else (), rate,
                          lambda t, n: t >= min_s and self._settled(rate, n),
                          lambda t: f"warm-up, {t:.0f} s (at least {min_s:g} s, until the "
                                    "plan settles)")
        self.tell(f"{self.name}: warmed up for {got.elapsed_s:.0f} s")
        return got.latencies_ms()

    def replay(self, schedule: Sequence[float], duration_s: float, peak_rps: float
               ) -> tuple[OpenLoopResult, float, float, StandbyMemory]:
        """(the open loop's result, the wall-clock time it started, the cores other processes
        used meanwhile, the standby memory sampled meanwhile)."""
        watch = self._watch()
        watch.start()
        memory = StandbyWatch(self.run, self.ready.zoo, self.standby_mb, self._status)
        memory.start()
        since = time.time()
        try:
            got = self._drive(schedule, peak_rps, lambda t, n: False,
                              lambda t: f"{max(0.0, duration_s - t):.0f} s of the trace left")
        finally:
            standby = memory.stop()
        return got, since, watch.cores(), standby

    def _drive(self, schedule: Sequence[float], peak_rps: float,
               enough: Callable[[float, int], bool], what: Callable[[float], str]
               ) -> OpenLoopResult:
        """The open loop on a thread, stopped early once enough(seconds in, requests in
        flight); a progress line every PROGRESS_EVERY_S."""
        ready = self.ready
        lock, flight = threading.Lock(), [0]

        def send():
            with lock:
                flight[0] += 1
            try:
                return self.client.predict(ready.zoo, ready.body, timeout_s=TIMEOUT_S)
            finally:
                with lock:
                    flight[0] -= 1

        loop = OpenLoop(send, schedule, timeout_s=TIMEOUT_S,
                        max_in_flight=min(4096, max(64, math.ceil(10 * peak_rps))))
        box: dict = {}

        def run() -> None:
            try:
                box["result"] = loop.run()
            except BaseException as e:  # noqa: BLE001 - raised below, in the caller's thread
                box["error"] = e

        thread = threading.Thread(target=run, daemon=True, name=f"trace-{self.name}")
        start = told = time.monotonic()
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.5)
                now = time.monotonic()
                if now - told >= PROGRESS_EVERY_S:
                    told = now
                    self.tell(f"{self.name}: {what(now - start)}; serving {self._plan()}")
                if thread.is_alive() and enough(now - start, flight[0]):
                    loop.stop()  # then it waits for the requests in flight
        except BaseException:
            loop.stop()
            raise
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _status(self):
        from packrat.serving.ops import status

        try:
            return status(self.run.path).models.get(self.ready.zoo)
        except PackratError:
            return None

    def _plan(self) -> str:
        m = self._status()
        return "?" if m is None else m.describe()

    def _settled(self, rate: float, in_flight: int) -> bool:
        """No switch or load ahead of need under way, no switch in the last SETTLE_S, and no
        backlog: at most what the plan holds in its batches plus the requests of
        DRAINED_BATCHES batch latencies (and batching delays) at rate in flight (a plan the
        rate overloads never gets there)."""
        m = self._status()
        if m is None or m.switching or m.prewarming or not m.workers or (
                m.last_reconfiguration_s is not None and m.last_reconfiguration_s < SETTLE_S):
            return False
        held = len(m.workers) * m.workers[0].batch
        batch_s = ((m.latency_ms or 0.0) + self.options.max_batch_delay_ms) / 1000.0
        return in_flight <= held + rate * DRAINED_BATCHES * batch_s


class StandbyWatch:
    """Every SAMPLE_S on a thread: the PSS of the workers of every version of model but the
    default (what the standby budget holds: standby versions and one loading ahead of need),
    kept only where no switch was under way before and after the look (a switch's versions,
    the one it starts and the one it drains, are not yet or no longer standby)."""

    SAMPLE_S = 1.0

    def __init__(self, run: RunDir, model: str, budget_mb: float,
                 status: Callable[[], object]) -> None:
        self.run, self.model, self.budget_mb, self.status = run, model, budget_mb, status
        self.seen: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"standby-{model}")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> StandbyMemory:
        self.done.set()
        self.thread.join()
        return StandbyMemory(self.budget_mb, max(self.seen, default=None), len(self.seen))

    def _run(self) -> None:
        while not self.done.wait(self.SAMPLE_S):
            mb = self.sample()
            if mb is not None:
                self.seen.append(mb)

    def sample(self) -> float | None:
        before = self.status()
        if before is None or before.switching or before.version is None:
            return None
        prefix = f"{self.model}-v"
        versions = (d.name[len(prefix):] for d in self.run.model_store.glob(f"{prefix}*"))
        others = [v for v in versions if v.isdigit() and v != before.version]
        mb = pss_mb(pid for v in others for pid in self.run.slot_pids(self.model, v).values())
        after = self.status()
        if after is None or after.switching or after.version != before.version:
            return None
        return mb


def _fresh_run_dir(path: Path) -> tuple[RunDir, Path | None]:
    """path emptied (refused while a server runs there); a directory under /tmp instead when
    path is too long for TorchServe's worker sockets (returned second, removed at the end)."""
    from packrat.torchserve import MAX_SOCKET_PATH, find_server

    if path.exists():
        if controller_pid(RunDir(path)) is not None or find_server(path / "torchserve"):
            raise PackratError(f"a packrat serve or TorchServe still runs in {path}; stop it "
                               f"with `packrat stop --run-dir {path}` first")
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = None
    if len(os.fsencode(path / "torchserve" / "tmp" / ".ts.sock.65535")) > MAX_SOCKET_PATH:
        temp = Path(tempfile.mkdtemp(prefix="packrat-trace-"))
        return RunDir(temp / "run"), temp
    return RunDir(path), None
