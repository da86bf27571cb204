"""Calibration: one served measurement per thread count scales that row of the profile.

The profiler times the model alone. Served, an instance also decodes its requests, and its
cores are shared with TorchServe's frontend and the clients; an instance with many threads
suffers most, because its OpenMP barriers wait for whichever core was interrupted. Measured
on the 2-core VM for ResNet-50: one 2-thread instance at batch 8 served in 656 ms against 536
profiled (+22%), two 1-thread instances at batch 4 in 578 ms against 548 (+5%), so the
profile picked the slower plan for B = 8.

So, once TorchServe runs, serve each thread count t of the profile as the plan N//t x <t, b>
(pinned), drive it with exactly instances x b closed-loop clients, and take served /
profiled, at up to three batches (`calibration_sizes`): b sized for `target` / instances, the
row's smallest, and the row's batch of most throughput. Row t is scaled by that ratio,
interpolated in log2(b) between them (the overhead is not a constant factor: measured 1.15 at
b = 1 and 1.22 at b = 8 for that 2-thread instance). Seconds per point; cached (a cached
calibration without every point is measured again).

The data and the scaling are pure (`packrat.core.calibration`); `calibrate` talks to TorchServe;
`calibrated_profile` is the whole flow `packrat serve` and `packrat bench` share: the cached
calibration, else one measured (again while other processes disturb it) and cached, and the
optimizer of the scaled profile.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from packrat.core.calibration import (
    Calibration,
    CalibrationPoint,
    calibration_batch,
    default_target,
    scale_profile,
)
from packrat.core.optimizer import Optimizer
from packrat.core.profile import Profile, read_profile
from packrat.errors import PackratError
from packrat.jsonfile import read_json, write_json
from packrat.measure.foreign import ATTEMPTS, ForeignCpu, least_disturbed
from packrat.model.sample import Sample


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
    """None if missing or corrupt (then it is measured again)."""
    data = read_json(path)
    try:
        return None if data is None else Calibration.from_json(data)
    except (ValueError, KeyError, TypeError):
        return None


def save_calibration(calibration: Calibration, path: Path) -> None:
    write_json(Path(path), calibration.to_json())


@dataclass(frozen=True)
class CalibratedProfile:
    calibration: Calibration
    path: Path           # where it is cached
    cached: bool         # True: read from path; False: measured now (and saved there)
    optimizer: Optimizer  # of the profile scaled by the calibration, for N cores


def cached_calibration(profile_path: Path, cores: int, max_batch_delay_ms: int
                       ) -> CalibratedProfile | None:
    """The calibration cached for this profile, N cores and batching delay; None if none is."""
    path = calibration_path(profile_path, cores, max_batch_delay_ms, default_target(cores))
    cal = load_calibration(path)
    if cal is None:
        return None
    profile = read_profile(profile_path)
    if not set(calibration_sizes(profile, cores, default_target(cores))) <= {
            (p.threads, p.batch) for p in cal.points}:
        return None  # made by an older Packrat that measured fewer points: measure again
    return CalibratedProfile(cal, path, True, Optimizer(scale_profile(profile, cal), cores))


def calibrated_profile(run, client, base_dir: Path, name: str, profile_path: Path,
                       cores: tuple[int, ...], sample: Sample, versions: Iterator[str], *,
                       max_batch_delay_ms: int, say: Callable[[str], None] = lambda s: None,
                       watch: ForeignCpu | None = None, attempts: int = ATTEMPTS,
                       quiet_wait_s: float = 0.0) -> CalibratedProfile:
    """The cached calibration of the profile at profile_path, else one measured through
    TorchServe (`calibrate`) and saved. With a watch, each try first waits up to quiet_wait_s
    for a quiet machine, and a calibration other processes disturbed is measured again (at
    most `attempts` tries; the least disturbed is kept). Raises PackratError if it fails."""
    found = cached_calibration(profile_path, len(cores), max_batch_delay_ms)
    if found is not None:
        return found
    path = calibration_path(profile_path, len(cores), max_batch_delay_ms,
                            default_target(len(cores)))
    profile = read_profile(profile_path)

    def measure() -> Calibration:
        return calibrate(run, client, base_dir, name, profile, cores, sample, versions,
                         max_batch_delay_ms=max_batch_delay_ms, say=say, watch=watch)

    if watch is None:
        cal = measure()
    else:
        # read over each measurement only: workers that started and stopped between them are
        # ours but gone, and would count as foreign over the whole span
        cal = least_disturbed(measure, lambda c: max((p.foreign_cores for p in c.points),
                                                     default=0.0),
                              watch, say, f"calibrating {name}", quiet_wait_s, attempts)
    save_calibration(cal, path)
    return CalibratedProfile(cal, path, False, Optimizer(scale_profile(profile, cal), len(cores)))


def calibrate(run, client, base_dir: Path, name: str, profile: Profile, cores: tuple[int, ...],
              sample: Sample, versions: Iterator[str], *, max_batch_delay_ms: int = 10,
              target: int | None = None, min_seconds: float = 3.0, min_batches: int = 8,
              say: Callable[[str], None] = lambda s: None, watch=None) -> Calibration:
    """Serve each thread count's plan through TorchServe, measure it, delete it. target:
    the total batch the plans are sized for (default max(8, N)). watch: an object with
    start() and cores() (packrat.measure.foreign.ForeignCpu) read over each measurement."""
    from packrat.core.policy import manual_plan
    from packrat.serving.versions import deploy_version, retire_version

    opt = Optimizer(profile, len(cores))
    target = target or default_target(len(cores))
    points = []
    for threads, batch in calibration_sizes(profile, len(cores), target):
        instances = len(cores) // threads
        profiled = opt.latency(threads, batch)
        version = next(versions)
        plan = manual_plan(opt, name, version, instances, threads, batch, cores)
        say(f"{name}: calibrating {plan.describe()} through TorchServe (profiled {profiled:.1f} ms)")
        try:
            deploy_version(run, client, base_dir, name, version, plan,
                           max_batch_delay_ms=max_batch_delay_ms, warm=sample,
                           response_timeout_s=max(120, int(20 * profiled / 1000)))
            served, foreign = _served_latency(client, name, version, sample, instances * batch,
                                              max(min_seconds, min_batches * profiled / 1000),
                                              profiled, watch)
        finally:
            retire_version(run, client, name, version)
        point = CalibrationPoint(threads, instances, batch, round(profiled, 3), round(served, 3),
                                 round(foreign, 3))
        say(f"{name}: {plan.describe()} served in {served:.1f} ms, profiled {profiled:.1f} "
            f"(x{point.scale:.2f})")
        points.append(point)
    return Calibration(tuple(points))


def calibration_sizes(profile: Profile, cores: int, target: int) -> list[tuple[int, int]]:
    """(threads, batch) to serve, each as N//threads instances: per thread count the batch
    sized for target, the row's smallest, and the batch of the row's most throughput. The
    last decides the plans of most capacity, which the controller loads for an overload and
    the trace benchmark scales its rates to, and its batch is often beyond target, where
    interpolation only guesses: ResNet-50's 2x<t=1,b=8> was predicted to serve 19.4
    requests/s from a t=1 point at b=4, and served about 15.5."""
    sizes = []
    for threads in sorted((t for t in profile.threads if t <= cores), reverse=True):
        row = {p.batch: p.latency_ms for p in profile.points if p.threads == threads}
        high = calibration_batch(profile, threads, cores // threads, target)
        most = max(row, key=lambda b: (b / row[b], -b))  # (the smaller batch of a tie)
        sizes += [(threads, b) for b in dict.fromkeys((high, min(row), most))]
    return sizes


def _served_latency(client, name: str, version: str, sample: Sample, clients: int,
                    seconds: float, profiled_ms: float, watch=None) -> tuple[float, float]:
    """Median request latency of the version under `clients` closed-loop clients, and the
    foreign CPU (cores) meanwhile if watched."""
    from packrat.measure.loadgen import measure_closed_loop

    timeout = max(60.0, 20 * profiled_ms / 1000)
    m = measure_closed_loop(
        lambda: client.predict(name, sample.body, version=version, timeout_s=timeout,
                               content_type=sample.content_type), clients,
        warmup_s=2 * profiled_ms / 1000 + 0.2,  # the clients fall into step
        seconds=seconds, timeout_s=timeout, watch=watch)
    latencies = m.latencies_ms()
    if m.lost or not latencies:
        first = (m.failures + m.unanswered + ("no answer",))[0]
        raise PackratError(f"{name}: calibration requests failed ({m.lost} lost, e.g. {first}); "
                           "serve with --no-calibrate to skip calibration")
    return statistics.median(latencies), m.foreign_cores
