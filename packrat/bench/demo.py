"""`packrat demo`: the main job on a fresh machine, end to end in a few minutes.

Archives a zoo model, starts `packrat serve` on it (profiling a small grid, cached), drives a
closed-loop load whose concurrency changes by phase, and prints as it goes what the controller
estimates and serves and the latency clients see. After each phase it serves the baseline (one
instance with all cores, batch = the clients) for the same load, then gives control back, so
each phase's latency is compared with the baseline measured on the same machine minutes apart.
Ends with a summary table and stops everything.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packrat.core.plan import describe
from packrat.errors import PackratError


@dataclass(frozen=True)
class PhaseResult:
    clients: int
    plan: str
    packrat_ms: float | None
    baseline_ms: float | None


@dataclass(frozen=True)
class DemoResult:
    phases: tuple[PhaseResult, ...]
    answered: int
    failed: int  # failed or unanswered requests
    switches: int
    seconds: float


def _p50(values):
    return statistics.median(values) if values else None


def run_demo(zoo: str, out: Path, phases: list[tuple[int, float]], baseline_s: float,
             say: Callable[[str], None] = lambda s: None) -> DemoResult:
    from packrat.core.decide import Reconfigure
    from packrat.measure.loadgen import ClosedLoop
    from packrat.model.archive import build_zoo_archive
    from packrat.serving.ops import reconfigure, status
    from packrat.serving.rundir import RunDir
    from packrat.torchserve import TorchServeClient, load_settings

    started = time.monotonic()

    def elapsed():
        return f"[{time.monotonic() - started:5.0f} s]"

    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    mar, example = out / f"{zoo}.mar", out / f"{zoo}.example.json"
    if not (mar.is_file() and example.is_file()):
        say(f"{elapsed()} archiving {zoo}")
        build_zoo_archive(zoo, out, progress=lambda m: say(f"{elapsed()} {zoo}: {m}"))
    run = out / "run"
    from packrat.serving.rundir import controller_pid

    if controller_pid(RunDir(run)) is not None:
        raise PackratError(f"a packrat controller already runs on {run}; stop it with "
                           f"`packrat stop --run-dir {run}` or give another --out")
    say(f"{elapsed()} starting packrat serve (profiles {zoo} on a small grid the first time)")
    serve = subprocess.Popen(
        [sys.executable, "-m", "packrat.cli", "serve", "--run-dir", str(run), "--models",
         f"{zoo}={mar}", "--max-batch", str(max(c for c, _ in phases)), "--interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    threading.Thread(target=_relay, args=(serve.stderr, say, elapsed), daemon=True).start()
    results: list[PhaseResult] = []
    load = None
    try:
        deadline = time.monotonic() + 900
        while not _serving(run, zoo, serve.pid):
            if serve.poll() is not None:
                raise PackratError(f"packrat serve exited with {serve.returncode}; see above")
            if time.monotonic() > deadline:
                raise PackratError("packrat serve did not start serving in 15 minutes")
            time.sleep(0.5)
        client = TorchServeClient(load_settings(RunDir(run).torchserve))
        body = example.read_bytes()
        load = ClosedLoop(lambda: client.predict(zoo, body, timeout_s=120), timeout_s=120)
        cores = len(status(run).models[zoo].workers[0].planned_cores)
        for clients, seconds in phases:
            say(f"{elapsed()} phase: {clients} concurrent clients for {seconds:.0f} s")
            load.set_concurrency(clients)
            mark = settled = len(load.result.latencies_ms)
            switches = status(run).models[zoo].reconfigurations
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                time.sleep(min(5.0, max(0.1, end - time.monotonic())))
                m = status(run).models[zoo]
                if m.reconfigurations != switches:  # count only the plan the phase ends on
                    switches, settled = m.reconfigurations, len(load.result.latencies_ms)
                window = load.result.latencies_ms[mark:]
                say(f"{elapsed()}   B estimate {m.estimated_batch:>3}, serving "
                    f"{m.describe()}, {m.reconfigurations} reconfigurations, "
                    f"client p50 {_fmt(_p50(window[-200:]))}")
            window = load.result.latencies_ms[settled:] or load.result.latencies_ms[mark:]
            packrat_ms = _p50(window)
            plan = status(run).models[zoo].describe()
            if plan == describe(1, cores, clients):  # Packrat serves the baseline itself
                results.append(PhaseResult(clients, plan, packrat_ms, packrat_ms))
                continue
            say(f"{elapsed()}   baseline for comparison: 1 instance, {cores} threads, batch {clients}")
            answer = reconfigure(run, Reconfigure(zoo, instances=1, threads=cores, batch=clients))
            if not answer.ok:
                raise PackratError(answer.message)
            mark = len(load.result.latencies_ms)
            time.sleep(baseline_s)
            window = load.result.latencies_ms[mark:]
            baseline_ms = _p50(window[len(window) // 3:])
            say(f"{elapsed()}   baseline client p50 {_fmt(baseline_ms)}; giving control back")
            reconfigure(run, Reconfigure(zoo, auto=True))
            results.append(PhaseResult(clients, plan, packrat_ms, baseline_ms))
        switches = status(run).models[zoo].reconfigurations
    finally:
        if load is not None:
            load.stop()
        if serve.poll() is None:
            say(f"{elapsed()} stopping")
            serve.terminate()  # SIGTERM, as `packrat stop` sends: serve stops TorchServe
            try:
                serve.wait(timeout=120)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
                stop_server_of(run)
    r = load.result
    return DemoResult(tuple(results), r.answered, len(r.failures) + len(r.unanswered), switches,
                      time.monotonic() - started)


def _serving(run: Path, zoo: str, pid: int) -> bool:
    """Our `packrat serve` (pid) is the live controller and serves the model."""
    from packrat.serving.ops import status

    try:
        report = status(run)
        return bool(report.controller_pid == pid and report.torchserve_pid
                    and zoo in report.models and report.models[zoo].version)
    except PackratError:
        return False


def stop_server_of(run: Path) -> None:
    from packrat.serving.rundir import RunDir
    from packrat.torchserve import find_server, stop_server

    server = find_server(RunDir(run).torchserve)
    if server is not None:
        stop_server(server)


def _fmt(ms):
    return "-" if ms is None else f"{ms:.0f} ms"


def _relay(stream, say, elapsed):
    for line in stream:
        if line.strip():
            say(f"{elapsed()}   serve: {line.rstrip()}")


def summary(demo: DemoResult) -> str:
    lines = [f"{'clients':>7}  {'Packrat plan':<16}{'Packrat p50':>12}{'baseline p50':>14}{'speedup':>9}"]
    for r in demo.phases:
        speed = (f"{r.baseline_ms / r.packrat_ms:8.2f}x" if r.packrat_ms and r.baseline_ms else f"{'-':>9}")
        lines.append(f"{r.clients:>7}  {r.plan:<16}{_fmt(r.packrat_ms):>12}{_fmt(r.baseline_ms):>14}{speed}")
    lines.append(f"{demo.answered} requests answered, {demo.failed} failed or unanswered; "
                 f"{demo.switches} switches (the controller's and those for the baseline); "
                 f"{demo.seconds:.0f} s in all")
    return "\n".join(lines)
