#!/usr/bin/env python3
"""Soak: many reconfigurations under continuous load, then a summary.

Starts `packrat serve` (a real TorchServe on loopback) with a zoo model, drives a closed loop
of clients through it, switches the plan --reconfigurations times through `packrat
reconfigure`'s code path (cycling through every plan shape the cores allow, ending on the
first), and reports requests answered / failed / unanswered, switch times and the memory of
the frontend and the workers at start and end (same plan both times). Exits non-zero if a
request was lost or a version was left behind.

    python scripts/soak.py [--zoo small-cnn] [--reconfigurations 50] [--clients 4]
                           [--cores N] [--out out/soak] [--profile FILE.csv] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packrat.model.archive import build_zoo_archive  # noqa: E402
from packrat.measure.cpus import usable_cores  # noqa: E402
from packrat.measure.loadgen import ClosedLoop  # noqa: E402
from packrat.serving.rundir import RunDir  # noqa: E402
from packrat.core.decide import Reconfigure  # noqa: E402
from packrat.serving.ops import reconfigure, status  # noqa: E402
from packrat.torchserve import TorchServeClient, load_settings, server_processes  # noqa: E402


@dataclass(frozen=True)
class Memory:
    frontend_mb: float
    workers_mb: tuple[float, ...]  # RSS of each worker of the served version


@dataclass(frozen=True)
class SoakReport:
    model: str
    cores: int
    clients: int
    reconfigurations: int
    failed_switches: int
    duration_s: float
    answered: int
    failed: int
    unanswered: int
    switch_median_s: float
    switch_max_s: float
    memory_start: Memory
    memory_end: Memory
    frontend_mb_every_10: tuple[float, ...]  # frontend RSS after every 10th switch
    versions_left: int  # registered versions at the end (1 expected)


def shapes(cores: int) -> list[tuple[int, int, int]]:
    """Every (instances, threads, batch) the cores allow, batch in 1, 2, 4; consecutive
    shapes differ, and the cycle starts from 1 instance of all cores at batch 1."""
    out = [(1, cores, 1)]
    for t in sorted({1, 2, cores // 2, cores} - {0}):
        for i in range(1, cores // t + 1):
            for b in (1, 2, 4):
                if (i, t, b) not in out:
                    out.append((i, t, b))
    return out


def memory(run: Path) -> Memory:
    st = status(run)
    mb = lambda pid: psutil.Process(pid).memory_info().rss / 2**20  # noqa: E731
    workers = []
    for m in st.models.values():
        workers += [round(mb(w.pid), 1) for w in m.workers if w.pid]
    return Memory(round(mb(st.torchserve_pid), 1), tuple(workers))


def wait_served(run: Path, name: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"packrat serve exited with status {proc.returncode}; see {run / 'packrat.log'}")
        try:
            if status(run).models[name].version:
                return
        except Exception:  # not up yet: no state file, or being written
            pass
        time.sleep(0.5)
    raise SystemExit(f"packrat serve did not serve {name} in {timeout_s:.0f} s")


def soak(args) -> SoakReport:
    out = Path(args.out).absolute()
    run = out / "run"
    # serve uses the first `cores` usable cores; the shapes cycled through are of those
    cores = args.cores if args.cores is not None else len(usable_cores())
    mar = build_zoo_archive(args.zoo, out).mar_path
    body = (out / f"{args.zoo}.example.json").read_bytes()
    cmd = [sys.executable, "-m", "packrat.cli", "serve", "--run-dir", str(run),
           "--models", f"{args.zoo}={mar}", "--max-batch", "4", "--cores", str(cores),
           "--standby-memory", "0"]  # every switch cold: the most churn
    if args.profile:
        cmd += ["--profiles", f"{args.zoo}={args.profile}"]
    log = open(out / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    load = None
    try:
        wait_served(run, args.zoo, proc)
        cycle = shapes(cores)
        first = cycle[0]
        answer = reconfigure(run, _request(args.zoo, first))
        if not answer.ok:
            raise SystemExit(f"cannot serve {first}: {answer.message}")
        client = TorchServeClient(load_settings(RunDir(run).torchserve))
        load = ClosedLoop(lambda: client.predict(args.zoo, body, timeout_s=120), timeout_s=120)
        load.set_concurrency(args.clients)
        time.sleep(3)
        start_mem = memory(run)
        print(f"start: frontend {start_mem.frontend_mb} MB, workers {start_mem.workers_mb} MB "
              f"({first[0]}x<t={first[1]},b={first[2]}>)", flush=True)
        # n switches through the other shapes in turn, the last one back to the first
        rest = cycle[1:]
        plan = [rest[k % len(rest)] for k in range(args.reconfigurations - 1)] + [first]
        times, failed_switches, frontend_trace = [], 0, []
        began = time.monotonic()
        for k, shape in enumerate(plan, 1):
            answer = reconfigure(run, _request(args.zoo, shape))
            if answer.ok:
                times.append(answer.seconds)
            else:
                failed_switches += 1
            if k % 10 == 0:
                frontend_trace.append(memory(run).frontend_mb)
            r = load.result
            print(f"[{k}/{len(plan)}] {shape[0]}x<t={shape[1]},b={shape[2]}> "
                  f"{'in %.1f s' % answer.seconds if answer.ok else 'FAILED: ' + answer.message}; "
                  f"{r.answered} answered, {len(r.failures)} failed, {len(r.unanswered)} unanswered",
                  flush=True)
        time.sleep(3)
        end_mem = memory(run)
        result = load.stop()
        load = None
        versions = len(client.versions(args.zoo))
        for f in result.failures[:5] + result.unanswered[:5]:
            print(f"  lost: {f}")
        return SoakReport(
            model=args.zoo, cores=cores, clients=args.clients, reconfigurations=len(plan),
            failed_switches=failed_switches, duration_s=round(time.monotonic() - began, 1),
            answered=result.answered, failed=len(result.failures),
            unanswered=len(result.unanswered),
            switch_median_s=round(statistics.median(times), 2) if times else 0.0,
            switch_max_s=round(max(times), 2) if times else 0.0,
            memory_start=start_mem, memory_end=end_mem, versions_left=versions,
            frontend_mb_every_10=tuple(frontend_trace),
        )
    finally:
        if load is not None:
            load.stop()
        subprocess.run([sys.executable, "-m", "packrat.cli", "stop", "--run-dir", str(run)],
                       check=False)
        proc.wait(timeout=120)
        log.close()
        left = server_processes(RunDir(run).torchserve)
        if left:
            print(f"warning: TorchServe processes {left} still run", file=sys.stderr)


def _request(model: str, shape: tuple[int, int, int]) -> Reconfigure:
    i, t, b = shape
    return Reconfigure(model, instances=i, threads=t, batch=b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="small-cnn", help="zoo model (default small-cnn)")
    ap.add_argument("--reconfigurations", type=int, default=50)
    ap.add_argument("--clients", type=int, default=4, help="closed-loop clients (default 4)")
    ap.add_argument("--cores", type=int,
                    help="cores to serve on, passed to `packrat serve --cores`; the plan shapes "
                         "cycled through are those of these cores (default: all usable)")
    ap.add_argument("--out", default="out/soak", help="archive, run directory, soak.json")
    ap.add_argument("--profile", help="profile CSV to serve with instead of measuring one")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()
    if args.reconfigurations < 2:
        ap.error("--reconfigurations must be at least 2")
    usable = len(usable_cores())
    if args.cores is not None and not 1 <= args.cores <= usable:
        ap.error(f"--cores {args.cores}: this process may use 1..{usable} cores")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report = soak(args)
    data = asdict(report)
    (Path(args.out) / "soak.json").write_text(json.dumps(data, indent=2) + "\n")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        s, e = report.memory_start, report.memory_end
        print(f"\n{report.model} on {report.cores} cores, {report.clients} clients, "
              f"{report.reconfigurations} reconfigurations in {report.duration_s} s "
              f"({report.failed_switches} failed)")
        print(f"requests: {report.answered} answered, {report.failed} failed, "
              f"{report.unanswered} unanswered")
        print(f"switch time: median {report.switch_median_s} s, max {report.switch_max_s} s")
        print(f"memory (RSS, MB): frontend {s.frontend_mb} -> {e.frontend_mb}; "
              f"workers {list(s.workers_mb)} -> {list(e.workers_mb)}")
        if report.frontend_mb_every_10:
            print(f"frontend RSS after every 10 switches (MB): {list(report.frontend_mb_every_10)}")
        print(f"versions registered at the end: {report.versions_left}")
    ok = (report.failed == 0 and report.unanswered == 0 and report.failed_switches == 0
          and report.versions_left == 1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
