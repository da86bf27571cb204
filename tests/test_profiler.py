"""The profiler end to end on small-cnn (real subprocesses, pinned), its cache and its rules."""

import csv
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from packrat.model.archive import build_zoo_archive
from packrat.measure.cpus import usable_cores
from packrat.core.profile import read_profile
from packrat.measure.profiler import latency_bound, batch_grid, default_threads
from tests.conftest import require

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    out = tmp_path_factory.mktemp("archives")
    return build_zoo_archive("small-cnn", out).mar_path


def packrat(*args, cache):
    env = dict(os.environ, PACKRAT_CACHE_DIR=str(cache))
    return subprocess.run(
        [sys.executable, "-m", "packrat.cli", *map(str, args)],
        capture_output=True, text=True, env=env,
    )


FAST = ["--max-batch", 4, "--reps", 3, "--min-time", 0.05]


@require(importlib.util.find_spec("matplotlib") is not None, "matplotlib for --plot (pip install -e '.[plot]')")
def test_profile_small_cnn_end_to_end(small_cnn, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "small.csv"
    threads = sorted({1, len(usable_cores())})
    first = packrat("profile", small_cnn, "--threads", ",".join(map(str, threads)), *FAST,
                    "--out", out, "--plot", tmp_path / "p.png", cache=cache)
    assert first.returncode == 0, first.stderr
    assert "measured" in first.stdout and "profiling" in first.stderr  # progress on stderr
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["threads", "batch", "latency_ms"]
    profile = read_profile(out)
    table = profile.table()
    assert sorted(table) == threads
    assert sorted(table[max(threads)]) == [1, 2, 4]  # the largest t is never pruned
    assert all(p.latency_ms > 0 and p.reps >= 3 for p in profile.points)
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    # the cores this process may use (whatever their number) and the torch installed here
    assert meta["cores"] == list(usable_cores())
    assert meta["torch_version"] == importlib.metadata.version("torch")
    assert meta["measured_points"] == len(profile.points)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Same archive and grid: served from the cache, identical.
    second = packrat("profile", small_cnn, "--threads", ",".join(map(str, threads)), *FAST,
                     "--out", tmp_path / "again.csv", cache=cache)
    assert second.returncode == 0 and "cached profile" in second.stdout
    assert read_profile(tmp_path / "again.csv").points == profile.points

    # --force measures again; another grid is another cache entry.
    forced = packrat("profile", small_cnn, "--threads", "1", *FAST, "--force", cache=cache)
    assert forced.returncode == 0 and "measured" in forced.stdout
    other = packrat("profile", small_cnn, "--threads", "1", "--max-batch", 2, "--reps", 3,
                    "--min-time", 0.05, cache=cache)
    assert other.returncode == 0 and "measured" in other.stdout

    # The measured profile plans.
    plan = packrat("plan", "--profile", out, "--cores", len(usable_cores()), "--batch", "1,4",
                   "--json", cache=cache)
    assert plan.returncode == 0, plan.stderr
    assert [r["batch"] for r in json.loads(plan.stdout)] == [1, 4]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--threads", "0"], "outside 1.."),
        (["--threads", "999"], "outside 1.."),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
    ],
)
def test_profile_bad_settings(small_cnn, tmp_path, args, message):
    out = packrat("profile", small_cnn, *args, cache=tmp_path)
    assert out.returncode != 0 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_profile_missing_and_corrupt_archives(tmp_path):
    missing = packrat("profile", tmp_path / "nope.mar", cache=tmp_path)
    assert missing.returncode != 0 and "nope.mar" in missing.stderr
    corrupt = tmp_path / "corrupt.mar"
    corrupt.write_bytes(b"not a zip at all")
    bad = packrat("profile", corrupt, "--threads", "1", *FAST, cache=tmp_path)
    assert bad.returncode != 0 and "corrupt.mar" in bad.stderr
    for out in (missing, bad):
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_pruning_bound_is_the_best_known_plan_for_the_largest_batch():
    # t=2 measured first: one instance serves 4 in 10 ms, or two... only one fits in 2 cores.
    row2 = [(2, 1, 3.0), (2, 2, 5.0), (2, 4, 10.0)]
    assert latency_bound([], 2, 4) is None
    assert latency_bound(row2, 2, 4) == 10.0
    # Adding t=1 points that allow two instances of b=2 at 6 ms lowers the bound to 6 ms, so a
    # 1-thread batch of 4 (slower than 6 ms) can be in no optimal plan for B <= 4.
    row1 = [(1, 1, 3.5), (1, 2, 6.0)]
    assert latency_bound(row2 + row1, 2, 4) == 6.0


def test_grids():
    assert default_threads(4) == (1, 2, 3, 4)
    assert default_threads(64) == (1, 2, 4, 8, 16, 32, 64)
    assert default_threads(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_grid(16) == (1, 2, 4, 8, 16)
    assert batch_grid(12) == (1, 2, 4, 8, 12)
