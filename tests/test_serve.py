"""`packrat serve --cores 2` on a real TorchServe (loopback, token auth on) with small-cnn:
lossless switches under load, pinned workers, automatic reconfiguration, stop. The `served`
fixture (conftest.py) needs Java, torchserve and 2 usable cores."""

import pytest

from packrat.serving.rundir import RunDir
from packrat.torchserve import TorchServeClient, load_settings
from tests.serving import (
    N_SERVE, PROFILE_MAX_BATCH, assert_pinned, load_for, packrat, status, wait_answered, wait_for,
)

pytestmark = pytest.mark.integration


def test_manual_switches_under_load_lose_nothing(served):
    proc, run, example = served
    first = status(run)["models"]["small-cnn"]
    assert_pinned(first, 1, 2)  # the plan for B = 1
    # manual mode first: the controller must not switch by itself under the load below
    held = packrat("reconfigure", "--run-dir", run, "--model", "small-cnn", "--instances", 1,
                   "--threads", 2, "--batch", 1)
    assert held.returncode == 0 and "already serves" in held.stdout + held.stderr, held.stderr
    load = load_for(run, example)
    load.set_concurrency(4)
    wait_answered(load, 20)  # the load is on before the first switch
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
        # the new version serves under the load before the next switch
        wait_answered(load, load.result.answered + 20)
    result = load.stop()
    assert result.failures == [] and result.unanswered == []
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
    # the largest batch: N_SERVE one-thread instances of the profile's largest batch each
    most = N_SERVE * PROFILE_MAX_BATCH
    beyond = packrat("reconfigure", "--run-dir", run, "--model", "small-cnn", "--for-batch", most + 1)
    assert beyond.returncode != 0 and f"the profile serves B = 1..{most}" in beyond.stderr
    half = packrat("reconfigure", "--run-dir", run, "--model", "small-cnn", "--threads", 1)
    assert half.returncode != 0 and "together" in half.stderr
    second = packrat("serve", "--run-dir", run, "--models", "x=y.mar")
    assert second.returncode != 0 and "another packrat controller" in second.stderr


def test_controller_follows_load_from_1_to_8_clients(served):
    proc, run, example = served
    load = load_for(run, example)
    load.set_concurrency(1)
    # One client for a while: small-cnn answers in a few ms, so 300 answers span several
    # controller intervals (0.5 s) of metrics, all with one request in flight.
    wait_answered(load, 300)
    one = status(run)["models"]["small-cnn"]
    assert one["estimated_batch"] <= 2 and one["auto"]
    assert_pinned(one, 1, 2)  # still the plan for B = 1: one client is no reason to switch
    assert one["reconfigurations"] == 0
    load.set_concurrency(8)
    # (the cost rule waits until B has held long enough to repay a cold switch: on a busy
    # machine B wavered between 6 and 9 and the switch came only after about 120 s)
    eight = wait_for(lambda: (lambda m: m if len(m["plan"]["instances"]) == 2 else None)(
        status(run)["models"]["small-cnn"]), timeout=300, what="the controller to switch to 2 instances")
    # B is what TorchServe holds at once: 7 or 8 with an idle machine; less when the clients,
    # which run on the same 2 cores, are starved. The plan for B >= 2 is two workers, and the
    # profile makes the switch pay at every such B but 3 and 5 (tests/serving.py).
    assert eight["estimated_batch"] >= 2
    assert_pinned(eight, 2, 1)
    assert eight["reconfigurations"] >= 1
    result = load.stop()
    assert result.failures == [] and result.unanswered == []
