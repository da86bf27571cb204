"""Warm standby on a real TorchServe (small-cnn, `packrat serve --cores 2`): a switch back to
a plan whose old version was kept is a set-default, under load with nothing lost; standby
workers stay pinned and idle; a killed standby worker is replaced by TorchServe without
touching the live plan; a budget that holds one version evicts the older; stop leaves no
process."""


import psutil
import pytest

from packrat.core.decide import Reconfigure
from packrat.model.archive import build_zoo_archive
from packrat.serving.ops import reconfigure
from packrat.serving.rundir import RunDir
from tests.conftest import TORCHSERVE, has_torchserve, require_now
from tests.serving import (
    CORES, N_SERVE, PROFILE, assert_pinned, load_for, start_serve, status, stop_serve, wait_answered, wait_for,
)

pytestmark = pytest.mark.integration

# Once drained, a standby version's workers may use this much CPU over the idle window
# (TorchServe's own worker threads and the metrics look wake up now and then).
IDLE_CPU_S = 0.5


def _serve(tmp_path, budget_mb):
    require_now(has_torchserve(), TORCHSERVE)
    require_now(len(CORES) >= N_SERVE, f"{N_SERVE} usable cores")
    mar = build_zoo_archive("small-cnn", tmp_path / "archives").mar_path
    profile = tmp_path / "small.csv"
    profile.write_text(PROFILE)
    run = tmp_path / "run"
    proc = start_serve(run, "small-cnn", "--models", f"small-cnn={mar}", "--profiles",
                       f"small-cnn={profile}", "--interval", "0.5", "--cores", N_SERVE,
                       "--standby-memory", budget_mb, log=tmp_path / "serve.log", timeout=90)
    return proc, run, tmp_path / "archives" / "small-cnn.example.json"


def _stop(proc, run):
    stop_serve(proc, run)
    left = [p for p in psutil.process_iter(["cmdline"])
            if any(str(run) in part for part in (p.info["cmdline"] or []))]
    assert left == [], left  # no frontend, no worker, standby or not


def _switch(run, instances, threads, batch):
    answer = reconfigure(run, Reconfigure("small-cnn", instances=instances, threads=threads,
                                          batch=batch))
    assert answer.ok, answer.message
    return answer


def _cpu_seconds(pids):
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def test_switching_back_is_warm_lossless_pinned_and_standby_idles(tmp_path):
    proc, run, example = _serve(tmp_path, 8000)
    try:
        first = status(run)["models"]["small-cnn"]
        assert_pinned(first, 1, 2)
        _switch(run, 1, 2, 1)  # manual: the controller must not switch by itself now
        load = load_for(run, example)
        load.set_concurrency(4)
        try:
            wait_answered(load, 20)
            cold = _switch(run, 2, 1, 2)
            assert "from standby" not in cold.message
            now = status(run)["models"]["small-cnn"]
            assert_pinned(now, 2, 1)
            standby = now["standby"]
            assert [s["version"] for s in standby] == [first["version"]]
            assert standby[0]["memory_mb"] > 0
            # the standby version's workers hold their slots, on their cores, and idle
            pids = RunDir(run).slot_pids("small-cnn", first["version"])
            assert len(pids) == 1
            before = _cpu_seconds(pids.values())
            wait_answered(load, load.result.answered + 40)
            assert _cpu_seconds(pids.values()) - before < IDLE_CPU_S
            # a killed standby worker is replaced; the live plan is untouched
            live_pids = {i["pid"] for i in now["plan"]["instances"]}
            psutil.Process(next(iter(pids.values()))).kill()
            wait_for(lambda: set(RunDir(run).slot_pids("small-cnn", first["version"]).values())
                     - set(pids.values()), timeout=120, what="TorchServe to restart the worker")
            assert {i["pid"] for i in status(run)["models"]["small-cnn"]["plan"]["instances"]} == live_pids
            wait_answered(load, load.result.answered + 20)
            warm = _switch(run, 1, 2, 1)  # back: the kept version becomes the default
            assert "from standby" in warm.message
            back = status(run)["models"]["small-cnn"]
            assert back["version"] == first["version"]
            assert_pinned(back, 1, 2)
            assert [s["plan"] for s in back["standby"]] == ["2x<t=1,b=2>"]
            wait_answered(load, load.result.answered + 20)
            print(f"\ncold switch {cold.seconds:.2f} s, warm switch {warm.seconds:.2f} s")
        finally:
            result = load.stop()
        assert result.failures == [] and result.unanswered == []
    finally:
        _stop(proc, run)


def test_a_budget_for_one_version_evicts_the_older(tmp_path):
    proc, run, example = _serve(tmp_path, 8000)
    try:
        _switch(run, 1, 2, 1)
        _switch(run, 2, 1, 1)
        one_worker = status(run)["models"]["small-cnn"]["standby"][0]["memory_mb"]
        _switch(run, 1, 2, 1)  # back, warm: the 2-worker version is in standby now
        two_workers = status(run)["models"]["small-cnn"]["standby"][0]["memory_mb"]
    finally:
        _stop(proc, run)
    # again, with room for either version but not both (half a version of margin each way)
    budget = max(one_worker, two_workers) + 0.5 * min(one_worker, two_workers)
    proc, run2, example = _serve(tmp_path / "second", round(budget))
    try:
        _switch(run2, 1, 2, 1)
        _switch(run2, 2, 1, 1)  # 1x<t=2,b=1> into standby
        _switch(run2, 2, 1, 2)  # 2x<t=1,b=1> into standby: the older is evicted first
        standby = status(run2)["models"]["small-cnn"]["standby"]
        assert [s["plan"] for s in standby] == ["2x<t=1,b=1>"], (standby, budget)
        assert sum(s["memory_mb"] for s in standby) <= budget
        # the evicted version is unregistered (in the background): the live one and one standby
        wait_for(lambda: len(RunDir(run2).client().versions("small-cnn")) == 2, timeout=60,
                 what="the evicted version to be unregistered")
    finally:
        _stop(proc, run2)
