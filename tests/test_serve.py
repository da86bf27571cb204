"""`packrat serve` on a real TorchServe (loopback, token auth on) with small-cnn: lossless
switches under load, pinned workers, automatic reconfiguration, stop."""

import json
import subprocess
import sys
import time

import pytest

from packrat.archive import build_zoo_archive
from packrat.cpus import usable_cores
from packrat.loadgen import ClosedLoop
from packrat.rundir import RunDir
from packrat.torchserve import TorchServeClient, load_settings, server_processes

pytestmark = pytest.mark.integration

CORES = usable_cores()
# A profile written for the test, so plans are known: with 2 cores, one 2-thread instance is
# best for B = 1 and two 1-thread instances of batch B/2 for B >= 2.
PROFILE = """threads,batch,latency_ms
1,1,3.5
1,2,7.0
1,4,14.0
1,8,28.0
2,1,2.0
2,2,4.0
2,4,8.0
2,8,16.0
"""


def packrat(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "packrat.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def status(run):
    out = packrat("status", "--run-dir", run, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_for(predicate, timeout=90, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def assert_pinned(model_status, instances, threads):
    plan = model_status["plan"]["instances"]
    assert len(plan) == instances
    seen = set()
    for inst in plan:
        assert inst["pid"], inst
        assert inst["threads"] == threads
        assert inst["cores"] == inst["planned_cores"], inst  # /proc/PID/status Cpus_allowed_list
        assert not seen & set(inst["cores"])  # disjoint
        seen |= set(inst["cores"])
    assert seen <= set(CORES)


@pytest.fixture
def served(tmp_path):
    archives = tmp_path / "archives"
    mar = build_zoo_archive("small-cnn", archives).mar_path
    profile = tmp_path / "small.csv"
    profile.write_text(PROFILE)
    run = tmp_path / "run"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "packrat.cli", "serve", "--run-dir", run, "--models",
         f"small-cnn={mar}", "--profiles", f"small-cnn={profile}", "--interval", "0.5"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: (run / "state.json").is_file() and status(run)["models"]["small-cnn"]["version"],
                 what="packrat serve to register small-cnn")
        yield proc, run, archives / "small-cnn.example.json"
    finally:
        if proc.poll() is None:
            stop = packrat("stop", "--run-dir", run)
            assert stop.returncode == 0, stop.stderr
        proc.wait(timeout=60)
        log.close()
        print((tmp_path / "serve.log").read_text())
        assert server_processes(RunDir(run).torchserve) == []


def load_for(run, example):
    client = TorchServeClient(load_settings(RunDir(run).torchserve))
    body = example.read_bytes()
    return ClosedLoop(lambda: client.predict("small-cnn", body, timeout_s=60), timeout_s=60)


@pytest.mark.skipif(len(CORES) < 2, reason="needs 2 cores")
def test_manual_switches_under_load_lose_nothing(served):
    proc, run, example = served
    first = status(run)["models"]["small-cnn"]
    assert_pinned(first, 1, 2)  # the plan for B = 1
    load = load_for(run, example)
    load.set_concurrency(4)
    plans = [(2, 1, 2), (1, 2, 4), (2, 1, 1), (1, 2, 1)]  # (instances, threads, batch)
    versions = {first["version"]}
    for instances, threads, batch in plans:
        out = packrat("reconfigure", "--run-dir", run, "--model", "small-cnn", "--instances",
                      instances, "--threads", threads, "--batch", batch)
        assert out.returncode == 0, out.stderr
        now = status(run)["models"]["small-cnn"]
        assert now["version"] not in versions and not now["auto"]
        versions.add(now["version"])
        assert_pinned(now, instances, threads)
        assert all(i["batch"] == batch for i in now["plan"]["instances"])
    result = load.stop()
    assert result.failures == [] and result.unanswered == []
    assert result.answered > 100
    final = status(run)["models"]["small-cnn"]
    assert final["reconfigurations"] == len(plans)
    # only the live version is registered: the old ones were deleted once drained
    settings = load_settings(RunDir(run).torchserve)
    assert [v.version for v in TorchServeClient(settings).versions("small-cnn")] == [final["version"]]


def test_reconfigure_errors(served):
    proc, run, example = served
    bad = packrat("reconfigure", "--run-dir", run, "--model", "small-cnn", "--instances", 9,
                  "--threads", 2, "--batch", 1)
    assert bad.returncode != 0 and "need 18 cores" in bad.stderr
    unknown = packrat("reconfigure", "--run-dir", run, "--model", "nope", "--for-batch", 2)
    assert unknown.returncode != 0 and "no model 'nope'" in unknown.stderr
    half = packrat("reconfigure", "--run-dir", run, "--model", "small-cnn", "--threads", 1)
    assert half.returncode != 0 and "together" in half.stderr
    second = packrat("serve", "--run-dir", run, "--models", "x=y.mar")
    assert second.returncode != 0 and "another packrat controller" in second.stderr


@pytest.mark.skipif(len(CORES) < 2, reason="needs 2 cores")
def test_controller_follows_load_from_1_to_8_clients(served):
    proc, run, example = served
    load = load_for(run, example)
    load.set_concurrency(1)
    time.sleep(4)
    one = status(run)["models"]["small-cnn"]
    assert one["estimated_batch"] <= 2 and one["auto"]
    assert_pinned(one, 1, 2)
    load.set_concurrency(8)
    eight = wait_for(lambda: (lambda m: m if len(m["plan"]["instances"]) == 2 else None)(
        status(run)["models"]["small-cnn"]), timeout=120, what="the controller to switch to 2 instances")
    # B is what TorchServe holds at once: 8 with an idle machine; less when the clients, which
    # run on the same 2 cores, are starved. Either way the plan for B >= 2 is two workers.
    assert eight["estimated_batch"] >= 2
    assert_pinned(eight, 2, 1)
    assert eight["reconfigurations"] >= 1
    result = load.stop()
    assert result.failures == [] and result.unanswered == []
