"""What registering a version costs the live plan's requests: a synchronous register (TorchServe
answers once the workers are up, holding one of the request threads that the inference API
shares) against one that returns at once (`synchronous=false`, what Packrat does now).

A real TorchServe on loopback serves small-cnn as 2x<t=1,b=8> to an open loop of Poisson
arrivals (`--rate`, 48 client threads, one connection each). Each round registers a version
loaded ahead of need (2 workers, idle priority) once each way, in alternating order, waits for
its workers and deletes it. Per way: the live requests sent while the version started, how
many took over 100 ms, their p99 and the worst.

    .venv/bin/python scripts/bench_register_stall.py [--rounds 4] [--rate 150]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packrat.core.plan import ServedPlan
from packrat.measure.cpus import usable_cores
from packrat.model.archive import build_zoo_archive, extract_archive
from packrat.model.sample import Sample
from packrat.serving.rundir import RunDir
from packrat.serving.versions import (
    check_workers,
    prepare_version,
    retire_version,
    warm_version,
)
from packrat.torchserve import Ports, ServerSettings, TorchServeClient, start_server, stop_server

MODEL = "small-cnn"
SLOW_MS = 100.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rate", type=float, default=150.0, help="live requests per second")
    args = ap.parse_args()
    cores = usable_cores()[:2]
    if len(cores) < 2:
        raise SystemExit("needs 2 cores")
    tmp = Path(tempfile.mkdtemp(prefix="packrat-register-"))
    run = RunDir(tmp / "run").create()
    archive = build_zoo_archive(MODEL, tmp / "archives")
    base = extract_archive(archive.mar_path, run.path / "archives" / MODEL)
    sample = Sample(archive.example_path.read_bytes(), "application/json")
    settings = ServerSettings(workdir=run.torchserve, model_store=run.model_store,
                              ports=Ports.free())

    def plan(version: str, batch: int) -> ServedPlan:
        return ServedPlan(MODEL, version, 1, 2, batch, tuple((c,) for c in cores), 1.0,
                          2 * batch)

    def start(version: str, batch: int, wait: bool, background: bool) -> tuple[float, float]:
        p = plan(version, batch)
        url = prepare_version(run, base, MODEL, version, p, max_batch_delay_ms=10,
                              background=background)
        t0 = time.perf_counter()
        client.register(url, model_name=MODEL, batch_size=batch, max_batch_delay_ms=10,
                        initial_workers=2, wait=wait)
        while not check_workers(run, client, MODEL, version, p).ready:
            time.sleep(0.05)
        return t0, time.perf_counter()

    proc = start_server(settings)
    sent: list[tuple[float, float]] = []  # (sent at, latency ms)
    stop = threading.Event()
    try:
        client = TorchServeClient(settings)
        start("1", 8, True, False)
        warm_version(client, MODEL, "1", 16, sample)
        local = threading.local()

        def send() -> None:
            c = getattr(local, "client", None) or TorchServeClient(settings)
            local.client = c
            t = time.perf_counter()
            r = c.predict(MODEL, sample.body, content_type=sample.content_type, timeout_s=60)
            if r.status_code != 200:
                raise SystemExit(f"live request failed: HTTP {r.status_code} {r.text[:200]}")
            sent.append((t, (time.perf_counter() - t) * 1000))

        def load() -> None:
            rnd = random.Random(0)
            with ThreadPoolExecutor(48) as pool:
                due = time.perf_counter()
                while not stop.is_set():
                    due += rnd.expovariate(args.rate)
                    time.sleep(max(0.0, due - time.perf_counter()))
                    pool.submit(send)

        loader = threading.Thread(target=load)
        loader.start()
        windows: dict[str, list[tuple[float, float]]] = {"synchronous": [], "no wait": []}
        version = 1
        time.sleep(3)
        for r in range(args.rounds):
            for way in (("synchronous", "no wait") if r % 2 == 0 else ("no wait", "synchronous")):
                version += 1
                windows[way].append(start(str(version), 4, way == "synchronous", True))
                time.sleep(2)
                retire_version(run, client, MODEL, str(version))
                time.sleep(2)
        stop.set()
        loader.join()
    finally:
        stop.set()
        stop_server(proc)
    print(f"{MODEL}: live 2x<t=1,b=8> on cores {cores} at {args.rate:.0f} requests/s; "
          f"{args.rounds} rounds, each registering a standby version once each way")
    for way, spans in windows.items():
        ms = sorted(lat for t, lat in sent if any(a <= t <= b for a, b in spans))
        starts = [b - a for a, b in spans]
        print(f"  {way:<12} start {statistics.median(starts):4.1f} s (median), "
              f"{len(ms):5d} live requests meanwhile: {sum(x > SLOW_MS for x in ms):3d} over "
              f"{SLOW_MS:.0f} ms, p50 {statistics.median(ms):6.1f} ms, "
              f"p99 {ms[int(0.99 * (len(ms) - 1))]:7.1f} ms, worst {ms[-1]:7.1f} ms")


if __name__ == "__main__":
    main()
