"""The benchmark's models: each archived (zoo), extracted and profiled once, before
TorchServe starts; what the benchmark then plans with, calibrates and counts versions of."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packrat.core.optimizer import Optimizer
from packrat.measure.foreign import (
    ATTEMPTS,
    FOREIGN_LIMIT_CORES,
    ForeignCpu,
    wait_quiet,
)
from packrat.model.sample import Sample
from packrat.serving.prepare import prepare_model as prepare_model_for_serving
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

    @property
    def sample(self) -> Sample:
        return Sample(self.body, "application/json", "the zoo example")


def prepare_model(name: str, out: Path, cores: tuple[int, ...], run: RunDir,
                  say: Callable[[str], None], *, max_batch: int, largest_b: int,
                  quiet_wait_s: float) -> BenchModel:
    """Archive the zoo model into `out` (unless there already), then prepare it as `packrat
    serve` does (packrat.serving.prepare), profiling it again, at most ATTEMPTS times, while
    other processes disturb it. Fails if the profile cannot serve largest_b."""
    from packrat.measure.profiler import profile_archive
    from packrat.model.archive import build_zoo_archive

    out = Path(out)
    mar, example = out / f"{name}.mar", out / f"{name}.example.json"
    if not mar.is_file():
        say(f"{name}: archiving into {out}")
        result = build_zoo_archive(name, out, progress=lambda msg: say(f"{name}: {msg}"))
        mar, example = result.mar_path, result.example_path

    def measure(archive, settings, progress, **kwargs):
        # Not least_disturbed: each attempt overwrites the cached profile, so the last is kept.
        watch = ForeignCpu()
        for attempt in range(1, ATTEMPTS + 1):
            wait_quiet(watch, say, f"profiling {name}", quiet_wait_s)
            watch.start()
            run_ = profile_archive(archive, settings, force=attempt > 1, progress=progress,
                                   **kwargs)
            foreign = watch.cores()
            if run_.cached or foreign <= FOREIGN_LIMIT_CORES:
                break
            say(f"{name}: other processes used {foreign:.2f} cores while profiling"
                + ("; profiling again" if attempt < ATTEMPTS else "; keeping this profile"))
        return run_

    p = prepare_model_for_serving(run, name, mar, cores, max_batch=max_batch,
                                  largest_b=largest_b, say=say, measure=measure, what_b="--batch")
    if not example.is_file():
        example.write_bytes(p.warm.body + b"\n")
    return BenchModel(name, mar, p.base_dir, example.read_bytes(), p.optimizer, p.profile_path,
                      p.optimizer)
