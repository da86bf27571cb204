"""What production does to a server, on a real TorchServe (loopback, token auth on) serving
small-cnn: a worker SIGKILLed under load, the frontend SIGKILLed, management calls that fail
during a switch, the controller killed and started again."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from packrat.core.optimizer import Optimizer
from packrat.core.policy import manual_plan
from packrat.core.profile import read_profile
from packrat.errors import TorchServeError
from packrat.measure.loadgen import ClosedLoop
from packrat.model.spec import WORKER_FILE
from packrat.model.archive import build_zoo_archive, extract_archive
from packrat.model.sample import Sample
from packrat.serving.controller import Controller, ControllerParams, ModelRuntime
from packrat.serving.ops import status as service_status
from packrat.serving.rundir import RunDir
from packrat.torchserve import (
    Ports,
    ServerSettings,
    TorchServeClient,
    find_server,
    load_settings,
    server_processes,
    start_server,
    stop_server,
)
from tests.serving import (
    CORES,
    PROFILE,
    assert_pinned,
    load_for,
    packrat,
    status,
    wait_for,
)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(len(CORES) < 2, reason="needs 2 cores")]


def wait_answered(load, n, timeout=60):
    """Until the load generator has had n answers (its clients are in step)."""
    wait_for(lambda: load.result.answered >= n, timeout=timeout, what=f"{n} answered requests")


def frontends(run):
    return [p for p in server_processes(RunDir(run).torchserve)
            if "org.pytorch.serve.ModelServer" in " ".join(psutil.Process(p).cmdline())]


def test_worker_killed_under_load_is_replaced_on_its_cores(served):
    proc, run, example = served
    out = packrat("reconfigure", "--run-dir", run, "--model", "small-cnn",
                  "--instances", 2, "--threads", 1, "--batch", 2)
    assert out.returncode == 0, out.stderr
    before = status(run)["models"]["small-cnn"]
    assert_pinned(before, 2, 1)
    victim = before["plan"]["instances"][0]
    load = load_for(run, example)
    load.set_concurrency(4)
    wait_answered(load, 20)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()

    def replaced():
        now = status(run)["models"]["small-cnn"]
        pid = now["plan"]["instances"][0]["pid"]
        return now if pid and pid != victim["pid"] else None

    after = wait_for(replaced, timeout=60, what="a new worker in the killed worker's slot")
    print(f"new worker {after['plan']['instances'][0]['pid']} in slot 0 after "
          f"{time.monotonic() - killed_at:.1f} s")
    assert after["version"] == before["version"]
    assert_pinned(after, 2, 1)  # the same cores as the slot it took over, disjoint
    assert after["plan"]["instances"][0]["cores"] == victim["cores"]
    assert after["plan"]["instances"][1]["pid"] == before["plan"]["instances"][1]["pid"]
    wait_answered(load, load.result.answered + 20)  # the pool of two serves again
    result = load.stop()
    print(f"{result.answered} answered, failed: {result.failures}")
    # at most the killed worker's own batch (b = 2) fails; nothing goes unanswered
    assert len(result.failures) <= 2, result.failures
    assert result.unanswered == []
    assert result.answered > 0


def test_frontend_killed_is_restarted_and_serves_the_plan_again(served):
    proc, run, example = served
    before = status(run)
    old_pid = before["torchserve_pid"]
    os.kill(old_pid, signal.SIGKILL)

    def restored():
        now = status(run)
        m = now["models"]["small-cnn"]
        ok = (now["torchserve_pid"] not in (None, old_pid) and now["torchserve_restarts"] == 1
              and m["version"] != before["models"]["small-cnn"]["version"]
              and all(i["pid"] for i in m["plan"]["instances"]))
        return now if ok else None

    after = wait_for(restored, timeout=120, what="the controller to restart TorchServe")
    assert f"pid {old_pid}) exited" in after["torchserve_event"], after["torchserve_event"]
    assert "restarted as pid" in after["torchserve_event"]
    assert_pinned(after["models"]["small-cnn"], 1, 2)  # the same plan as before
    assert len(frontends(run)) == 1
    client = TorchServeClient(load_settings(RunDir(run).torchserve))  # new keys, same ports
    assert client.predict("small-cnn", example.read_bytes()).status_code == 200
    assert proc.poll() is None
    text = packrat("status", "--run-dir", run)
    assert "restarted 1 times" in text.stdout and "exited at" in text.stdout
    assert "restarting it" in (run / "packrat.log").read_text()


def test_killed_controller_is_adopted_without_losing_requests(served, tmp_path):
    proc, run, example = served
    # hold the plan (manual mode survives the restart), so that no switch changes the workers
    out = packrat("reconfigure", "--run-dir", run, "--model", "small-cnn", "--instances", 1,
                  "--threads", 2, "--batch", 1)
    assert out.returncode == 0 and "already serves" in out.stdout + out.stderr, out.stderr
    before = status(run)
    assert before["models"]["small-cnn"]["auto"] is False
    pids_before = sorted(server_processes(RunDir(run).torchserve))
    load = load_for(run, example)
    load.set_concurrency(2)
    proc.kill()  # SIGKILL: no cleanup, TorchServe keeps serving without its controller
    proc.wait(timeout=30)
    wait_answered(load, load.result.answered + 5)  # TorchServe serves without its controller
    mar = run.parent / "archives" / "small-cnn.mar"
    args = [sys.executable, "-m", "packrat.cli", "serve", "--run-dir", run, "--models",
            f"small-cnn={mar}", "--profiles", f"small-cnn={run.parent / 'small.csv'}",
            "--interval", "0.5", "--cores", "2", "--standby-memory", "0"]
    # a controller that fails before adopting (bad input) leaves the live server's files alone
    bad = subprocess.run([*args, "--initial-batch", "100000"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "serves at most B = 16" in bad.stderr, bad.stderr
    version = before["models"]["small-cnn"]["version"]
    assert RunDir(run).version_dir("small-cnn", version).is_dir()
    assert RunDir(run).read_plan("small-cnn", version) is not None
    log = open(tmp_path / "serve2.log", "w")
    again = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "adopted version" in (tmp_path / "serve2.log").read_text(),
                 what="the second controller to adopt the server")
        wait_for(lambda: status(run)["controller_pid"] == again.pid, what="the new controller's state")
        after = status(run)
        assert after["torchserve_pid"] == before["torchserve_pid"]  # no second TorchServe
        assert sorted(server_processes(RunDir(run).torchserve)) == pids_before  # same workers
        assert after["models"]["small-cnn"]["version"] == before["models"]["small-cnn"]["version"]
        assert after["models"]["small-cnn"]["auto"] is False
        versions = TorchServeClient(load_settings(RunDir(run).torchserve)).versions("small-cnn")
        assert [v.version for v in versions] == [before["models"]["small-cnn"]["version"]]
        result = load.stop()
        assert result.failures == [] and result.unanswered == [] and result.answered > 0
    finally:
        load.stop()
        out = packrat("stop", "--run-dir", run)
        log.close()
        print((tmp_path / "serve2.log").read_text())
        assert out.returncode == 0, out.stderr
        again.wait(timeout=60)
    assert server_processes(RunDir(run).torchserve) == []


# -- failing management calls during a switch (in-process controller, real TorchServe) ------

class FaultyClient(TorchServeClient):
    """The real client, with one management call made to fail the way TorchServe can."""

    fault: str = ""
    store = None  # the model store, where the versions' directories are

    def register(self, url, **kw):
        if self.fault == "refused":  # TorchServe refuses it: no such model directory
            return super().register("no-such-model-dir", **kw)
        if self.fault == "load":  # its workers fail to start: their handler does not import
            config = self.store / url / WORKER_FILE
            config.write_text(json.dumps({**json.loads(config.read_text()),
                                          "handler": "no_such_handler_module"}))
        super().register(url, **kw)
        if self.fault == "timeout":  # TorchServe took it, but its answer came too late
            raise TorchServeError("POST /models -> no answer in 300 s (injected)")

    def set_default(self, name, version):
        if self.fault == "500":
            raise TorchServeError(f"PUT /models/{name}/{version}/set-default -> 500: "
                                  "Internal Server Error (injected)")
        return super().set_default(name, version)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    run = RunDir(tmp / "run").create()
    mar = build_zoo_archive("small-cnn", tmp / "archives").mar_path
    (tmp / "p.csv").write_text(PROFILE)
    settings = ServerSettings(workdir=run.torchserve, model_store=run.model_store,
                              ports=Ports.free())
    server = start_server(settings)
    try:
        client = FaultyClient(load_settings(run.torchserve))
        client.store = run.model_store
        controller = Controller(run, client, ControllerParams(interval_s=0.5))
        base = extract_archive(mar, run.path / "archives" / "small-cnn")
        body = (tmp / "archives" / "small-cnn.example.json").read_bytes()
        m = ModelRuntime(name="small-cnn", base_dir=base, cores=tuple(CORES[:2]),
                         optimizer=Optimizer(read_profile(tmp / "p.csv"), 2), warm=Sample(body, "application/json"))
        controller.models[m.name] = m
        first = manual_plan(m.optimizer, m.name, "1", 2, 1, 1, m.cores)
        assert controller.switch_now(m, first).ok
        yield controller, m, body
    finally:
        stop_server(server)
        assert find_server(run.torchserve) is None


@pytest.mark.parametrize("fault", ["refused", "load", "timeout", "500"])
def test_failed_switch_rolls_back_and_loses_nothing(live, fault):
    controller, m, body = live
    client = controller.client
    old = m.plan
    load = ClosedLoop(lambda: client.predict(m.name, body, timeout_s=60), timeout_s=60)
    load.set_concurrency(3)
    wait_answered(load, 10)
    client.fault = fault
    try:
        target = manual_plan(m.optimizer, m.name, str(m.next_version), 1, 2, 2, m.cores)
        result = controller.switch_now(m, target)
    finally:
        client.fault = ""
    wait_answered(load, load.result.answered + 10)  # the old version still serves
    answered = load.stop()
    print(f"{fault}: {result.message}; {answered.answered} requests answered meanwhile")
    assert not result.ok
    assert f"version {old.version} ({old.describe()}) keeps serving" in result.message
    if fault == "load":  # the worker's own reason, not a timeout
        assert "a worker failed to start" in result.message
        assert "no_such_handler_module" in result.message
    assert m.plan == old and m.last_error == result.message
    # the failed version is gone from TorchServe and from the run directory; the old serves
    wait_for(lambda: [v.version for v in client.versions(m.name)] == [old.version],
             timeout=60, what="the failed version to be deleted")
    assert not controller.run.version_dir(m.name, target.version).exists()
    assert controller.run.read_plan(m.name, target.version) is None
    assert answered.failures == [] and answered.unanswered == [] and answered.answered > 0
    controller.save_state()
    reported = service_status(controller.run.path).models[m.name]
    assert reported.last_error == result.message and reported.version == old.version
    m.hold_until = 0.0
    # and the next switch works
    again = manual_plan(m.optimizer, m.name, str(m.next_version), 1, 2, 1, m.cores)
    assert controller.switch_now(m, again).ok, m.last_error
    back = manual_plan(m.optimizer, m.name, str(m.next_version), 2, 1, 1, m.cores)
    assert controller.switch_now(m, back).ok, m.last_error
    assert json.loads(controller.run.state_file.read_text())["models"][m.name]["last_error"] is None
