"""Calibration: one served measurement per thread count scales that row of the profile.

The profiler times the model alone. Served, an instance also decodes its requests, and its
cores are shared with TorchServe's frontend and the clients; an instance with many threads
suffers most, because its OpenMP barriers wait for whichever core was interrupted. Measured
on the 2-core VM for ResNet-50: one 2-thread instance at batch 8 served in 656 ms against 536
profiled (+22%), two 1-thread instances at batch 4 in 578 ms against 548 (+5%), so the
profile picked the slower plan for B = 8.

So, once TorchServe runs, serve each thread count t of the profile as the plan N//t x <t, b>
(pinned), drive it with exactly instances x b closed-loop clients, and take served /
profiled, at two batches: b sized for `target` / instances and the row's smallest. Row t is
scaled by that ratio, interpolated in log2(b) between the two (the overhead is not a constant
factor: measured 1.15 at b = 1 and 1.22 at b = 8 for that 2-thread instance). Seconds per
thread count; cached.

The data and the scaling are pure (`packrat.core.calibration`); `calibrate` talks to TorchServe.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from packrat.core.calibration import (
    Calibration,
    CalibrationPoint,
    calibration_batch,
    default_target,
)
from packrat.core.profile import Profile
from packrat.errors import PackratError


def version_numbers(holder) -> Iterator[str]:
    """Version names for calibration, taken from holder.next_version (the model's counter in
    the controller and in bench), so later versions never reuse them."""
    while True:
        holder.next_version += 1
        yield str(holder.next_version - 1)


def calibration_path(profile_path: Path, cores: int, max_batch_delay_ms: int, target: int) -> Path:
    return profile_path.with_name(
        f"{profile_path.stem}.calibration-n{cores}-d{max_batch_delay_ms}-b{target}.json")


def load_calibration(path: Path) -> Calibration | None:
    try:
        return Calibration.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_calibration(calibration: Calibration, path: Path) -> None:
    Path(path).write_text(json.dumps(calibration.to_json(), indent=2) + "\n")


def calibrate(run, client, base_dir: Path, name: str, profile: Profile, cores: tuple[int, ...],
              body: bytes, versions: Iterator[str], *, max_batch_delay_ms: int = 10,
              target: int | None = None, min_seconds: float = 3.0, min_batches: int = 8,
              say: Callable[[str], None] = lambda s: None, watch=None) -> Calibration:
    """Serve each thread count's plan through TorchServe, measure it, delete it. target:
    the total batch the plans are sized for (default max(8, N)). watch: an object with
    start() and cores() (packrat.bench.ForeignCpu) read over each measurement."""
    from packrat.core.optimizer import Optimizer
    from packrat.core.policy import manual_plan
    from packrat.serving.controller import deploy_version, remove_version_files

    opt = Optimizer(profile, len(cores))
    target = target or default_target(len(cores))
    points = []
    sizes = []  # (threads, batch): the batch sized for target, then the row's smallest
    for threads in sorted((t for t in profile.threads if t <= len(cores)), reverse=True):
        row_min = min(p.batch for p in profile.points if p.threads == threads)
        high = calibration_batch(profile, threads, len(cores) // threads, target)
        sizes += [(threads, b) for b in dict.fromkeys((high, row_min))]
    for threads, batch in sizes:
        instances = len(cores) // threads
        profiled = opt.latency(threads, batch)
        version = next(versions)
        plan = manual_plan(opt, name, version, instances, threads, batch, cores)
        say(f"{name}: calibrating {plan.describe()} through TorchServe (profiled {profiled:.1f} ms)")
        try:
            deploy_version(run, client, base_dir, name, version, plan, instances=instances,
                           batch_size=batch, max_batch_delay_ms=max_batch_delay_ms,
                           warm_body=body, response_timeout_s=max(120, int(20 * profiled / 1000)))
            served, foreign = _served_latency(client, name, version, body, instances * batch,
                                              max(min_seconds, min_batches * profiled / 1000),
                                              profiled, watch)
        finally:
            try:
                if any(v.version == version for v in client.versions(name)):
                    client.unregister(name, version)
            finally:
                remove_version_files(run, name, version)
        point = CalibrationPoint(threads, instances, batch, round(profiled, 3), round(served, 3),
                                 round(foreign, 3))
        say(f"{name}: {plan.describe()} served in {served:.1f} ms, profiled {profiled:.1f} "
            f"(x{point.scale:.2f})")
        points.append(point)
    return Calibration(tuple(points))


def _served_latency(client, name: str, version: str, body: bytes, clients: int,
                    seconds: float, profiled_ms: float, watch=None) -> tuple[float, float]:
    """Median request latency of the version under `clients` closed-loop clients, and the
    foreign CPU (cores) meanwhile if watched."""
    from packrat.measure.loadgen import ClosedLoop

    timeout = max(60.0, 20 * profiled_ms / 1000)
    samples: list[float] = []
    lock = threading.Lock()
    measuring = threading.Event()

    def send():
        counted = measuring.is_set()  # only requests sent once the clients are in step
        a = time.perf_counter()
        r = client.predict(name, body, version=version, timeout_s=timeout)
        if r.status_code == 200 and counted:
            with lock:
                samples.append((time.perf_counter() - a) * 1000)
        return r

    load = ClosedLoop(send, timeout_s=timeout)
    load.set_concurrency(clients)
    try:
        time.sleep(2 * profiled_ms / 1000 + 0.2)  # the clients fall into step
        measuring.set()
        if watch is not None:
            watch.start()
        time.sleep(seconds)
        foreign = watch.cores() if watch is not None else 0.0
    finally:
        result = load.stop()
    lost = len(result.failures) + len(result.unanswered)
    if lost or not samples:
        first = (result.failures + result.unanswered + ["no answer"])[0]
        raise PackratError(f"{name}: calibration requests failed ({lost} lost, e.g. {first}); "
                           "serve with --no-calibrate to skip calibration")
    return statistics.median(samples), foreign
