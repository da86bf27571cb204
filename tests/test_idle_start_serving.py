"""A version loaded ahead of need on a real TorchServe 0.12: its worker starts at idle CPU
priority (TorchServe puts the version directory, with Packrat's sitecustomize.py, on the
worker's PYTHONPATH), stays idle through its warm-up, and serves real requests at normal
priority. Where this process may not raise a priority back, it starts at normal priority."""

import os

import pytest

from packrat.core.plan import ServedPlan
from packrat.model.archive import build_zoo_archive, extract_archive
from packrat.model.sample import Sample
from packrat.serving.rundir import RunDir
from packrat.serving.versions import check_workers, prepare_version, warm_version
from packrat.torchserve import (
    Ports, ServerSettings, TorchServeClient, server_processes, start_server, stop_server,
)
from packrat.worker.priority import may_raise_back
from tests.conftest import TORCHSERVE, has_torchserve, require_now
from tests.serving import CORES, wait_for

pytestmark = pytest.mark.integration

MODEL = "small-cnn"


def _policies(pid: int) -> set[int]:
    """The scheduling policy of every thread of a process."""
    return {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def test_a_version_loaded_ahead_of_need_starts_idle_and_serves_at_normal_priority(tmp_path):
    require_now(has_torchserve(), TORCHSERVE)
    run = RunDir(tmp_path / "run").create()
    archive = build_zoo_archive(MODEL, tmp_path / "archives")
    base = extract_archive(archive.mar_path, run.path / "archives" / MODEL)
    sample = Sample(archive.example_path.read_bytes(), "application/json")
    settings = ServerSettings(workdir=run.torchserve, model_store=run.model_store,
                              ports=Ports.free())
    plan = ServedPlan(MODEL, "1", 1, 1, 1, ((CORES[-1],),), 1.0, 1)
    proc = start_server(settings)
    try:
        client = TorchServeClient(settings)
        url = prepare_version(run, base, MODEL, "1", plan, max_batch_delay_ms=10,
                              background=True)
        client.register(url, model_name=MODEL, batch_size=1, max_batch_delay_ms=10,
                        initial_workers=1)
        wait_for(lambda: check_workers(run, client, MODEL, "1", plan).ready,
                 what="the background version's worker")
        (pid,) = run.slot_pids(MODEL, "1").values()
        started = os.SCHED_IDLE if may_raise_back() else os.SCHED_OTHER
        assert os.sched_getscheduler(pid) == started  # its main thread, from Python's start
        warm_version(client, MODEL, "1", 1, sample)
        assert os.sched_getscheduler(pid) == started  # warm-ups do not raise it
        r = client.predict(MODEL, sample.body, content_type=sample.content_type)
        assert r.status_code == 200, r.text
        assert _policies(pid) == {os.SCHED_OTHER}  # every thread, after a real request
    finally:
        stop_server(proc)
    assert server_processes(settings.workdir) == []
