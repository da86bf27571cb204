"""The profiler: measure a model archive's latency per (threads, batch), targeted and cached.

One subprocess per thread count t, pinned to t cores, times batches b = 1, 2, 4, ... up to
max_batch through the archive's own handler. With a sample request (any archive) it times the
whole handler as a TorchServe worker runs it on b copies of the sample; without one (only
Packrat's archives, which carry a synthetic example) the model's forward pass. The subprocesses
are forked from one process that loaded the model once (packrat.measure.profile_worker).

A handler may refuse large batches: the first size it fails on ends every row there (the
profile's batch limit, so no plan can exceed it); failing on b = 1 means it rejects the sample.

Targeted: thread counts are measured from the largest down. Before each, the optimizer solves
the largest batch Bmax on what is known so far; that plan is feasible, so its latency U bounds
the optimal latency of every B <= Bmax (the optimum never decreases with B). An instance whose
latency exceeds U can be in no optimal plan, and a larger batch at the same t is slower still,
so a row stops at the first batch slower than U. The skipped points are the slowest ones to
measure: large batches on few threads.

Cached: results are stored under a key of the archive's content hash, the CPU model, the usable
cores, the torch version, the grid and the sample and envelope if any, so a second run returns
at once; force=True measures again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from packrat.core.optimizer import Optimizer
from packrat.core.profile import (
    MAX_BATCH,
    Profile,
    ProfileMeta,
    ProfilePoint,
    read_profile,
    write_profile,
)
from packrat.errors import PlanError, ProfilerError
from packrat.measure.archive_dir import OpenedArchive, is_packrat_built, open_archive
from packrat.measure.cpus import cpu_model, usable_cores
from packrat.model.archive import archive_digest, check_archive
from packrat.model.sample import Sample

log = logging.getLogger(__name__)


def default_threads(n: int) -> tuple[int, ...]:
    """1..n for up to 16 cores; powers of two and n itself above that."""
    if n <= 16:
        return tuple(range(1, n + 1))
    out, t = [], 1
    while t < n:
        out.append(t)
        t *= 2
    return tuple(out + [n])


def batch_grid(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to max_batch, and max_batch itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return tuple(out + [max_batch])


@dataclass(frozen=True)
class ProfileSettings:
    threads: tuple[int, ...]
    max_batch: int = 32
    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 50
    min_time_s: float = 0.5
    prune: bool = True
    # Measure t threads while the other N//t - 1 instances of a t-thread plan run beside it.
    contended: bool = True

    @property
    def batches(self) -> tuple[int, ...]:
        return batch_grid(self.max_batch)


@dataclass(frozen=True)
class ProgressEvent:
    """What the profiler reports as it goes; the CLI draws a progress bar from it."""

    # "load", "start" (a thread count), "point", "skip" (rest of a row, batch = its first),
    # "limit" (the handler failed at batch; no row goes above limit; message = its error),
    # "cached"
    kind: str
    done: int
    total: int
    elapsed_s: float
    threads: int = 0
    batch: int = 0
    latency_ms: float = 0.0
    limit: int = 0
    message: str = ""


@dataclass(frozen=True)
class ProfileRun:
    profile: Profile
    path: Path  # the cached CSV
    cached: bool
    # The largest batch the handler took, where a larger one failed (None: every size worked),
    # and the handler's error on one line.
    batch_limit: int | None = None
    batch_limit_reason: str = ""


@dataclass(frozen=True)
class _Outcome:
    """What the profile worker measured."""

    points: list[ProfilePoint]
    batch_limit: int | None
    batch_limit_reason: str


def cache_dir() -> Path:
    env = os.environ.get("PACKRAT_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "packrat" / "profiles"


def validate_settings(settings: ProfileSettings, cores: tuple[int, ...]) -> None:
    if settings.max_batch < 1:
        raise ProfilerError(f"--max-batch must be >= 1, got {settings.max_batch}")
    if settings.max_batch > MAX_BATCH:
        raise ProfilerError(f"--max-batch must be <= {MAX_BATCH}, got {settings.max_batch}")
    if not 0 <= settings.min_time_s < math.inf:  # also refuses nan
        raise ProfilerError(f"--min-time must be >= 0 seconds, got {settings.min_time_s}")
    if not settings.threads:
        raise ProfilerError("--threads is empty; give thread counts like 1,2,4")
    bad = [t for t in settings.threads if t < 1 or t > len(cores)]
    if bad:
        raise ProfilerError(
            f"thread counts {bad} are outside 1..{len(cores)}: this process may use "
            f"{len(cores)} cores ({','.join(map(str, cores))})"
        )
    if settings.min_reps < 1 or settings.max_reps < settings.min_reps or settings.warmup < 0:
        raise ProfilerError("need warmup >= 0 and 1 <= min_reps <= max_reps")


def profile_archive(
    archive: Path,
    settings: ProfileSettings | None = None,
    *,
    sample: Sample | None = None,
    envelope: str | None = None,
    force: bool = False,
    cache: Path | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> ProfileRun:
    """Measure (or read from the cache) the archive's profile.

    sample: one request body; the whole handler is timed on b copies of it, as TorchServe
    runs it (envelope: TorchServe's service_envelope, e.g. "kserve"). Without it, only an
    archive Packrat built can be profiled (on its synthetic example).
    """
    archive = Path(archive)
    cores = usable_cores()
    settings = settings or ProfileSettings(threads=default_threads(len(cores)))
    settings = replace(settings, threads=tuple(sorted(set(settings.threads), reverse=True)))
    validate_settings(settings, cores)
    digest = archive_digest(archive)  # also checks that the archive exists
    check_archive(archive)  # what TorchServe needs, and Packrat's files if it names its handler
    if sample is None and not is_packrat_built(archive):
        raise ProfilerError(
            f"{archive} was not built by Packrat and has no built-in example: pass --sample "
            "FILE, one request body as a client sends it (an image, a text, a JSON file)"
        )
    torch_version = _torch_version()
    key_fields = {
        "archive": digest, "cpu": cpu_model(), "cores": cores, "torch": torch_version,
        "settings": [settings.threads, settings.max_batch, settings.warmup,
                     settings.min_reps, settings.max_reps, settings.min_time_s,
                     settings.prune, settings.contended],
    }
    if sample is not None:  # absent otherwise: caches of Packrat archives stay valid
        key_fields.update(sample=sample.digest(), envelope=envelope)
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    path = (cache or cache_dir()) / f"{archive.stem}-{key}.csv"
    if path.is_file() and not force:
        profile = read_profile(path)
        if progress:
            n = len(profile.points)
            progress(ProgressEvent("cached", n, n, 0.0, limit=profile.meta.batch_limit or 0,
                                   message=profile.meta.batch_limit_reason))
        return ProfileRun(profile, path, cached=True, batch_limit=profile.meta.batch_limit,
                          batch_limit_reason=profile.meta.batch_limit_reason)

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="packrat-profile-") as tmp:
        opened = open_archive(archive, Path(tmp) / "model")
        job = _job(opened, settings, cores, sample, envelope, Path(tmp))
        outcome = _run_worker(job, settings, cores, progress, start)
    points = outcome.points
    allowed = [b for b in settings.batches if outcome.batch_limit is None or b <= outcome.batch_limit]
    measured = {(p.threads, p.batch) for p in points}
    skipped = [(t, b) for t in settings.threads for b in allowed if (t, b) not in measured]
    duration = time.monotonic() - start
    meta = ProfileMeta(
        model=archive.stem, archive_sha256=digest, cpu_model=cpu_model(), cores=cores,
        torch_version=torch_version, threads_grid=tuple(sorted(settings.threads)),
        max_batch=settings.max_batch, measured_points=len(points),
        skipped_points=len(skipped), duration_s=round(duration, 2), contended=settings.contended,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), source=str(archive),
        batch_limit=outcome.batch_limit, batch_limit_reason=outcome.batch_limit_reason,
    )
    profile = Profile(tuple(points), meta)
    write_profile(profile, path)
    log.info("profiled %s: %d points measured, %d skipped, %.1f s", archive, len(points),
             len(skipped), duration)
    return ProfileRun(profile, path, cached=False, batch_limit=outcome.batch_limit,
                      batch_limit_reason=outcome.batch_limit_reason)


def latency_bound(points, cores: int, max_batch: int) -> float | None:
    """Latency of the best plan for max_batch from the (threads, batch, latency_ms) measured
    so far; None while there is no plan yet."""
    if not points:
        return None
    try:
        profile = Profile(tuple(ProfilePoint(t, b, lat) for t, b, lat in points))
        return Optimizer(profile, cores).plan(max_batch).optimal.latency_ms
    except PlanError:
        return None


def _job(opened: OpenedArchive, settings: ProfileSettings, cores: tuple[int, ...],
         sample: Sample | None, envelope: str | None, tmp: Path) -> dict:
    """The profile worker's job (JSON on its command line; the sample's body in a file)."""
    job = {
        "model_dir": str(opened.model_dir), "threads": list(settings.threads),
        "cores": list(cores), "plan_cores": len(cores), "batches": list(settings.batches),
        "prune": settings.prune, "contended": settings.contended,
        "warmup": settings.warmup, "min_reps": settings.min_reps,
        "max_reps": settings.max_reps, "min_time_s": settings.min_time_s,
        "model_name": opened.model_name, "handler": opened.handler, "envelope": envelope,
        "sample": None,
    }
    if sample is not None:
        body = tmp / "sample.body"
        body.write_bytes(sample.body)
        job["sample"] = {"path": str(body), "content_type": sample.content_type,
                         "source": sample.source}
    return job


def _run_worker(job: dict, settings: ProfileSettings, cores: tuple[int, ...], progress,
                start: float) -> _Outcome:
    total = len(settings.threads) * len(settings.batches)
    batches = list(settings.batches)  # shrinks to the handler's limit
    points: list[ProfilePoint] = []
    limit: int | None = None
    reason = ""
    error: dict | None = None  # the worker's event "error"
    done = 0  # points measured or skipped

    def report(kind: str, **fields) -> None:
        if progress:
            progress(ProgressEvent(kind, done, total, time.monotonic() - start, **fields))

    report("load")
    with tempfile.TemporaryFile(mode="w+") as err:
        # Its own process group: the forked measurement and neighbor processes go with it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "packrat.measure.profile_worker", json.dumps(job)],
            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
        )
        try:
            row: list[ProfilePoint] = []
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                kind = event.get("event")
                if kind == "start":
                    row = []
                    report("start", threads=event["threads"])
                elif kind == "point":
                    row.append(ProfilePoint(
                        event["threads"], event["batch"], event["latency_ms"],
                        event["p10_ms"], event["p90_ms"], event["reps"],
                    ))
                    done += 1
                    report("point", threads=event["threads"], batch=event["batch"],
                           latency_ms=event["latency_ms"])
                elif kind == "limit" and event["batch"] > batches[0]:
                    t, failed = event["threads"], event["batch"]
                    limit = max(b for b in batches if b < failed)
                    reason = event["error"]
                    batches = [b for b in batches if b <= limit]
                    total = len(settings.threads) * len(batches)
                    done = min(done, total)
                    report("limit", threads=t, batch=failed, limit=limit, message=reason)
                elif kind == "done" and row:
                    t = event["threads"]
                    _check_placement(event, t, cores[:t])
                    points.extend(row)
                    rest = [b for b in batches if b > row[-1].batch]
                    done += len(rest)
                    if rest:
                        report("skip", threads=t, batch=rest[0])
                elif kind == "error":
                    error = event
        except BaseException:  # Ctrl-C or a bad measurement: leave no process behind
            _kill_group(proc)
            raise
        code = proc.wait()
        _kill_group(proc)  # a neighbor left behind by a crash
        if error is not None or code != 0:
            raise ProfilerError(_failure_message(job, error, err, code))
    # A smaller limit found by a later row drops the larger points of earlier rows.
    points = [p for p in points if limit is None or p.batch <= limit]
    if len({p.threads for p in points}) != len(settings.threads):
        raise ProfilerError("profiling failed: some thread counts have no measurement; run it "
                            "again with -v to see the worker's log")
    return _Outcome(points, limit, reason)


def _failure_message(job: dict, error: dict | None, err, code: int) -> str:
    """One line: the handler's own error where the worker reported it, else stderr's last."""
    if error is not None:
        stage, message = error.get("stage"), error.get("message", "")
        if job["sample"] is not None:
            if stage == "load":
                return f"the archive's handler {job['handler']!r} failed to load: {message}"
            if stage == "reject":
                return f"the handler rejected the sample: {message}"
        elif stage == "reject":
            return f"the model failed on its built-in example: {message}"
        last = message
    else:
        err.seek(0)
        lines = [ln for ln in err.read().splitlines() if ln.strip()]
        last = lines[-1].strip()[:300] if lines else f"exit code {code}"
    return (f"profiling failed: {last}. Check that the archive loads with its handler "
            f"(`packrat archive` builds known-good ones)")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # all gone already
    proc.wait()


def _check_placement(event: dict, threads: int, cores: tuple[int, ...]) -> None:
    """The worker must have run with t torch threads, all pinned inside its t cores."""
    outside = set(event["affinity"]) - set(cores)
    if event["torch_threads"] != threads or outside:
        raise ProfilerError(
            f"the {threads}-thread measurement ran with {event['torch_threads']} torch threads "
            f"on cpus {event['affinity']} instead of {list(cores)}; something in the model or "
            f"its environment overrides thread settings (OMP_NUM_THREADS, taskset?)"
        )


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")  # without importing torch (seconds)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
