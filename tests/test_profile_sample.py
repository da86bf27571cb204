"""Profiling archives Packrat did not build, from one sample request: the whole handler timed
as a TorchServe worker runs it (real, pinned subprocesses through the CLI), a handler's batch
limit, the cache key of the sample, and one-line errors that leave no process behind."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from packrat.core.optimizer import Optimizer
from packrat.core.profile import read_profile
from packrat.measure.cpus import usable_cores
from tests.conftest import require
from tests.user_archives import (
    YAML_MAX_BATCH,
    _archive,
    _archiver,
    build,
    build_failing_init,
    build_no_handler,
    features_json,
)

HAS_ARCHIVER = shutil.which(_archiver()) is not None

pytestmark = [
    pytest.mark.integration,
    require(len(usable_cores()) >= 2, "2 usable cores (the profiles here use --threads 1,2)"),
    require(HAS_ARCHIVER, "torch-model-archiver (pip install torch-model-archiver==0.12.0)"),
    require(importlib.util.find_spec("PIL") is not None, "Pillow for the PNG archive"),
]

FAST = ["--threads", "1,2", "--max-batch", 8, "--reps", 3, "--min-time", 0]


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    out = tmp_path_factory.mktemp("user-archives")
    built = {kind: build(kind, out) for kind in ("cnn_png", "func_json", "yaml_text")}
    built["broken"] = build_failing_init(out)
    built["nohandler"] = build_no_handler(out)
    return built


def leftovers(cache: Path) -> list[psutil.Process]:
    """Processes still running for one CLI run: the test's children, and any process (a
    profile worker orphaned by its parent, a forked measurement) with this test's cache."""
    procs = psutil.Process().children(recursive=True)
    for p in psutil.process_iter():
        try:
            if p.environ().get("PACKRAT_CACHE_DIR") == str(cache):
                procs.append(p)
        except (psutil.Error, OSError):
            pass  # gone, or another user's
    _, alive = psutil.wait_procs(procs, timeout=5)  # a process killed may take a moment
    return alive


def packrat(*args, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PACKRAT_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-m", "packrat.cli", *map(str, args)],
                         check=False, capture_output=True, text=True, env=env,
                         timeout=300)
    assert leftovers(cache) == []
    return out


def assert_one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("packrat profile: error: ") and len(last) < 400, last
    for word in words:
        assert word in last, last


@pytest.mark.parametrize("kind", ["cnn_png", "func_json", "yaml_text"])
def test_user_archive_profiles_from_its_sample(archives, kind, tmp_path):
    a = archives[kind]
    cache, out = tmp_path / "cache", tmp_path / f"{kind}.csv"
    first = packrat("profile", a.mar, "--sample", a.sample, *FAST, "--out", out, cache=cache)
    assert first.returncode == 0, first.stderr
    assert "measured" in first.stdout
    profile = read_profile(out)
    table = profile.table()
    assert sorted(table) == [1, 2]
    if kind == "yaml_text":  # refuses batches above 4: every row stops there, and says so
        assert max(p.batch for p in profile.points) == YAML_MAX_BATCH
        assert sorted(table[2]) == [1, 2, 4]
        assert "b>=8: the handler fails" in first.stderr
        assert f"the profile stops at b={YAML_MAX_BATCH}" in first.stderr
        assert f"batch limit: {YAML_MAX_BATCH}" in first.stdout
        meta = json.loads(out.with_suffix(".meta.json").read_text())
        assert meta["batch_limit"] == YAML_MAX_BATCH
        assert "above this handler's 4" in meta["batch_limit_reason"]
        # Only measured points plan: B = 8 is served by instances of at most 4.
        plan = Optimizer(profile, 2).plan(8)
        assert max(i.batch for i in plan.optimal.instances) <= YAML_MAX_BATCH
    else:
        assert sorted(table[2]) == [1, 2, 4, 8]  # the largest t is never pruned
        assert profile.meta.batch_limit is None and "batch limit" not in first.stdout

    again = packrat("profile", a.mar, "--sample", a.sample, *FAST, "--out", tmp_path / "2.csv",
                    cache=cache)
    assert again.returncode == 0 and "cached profile" in again.stdout
    assert read_profile(tmp_path / "2.csv").points == profile.points
    if kind == "yaml_text":  # the limit is told from the cache too
        assert f"batch limit: {YAML_MAX_BATCH}" in again.stdout


def test_another_sample_is_another_cache_entry(archives, tmp_path):
    a, cache = archives["func_json"], tmp_path / "cache"
    other = tmp_path / "other.json"
    other.write_bytes(features_json(seed=3))
    runs = [packrat("profile", a.mar, "--sample", s, *FAST, cache=cache)
            for s in (a.sample, other, a.sample)]
    assert [r.returncode for r in runs] == [0, 0, 0], runs[-1].stderr
    assert "measured" in runs[0].stdout and "measured" in runs[1].stdout
    assert "cached profile" in runs[2].stdout
    paths = [r.stdout.split("profile: ")[-1].strip() for r in runs]
    assert paths[0] != paths[1] and paths[0] == paths[2]


def test_bad_inputs_are_one_line_errors(archives, tmp_path):
    cache = tmp_path / "cache"
    func, png = archives["func_json"], archives["cnn_png"]
    # A PNG sent to a JSON handler: the handler's own error, at b = 1.
    assert_one_line_error(packrat("profile", func.mar, "--sample", png.sample, *FAST, cache=cache),
                          "the handler rejected the sample", "UnicodeDecodeError")
    broken = archives["broken"]
    assert_one_line_error(
        packrat("profile", broken.mar, "--sample", broken.sample, *FAST, cache=cache),
        "failed to load", "this handler cannot initialize: its weights are missing")
    nohandler = archives["nohandler"]
    assert_one_line_error(
        packrat("profile", nohandler.mar, "--sample", nohandler.sample, *FAST, cache=cache),
        "names no handler")
    assert_one_line_error(packrat("profile", func.mar, *FAST, cache=cache),
                          "was not built by Packrat", "--sample FILE")
    assert_one_line_error(
        packrat("profile", func.mar, "--sample", tmp_path / "nope.json", *FAST, cache=cache),
        "nope.json does not exist")
    assert not list(cache.glob("*.csv"))  # nothing was cached


SLEEPY_HANDLER = '''
import time

import torch
from ts.torch_handler.base_handler import BaseHandler


class Sleepy(BaseHandler):
    """Slow outside the model: only a profile of the whole handler sees it."""

    def initialize(self, context):
        self.initialized = True

    def preprocess(self, data):
        # A handler's print looks like the profiler's events; it must not be taken for one.
        print('{"event": "point", "threads": 99, "batch": 99}', flush=True)
        time.sleep(0.02)
        return torch.ones(len(data), 4)

    def inference(self, data, *args, **kwargs):
        return data.sum(dim=1)

    def postprocess(self, data):
        time.sleep(0.01)
        return [float(v) for v in data]
'''


def test_sample_path_times_the_whole_handler(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "sleepy_handler.py").write_text(textwrap.dedent(SLEEPY_HANDLER))
    (src / "unused.pt").write_bytes(b"")
    mar = _archive(tmp_path, "sleepy", str(src / "sleepy_handler.py"),
                   serialized=src / "unused.pt")
    sample = tmp_path / "sample.txt"
    sample.write_text("anything")
    out = tmp_path / "sleepy.csv"
    run = packrat("profile", mar, "--sample", sample, "--threads", "1,2", "--max-batch", 2,
                  "--reps", 3, "--min-time", 0, "--no-prune", "--out", out, cache=tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    profile = read_profile(out)
    assert {(p.threads, p.batch) for p in profile.points} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    # preprocess and postprocess sleep 30 ms per batch; the model itself takes microseconds
    assert all(p.latency_ms >= 30 for p in profile.points), profile.points


def test_a_handler_that_sets_its_own_threads_fails_the_placement_check(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    handler = SLEEPY_HANDLER.replace("time.sleep(0.02)", "torch.set_num_threads(1)")
    (src / "single_handler.py").write_text(textwrap.dedent(handler))
    (src / "unused.pt").write_bytes(b"")
    mar = _archive(tmp_path, "single", str(src / "single_handler.py"),
                   serialized=src / "unused.pt")
    sample = tmp_path / "sample.txt"
    sample.write_text("anything")
    out = packrat("profile", mar, "--sample", sample, *FAST, cache=tmp_path / "cache")
    assert_one_line_error(out, "the 2-thread measurement ran with 1 torch threads")


def test_zoo_archive_profiles_with_and_without_a_sample(tmp_path):
    cache = tmp_path / "cache"
    built = packrat("archive", "--zoo", "small-cnn", "--out", tmp_path, cache=cache)
    assert built.returncode == 0, built.stderr
    mar, example = tmp_path / "small-cnn.mar", tmp_path / "small-cnn.example.json"
    fast = ["--threads", "1,2", "--max-batch", 4, "--reps", 3, "--min-time", 0]
    synthetic = packrat("profile", mar, *fast, "--out", tmp_path / "synthetic.csv", cache=cache)
    assert synthetic.returncode == 0, synthetic.stderr
    whole = packrat("profile", mar, "--sample", example, *fast, "--out", tmp_path / "whole.csv",
                    cache=cache)
    assert whole.returncode == 0, whole.stderr
    assert "measured" in synthetic.stdout and "measured" in whole.stdout  # two cache entries
    for name in ("synthetic", "whole"):
        assert read_profile(tmp_path / f"{name}.csv").threads == (1, 2)


def _service(tmp_path, entry_point):
    from importlib import resources

    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.service import Service

    metrics = MetricsCacheYamlImpl(str(resources.files("ts") / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    return Service("m", str(tmp_path), None, entry_point, None, 4, True, metrics)


def test_predict_replica_raises_where_torchserve_would_reply_with_an_error(tmp_path):
    from packrat.measure.handler_call import HandlerFailed, predict, wire_batch
    from packrat.model.sample import Sample

    sample = Sample(b'{"x": [1, 2]}', "application/json")
    seen = []

    def echo(data, context):
        seen.append(data)
        return [row["body"]["x"][0] for row in data]

    reply = predict(_service(tmp_path, echo), wire_batch(sample, 3))
    assert len(seen[0]) == 3 and seen[0][0]["body"] == {"x": [1, 2]}  # decoded, as a worker does
    assert isinstance(reply, bytes) and reply  # encoded like the worker's reply

    def refuse(data, context):
        context.set_response_status(400, "bad\ninput", idx=0)
        return ["no"] * len(data)

    failures = {
        "not a list": lambda data, context: {"a": 1},
        "2 responses for a batch of 3": lambda data, context: [1, 2],
        "ValueError: no good": lambda data, context: (_ for _ in ()).throw(ValueError("no\ngood")),
        "answered 400: bad input": refuse,
    }
    for words, entry in failures.items():
        with pytest.raises(HandlerFailed, match=words):
            predict(_service(tmp_path, entry), wire_batch(sample, 3))
