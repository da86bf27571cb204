"""The benchmark's models: each archived (zoo), extracted and profiled once, before
TorchServe starts; what the benchmark then plans with, calibrates and counts versions of."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packrat.core.optimizer import Optimizer
from packrat.errors import PackratError
from packrat.measure.foreign import (
    ATTEMPTS,
    FOREIGN_LIMIT_CORES,
    ForeignCpu,
    wait_quiet,
)
from packrat.serving.rundir import RunDir


@dataclass
class BenchModel:
    name: str
    archive: Path
    base_dir: Path       # the archive extracted: every version is made from it
    body: bytes          # one request
    opt: Optimizer       # what Packrat plans with: the profile, calibrated once TorchServe runs
    profile_path: Path
    raw_opt: Optimizer   # the profile as measured
    calibration: str | None = None  # Calibration.describe(), once calibrated
    next_version: int = 1


def prepare_model(name: str, out: Path, cores: tuple[int, ...], run: RunDir,
                  say: Callable[[str], None], *, max_batch: int, largest_b: int,
                  quiet_wait_s: float) -> BenchModel:
    """Archive the zoo model into `out` (unless there already), extract it into the run
    directory and profile it up to max_batch (cached; profiled again, at most ATTEMPTS times,
    while other processes disturb it). Fails if the profile cannot serve largest_b."""
    from packrat.measure.profiler import (
        ProfileSettings,
        default_threads,
        profile_archive,
    )
    from packrat.model.archive import build_zoo_archive, extract_archive
    from packrat.model.spec import ModelSpec
    from packrat.model.wire import encode_example

    out = Path(out)
    mar, example = out / f"{name}.mar", out / f"{name}.example.json"
    if not mar.is_file():
        say(f"{name}: archiving into {out}")
        result = build_zoo_archive(name, out, progress=lambda msg: say(f"{name}: {msg}"))
        mar, example = result.mar_path, result.example_path
    base = extract_archive(mar, run.path / "archives" / name)
    if not example.is_file():
        example.write_text(json.dumps(encode_example(ModelSpec.load(base))) + "\n")
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

    # Not least_disturbed: each attempt overwrites the cached profile, so the last one is kept.
    watch = ForeignCpu()
    for attempt in range(1, ATTEMPTS + 1):
        wait_quiet(watch, say, f"profiling {name}", quiet_wait_s)
        watch.start()
        profile = profile_archive(mar, settings, force=attempt > 1, progress=progress)
        foreign = watch.cores()
        if profile.cached or foreign <= FOREIGN_LIMIT_CORES:
            break
        say(f"{name}: other processes used {foreign:.2f} cores while profiling"
            + ("; profiling again" if attempt < ATTEMPTS else "; keeping this profile"))
    say(f"{name}: profile {profile.path}")
    opt = Optimizer(profile.profile, len(cores))
    if largest_b > opt.max_servable:
        raise PackratError(f"{name}: B={largest_b} cannot be served on {len(cores)} "
                           f"cores with its profile (at most {opt.max_servable})")
    return BenchModel(name, mar, base, example.read_bytes(), opt, profile.path, opt)
