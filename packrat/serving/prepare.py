"""Getting a model ready to serve, before TorchServe starts: its archive extracted into the run
directory, its profile measured (cached) or read, the optimizer for the cores it gets, and a
valid request to warm new versions with: the user's sample, or for an archive Packrat built
its built-in example. `packrat serve` and `packrat bench` both use it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packrat.core.optimizer import Optimizer
from packrat.core.profile import read_profile
from packrat.errors import PackratError
from packrat.measure.profiler import (
    ProfileRun,
    ProfileSettings,
    default_threads,
    profile_archive,
)
from packrat.model.sample import Sample
from packrat.serving.rundir import RunDir, check_model_name

# Measures an archive: (archive, settings, progress=...) -> ProfileRun. The profiler's
# profile_archive, or a wrapper that repeats it while other processes disturb it (bench).
Measure = Callable[..., ProfileRun]


@dataclass(frozen=True)
class PreparedModel:
    name: str
    archive: Path
    base_dir: Path                # the archive extracted: every version is made from it
    optimizer: Optimizer
    profile_path: Path | None     # a profile Packrat measured (so it may calibrate it)
    warm: Sample                  # one valid request


def prepare_model(run: RunDir, name: str, archive: Path, cores: tuple[int, ...], *,
                  max_batch: int, largest_b: int, say: Callable[[str], None],
                  profile_csv: Path | None = None, measure: Measure | None = None,
                  what_b: str = "B", sample: Sample | None = None,
                  envelope: str | None = None) -> PreparedModel:
    """profile_csv: a profile to use as given instead of measuring (an archive Packrat built
    is loaded once here then, as the profiler would have, so bad weights fail now and not as
    TorchServe's "Failed to start workers"). largest_b: the largest B the profile must serve
    (what_b names it in the error). sample: one request as a client sends it; required for an
    archive Packrat did not build, which is profiled and warmed with it. envelope: the
    TorchServe service_envelope requests pass through."""
    from packrat.model.archive import extract_archive
    from packrat.model.spec import SPEC_FILE, ModelSpec
    from packrat.model.wire import encode_example

    name = check_model_name(name)
    archive = Path(archive)
    if not archive.exists():
        raise PackratError(f"model {name}: archive {archive} does not exist")
    base = extract_archive(archive, run.path / "archives" / name)
    ours = (base / SPEC_FILE).is_file()
    if sample is None and not ours:
        raise PackratError(f"model {name}: {archive} was not built by Packrat and has no "
                           f"built-in example; pass --sample {name}=FILE, one request body "
                           "as a client sends it (an image, a text, a JSON file)")
    if profile_csv is not None:
        profile, measured = read_profile(profile_csv), None
        say(f"{name}: profile {profile_csv}")
        if ours:
            _check_loads(name, archive, base)
    else:
        settings = ProfileSettings(threads=default_threads(len(cores)), max_batch=max_batch)
        result = (measure or profile_archive)(archive, settings, progress=_progress(name, say),
                                              sample=sample, envelope=envelope)
        profile, measured = result.profile, result.path
        say(f"{name}: profile {result.path}")
        if result.batch_limit is not None:
            say(f"{name}: the handler takes batches of at most {result.batch_limit} "
                f"({result.batch_limit_reason}); plans stay within it")
    opt = Optimizer(profile, len(cores))
    if largest_b > opt.max_servable:
        raise PackratError(f"{what_b} {largest_b}: the profile of {name} serves at most "
                           f"B = {opt.max_servable} on {len(cores)} cores")
    if sample is None:
        body = json.dumps(encode_example(ModelSpec.load(base))).encode()
        sample = Sample(body, "application/json", "the built-in example")
    return PreparedModel(name, archive, base, opt, measured, sample)


def _check_loads(name: str, archive: Path, base: Path) -> None:
    from packrat.model.loader import load_model

    try:
        load_model(base)
    except PackratError:
        raise
    except Exception as e:
        raise PackratError(f"model {name}: {archive} does not load ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:300]})") from None


def _progress(name: str, say: Callable[[str], None], every_s: float = 5.0):
    """A progress callback for the profiler: a line every few seconds and at the end."""
    last = [0.0]

    def progress(ev) -> None:
        now = time.monotonic()
        if ev.kind == "cached":
            say(f"{name}: profile cached ({ev.total} points)")
        elif ev.kind == "limit":
            say(f"{name}: b={ev.batch} fails in the handler; profiling stops at b={ev.limit}")
        elif ev.kind == "point" and (now - last[0] > every_s or ev.done == ev.total):
            last[0] = now
            say(f"{name}: profiling {ev.done}/{ev.total} t={ev.threads} b={ev.batch} "
                f"{ev.latency_ms:.1f} ms ({ev.elapsed_s:.0f} s)")

    return progress
