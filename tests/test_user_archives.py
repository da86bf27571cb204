"""Archives Packrat did not build, served as they are: `packrat serve --sample` on archives made
with torch-model-archiver around user handlers (tests/user_archives.py). Each is profiled
from its sample, served pinned, switched live under closed-loop load with nothing lost, and
answers exactly what plain TorchServe answers for the same archive; the .mar is untouched."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import psutil
import pytest
import yaml

from packrat.measure.loadgen import ClosedLoop
from packrat.model.spec import ENTRY_HANDLER, MANIFEST_FILE, VERSION_CONFIG_FILE
from packrat.serving.rundir import RunDir
from packrat.torchserve import TorchServeClient, load_settings
from tests import user_archives
from tests.conftest import TORCHSERVE, has_torchserve, require_now
from tests.serving import (
    CORES, N_SERVE, assert_pinned, packrat, start_serve, status, stop_serve, wait_answered,
)

pytestmark = pytest.mark.integration

# Outputs that are floats are compared within this; integers exactly.
FLOAT_TOLERANCE = 1e-5
SAMPLES = {"cnn_png": user_archives.png_bytes, "func_json": user_archives.features_json,
           "yaml_text": user_archives.yaml_text}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same(a, b):
    """Equal, with floats within FLOAT_TOLERANCE and every other value exactly."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= FLOAT_TOLERANCE
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@pytest.fixture
def serve_user_archive(tmp_path):
    """Start `packrat serve` on one user archive, profiling it from its sample."""
    require_now(has_torchserve(), TORCHSERVE)
    require_now(len(CORES) >= N_SERVE, f"{N_SERVE} usable cores")
    procs = []

    def start(kind, *extra):
        archive = user_archives.build(kind, tmp_path / "archives")
        run = tmp_path / f"run-{kind}"
        proc = start_serve(run, kind, "--models", f"{kind}={archive.mar}", "--sample",
                           f"{kind}={archive.sample}", "--max-batch", 8, "--no-calibrate",
                           "--interval", 0.5, "--cores", N_SERVE, *extra,
                           log=tmp_path / f"serve-{kind}.log")
        procs.append((proc, run))
        return archive, run

    yield start
    for proc, run in procs:
        stop_serve(proc, run)


@pytest.mark.parametrize("kind", sorted(user_archives.BUILDERS))
def test_user_archive_served_switched_and_answered_as_plain_torchserve(serve_user_archive, kind):
    archive, run = serve_user_archive(kind)
    digest = _sha(archive.mar)
    client = TorchServeClient(load_settings(RunDir(run).torchserve))
    first = status(run)["models"][kind]
    shape = first["plan"]["instances"]  # the plan for B = 1, from the profile measured
    assert_pinned(first, len(shape), shape[0]["threads"])

    # Packrat's entry point wraps the user's handler in the version directory only.
    version_dir = RunDir(run).model_store / f"{kind}-v{first['version']}"
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    assert manifest["model"]["handler"] == ENTRY_HANDLER
    config = yaml.safe_load((version_dir / VERSION_CONFIG_FILE).read_text())
    assert (config["minWorkers"], config["maxWorkers"], config["batchSize"]) == (len(shape),
                                                                             len(shape), 1)

    # The same archive registered plain, without Packrat, in the same TorchServe.
    shutil.copy(archive.mar, RunDir(run).model_store / "plain.mar")
    client.register("plain.mar", model_name="plain", batch_size=1, max_batch_delay_ms=10,
                    initial_workers=1)
    for seed in range(5):
        body = SAMPLES[kind](seed)
        wrapped = client.predict(kind, body, content_type=archive.content_type)
        plain = client.predict("plain", body, content_type=archive.content_type)
        assert wrapped.status_code == plain.status_code == 200, (wrapped.text, plain.text)
        assert _same(wrapped.json(), plain.json()), (wrapped.text, plain.text)

    body = archive.sample.read_bytes()
    load = ClosedLoop(lambda: client.predict(kind, body, timeout_s=60,
                                             content_type=archive.content_type), timeout_s=60)
    load.set_concurrency(4)
    try:
        wait_answered(load, 20)
        for instances, threads, batch in [(2, 1, 2), (1, 2, 4), (2, 1, 1)]:
            out = packrat("reconfigure", "--run-dir", run, "--model", kind, "--instances",
                          instances, "--threads", threads, "--batch", batch)
            assert out.returncode == 0, out.stderr
            now = status(run)["models"][kind]
            assert_pinned(now, instances, threads)
            info = next(v for v in client.versions(kind) if v.version == now["version"])
            # the version's model-config.yaml, not the archive's, sets TorchServe's figures
            assert (info.min_workers, info.max_workers, info.batch_size) == (instances, instances, batch)
            wait_answered(load, load.result.answered + 20)
    finally:
        result = load.stop()
    assert result.failures == [] and result.unanswered == []
    assert _sha(archive.mar) == digest  # the user's archive is untouched

    if kind == "yaml_text":
        # its handler refuses batches above 4: the profile stopped there, and no plan exceeds it
        limit = user_archives.YAML_MAX_BATCH
        out = packrat("reconfigure", "--run-dir", run, "--model", kind, "--instances", 1,
                      "--threads", 2, "--batch", limit * 2)
        assert out.returncode != 0
        kept = yaml.safe_load((RunDir(run).model_store / f"{kind}-v{now['version']}"
                               / VERSION_CONFIG_FILE).read_text())
        assert kept["responseTimeout"] == 77 and kept["handler"]["max_batch"] == limit


# -- bad input: one line each, nothing left running, the user's files untouched ---------------

@pytest.fixture(scope="module")
def user_built(tmp_path_factory):
    out = tmp_path_factory.mktemp("user-archives")
    return {"func_json": user_archives.build("func_json", out),
            "cnn_png": user_archives.build("cnn_png", out),
            "broken": user_archives.build_failing_init(out),
            "nohandler": user_archives.build_no_handler(out)}


def _serve_fails(tmp_path, *args):
    """`packrat serve` with args: (exit code, its stderr's last line); TorchServe never ran."""
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "packrat.cli", "serve", "--run-dir", str(run), "--cores", "1",
         "--no-calibrate", "--max-batch", "2", *map(str, args)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PACKRAT_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode != 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("packrat serve: error: "), out.stderr
    assert not (run / "torchserve" / "server.json").exists()  # no TorchServe was started
    assert not [p for p in psutil.Process().children(recursive=True) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    return last


def test_user_archive_without_sample_says_to_pass_one(tmp_path, user_built):
    a = user_built["func_json"]
    digest = _sha(a.mar)
    last = _serve_fails(tmp_path, "--models", f"m={a.mar}")
    assert "--sample m=FILE" in last and "not built by Packrat" in last
    assert _sha(a.mar) == digest


def test_archive_without_handler(tmp_path, user_built):
    a = user_built["nohandler"]
    last = _serve_fails(tmp_path, "--models", f"m={a.mar}", "--sample", f"m={a.sample}")
    assert "names no handler" in last


def test_sample_flags_checked(tmp_path, user_built):
    a = user_built["func_json"]
    last = _serve_fails(tmp_path, "--models", f"m={a.mar}", "--sample", f"m={tmp_path / 'no.json'}")
    assert "does not exist" in last
    last = _serve_fails(tmp_path, "--models", f"m={a.mar}", "--sample", f"x={a.sample}")
    assert "--sample names models not in --models: x" in last
    last = _serve_fails(tmp_path, "--models", f"m={a.mar}", "--sample-content-type",
                        "m=application/json")
    assert "give --sample m=FILE too" in last


def test_handler_failing_in_initialize(tmp_path, user_built):
    a = user_built["broken"]
    digest = _sha(a.mar)
    last = _serve_fails(tmp_path, "--models", f"m={a.mar}", "--sample", f"m={a.sample}")
    assert "cannot initialize" in last
    assert _sha(a.mar) == digest


def test_sample_the_handler_rejects(tmp_path, user_built):
    png = user_built["cnn_png"].sample
    last = _serve_fails(tmp_path, "--models", f"m={user_built['func_json'].mar}", "--sample",
                        f"m={png}")
    assert "rejected the sample" in last
