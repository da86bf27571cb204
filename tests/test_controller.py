"""The controller's loop with a fake TorchServe, a fake clock and a thread pool whose calls
finish only when the test says: decisions, the switch state machine, the drain rule and its
timeout, requests, the frontend watchdog, and two models switching at once."""

import math
from concurrent.futures import Executor, Future
from dataclasses import replace
from pathlib import Path

import pytest

from packrat.core.decide import Reason, Reconfigure, SwitchTo
from packrat.core.drain import Drain, observe_drain, start_drain
from packrat.core.optimizer import Optimizer
from packrat.core.policy import manual_plan
from packrat.core.profile import Profile, ProfilePoint
from packrat.errors import PackratError, TorchServeError
from packrat.jsonfile import read_json, write_json
from packrat.model.sample import Sample
from packrat.serving import watchdog as watchdog_module
from packrat.serving import switch as switch_module
from packrat.serving.controller import Controller, ControllerParams, ModelRuntime
from packrat.serving.rundir import RunDir
from packrat.serving.versions import WorkerCheck
from packrat.torchserve import ServerProcess, VersionInfo, WorkerInfo

CORES = (0, 1)
# 2 cores: one 2-thread instance is best for B = 1, two 1-thread instances for B >= 2.
PROFILE = Profile(tuple(ProfilePoint(t, b, ms) for t, b, ms in [
    (1, 1, 3.5), (1, 2, 7.0), (1, 4, 14.0), (1, 8, 28.0),
    (2, 1, 2.0), (2, 2, 4.0), (2, 4, 8.0), (2, 8, 16.0)]))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


class HeldPool(Executor):
    """submit() queues the call; release() runs the queued calls (hold=False: at once)."""

    def __init__(self, hold=False):
        self.hold, self.queue = hold, []

    def submit(self, fn, *args, **kwargs):
        future = Future()
        self.queue.append((future, fn, args, kwargs))
        if not self.hold:
            self.release()
        return future

    def release(self):
        while self.queue:
            future, fn, args, kwargs = self.queue.pop(0)
            try:
                future.set_result(fn(*args, **kwargs))
            except Exception as e:
                future.set_exception(e)


class FakeTorchServe:
    """Versions per model, their pending requests, and Prometheus-like counters that grow
    with a load (mean requests in the system) the test sets per model."""

    def __init__(self, clock):
        self.clock = clock
        self.versions_ = {}        # model -> {version: pending}
        self.default = {}
        self.load = {}             # model -> mean requests in TorchServe
        self.latency_us = {}
        self.last_t = clock()
        self.calls = []
        self.fail_register = None  # an exception to raise on the next register

    def _advance(self):
        dt = self.clock() - self.last_t
        self.last_t = self.clock()
        for m, load in self.load.items():
            self.latency_us[m] = self.latency_us.get(m, 0.0) + load * 1e6 * dt

    def register(self, url, *, model_name, batch_size, max_batch_delay_ms, initial_workers,
                 response_timeout_s=120, wait=True):
        self.calls.append(("register", model_name, url))
        if self.fail_register is not None:
            error, self.fail_register = self.fail_register, None
            raise error
        version = url.rsplit("-v", 1)[1]
        self.versions_.setdefault(model_name, {})[version] = 0
        self.default.setdefault(model_name, version)

    def set_default(self, name, version):
        self.calls.append(("set-default", name, version))
        self.default[name] = version

    def unregister(self, name, version):
        self.calls.append(("unregister", name, version))
        del self.versions_[name][version]

    def versions(self, name):
        return tuple(
            VersionInfo(name, v, self.default.get(name) == v, 1, 10, 1, 1,
                        (WorkerInfo("w", None, "READY"),), pending)
            for v, pending in self.versions_.get(name, {}).items())

    def metrics(self):
        self._advance()
        out = {}
        for m, lat in self.latency_us.items():
            out[("ts_inference_latency_microseconds", m, "default")] = lat
            out[("ts_inference_requests_total", m, "default")] = lat / 1e4
        return out

    def registered(self, name):
        return sorted(self.versions_.get(name, {}))


@pytest.fixture
def world(tmp_path, monkeypatch):
    clock = Clock()
    ts = FakeTorchServe(clock)
    # The version's files and its workers are the integration tests' business: here a
    # version is ready as soon as TorchServe has it.
    monkeypatch.setattr(switch_module, "prepare_version",
                        lambda run, base, name, version, plan, **kw: f"{name}-v{version}")
    monkeypatch.setattr(switch_module, "check_workers",
                        lambda run, client, name, version, plan: WorkerCheck(
                            name, version, plan.instances, plan.instances, plan.instances,
                            version in ts.versions_.get(name, {})))
    monkeypatch.setattr(switch_module, "warm_version", lambda *a, **k: None)
    return clock, ts


def make_controller(tmp_path, clock, ts, pool=None, models=("a",), **params):
    run = RunDir(tmp_path / "run").create()
    c = Controller(run, ts, ControllerParams(**{"interval_s": 1.0, **params}), clock=clock,
                   wall=lambda: 0.0, sleep=clock.sleep, pool=pool or HeldPool())
    for name in models:
        c.models[name] = ModelRuntime(name, Path("/nonexistent"), Optimizer(PROFILE, 2), CORES,
                                      Sample(b"{}", "application/json"))
    return c


def plan(name, version, instances, threads, batch):
    return manual_plan(Optimizer(PROFILE, 2), name, str(version), instances, threads, batch,
                       CORES)


def ticks(c, clock, seconds, step=0.05):
    end = clock() + seconds
    while clock() < end:
        c.tick()
        clock.sleep(step)


def test_rising_load_switches_to_two_instances_and_retires_the_old_version(tmp_path, world):
    clock, ts = world
    c = make_controller(tmp_path, clock, ts)
    assert c.switch_now(c.models["a"], plan("a", 1, 1, 2, 1)).ok
    ts.load["a"] = 1.0
    ticks(c, clock, 5)
    assert c.models["a"].plan.describe() == "1x<t=2,b=1>"  # B = 1: nothing to do
    ts.load["a"] = 8.0
    ticks(c, clock, 10)
    m = c.models["a"]
    assert m.estimator.estimate == 8 and m.plan.describe() == "2x<t=1,b=4>"
    assert m.reconfigurations == 1 and m.last_error is None
    assert ts.registered("a") == [m.plan.version] and ts.default["a"] == m.plan.version
    state = read_json(c.run.state_file)["models"]["a"]
    assert state["version"] == m.plan.version and state["switching"] is None


def test_a_switch_never_blocks_the_loop_and_two_models_switch_at_once(tmp_path, world):
    clock, ts = world
    pool = HeldPool(hold=True)
    c = make_controller(tmp_path, clock, ts, pool=pool, models=("a", "b"))
    c.start_switch(SwitchTo(plan("a", 1, 1, 2, 1), Reason.MANUAL))
    c.start_switch(SwitchTo(plan("b", 1, 1, 2, 1), Reason.MANUAL))
    assert set(c.switches) == {"a", "b"}  # both under way, neither has registered yet
    write_json(c.run.requests / "r1.json", {"model": "b", "auto": True})
    write_json(c.run.requests / "r2.json", {"model": "nope", "auto": True})
    scrapes = []
    real_metrics = ts.metrics
    ts.metrics = lambda: scrapes.append(clock()) or real_metrics()
    ticks(c, clock, 3)  # register of both is held: the loop goes on regardless
    assert len(scrapes) >= 3 and set(c.switches) == {"a", "b"}
    assert read_json(c.run.state_file)["models"]["a"]["switching"].endswith("preparing")
    # a request for a model that is switching waits; another is answered at once
    assert (c.run.requests / "r1.json").exists()
    assert "no model 'nope'" in read_json(c.run.requests / "r2.result.json")["message"]
    for _ in range(10):
        pool.release()
        c.tick()
    assert not c.switches and c.models["a"].plan.version == "1" == c.models["b"].plan.version
    c.tick()
    assert read_json(c.run.requests / "r1.result.json")["ok"] and c.models["b"].auto


def test_after_waits_for_the_other_models_switch(tmp_path, world):
    clock, ts = world
    pool = HeldPool(hold=True)
    c = make_controller(tmp_path, clock, ts, pool=pool, models=("a", "b"))
    c.start_switch(SwitchTo(plan("a", 1, 1, 1, 1), Reason.MANUAL))
    c.start_switch(SwitchTo(plan("b", 1, 1, 1, 1), Reason.MANUAL, after=("a",)))
    assert set(c.switches) == {"a"} and [q.model for q in c.queued] == ["b"]
    while c.switches or c.queued:
        assert ("register", "b", "b-v1") not in ts.calls or "a" not in c.switches
        pool.release()
        c.tick()
    assert c.models["b"].plan is not None
    assert ts.calls.index(("set-default", "a", "1")) < ts.calls.index(("register", "b", "b-v1"))


def test_failed_registration_rolls_back_and_holds_off(tmp_path, world):
    clock, ts = world
    c = make_controller(tmp_path, clock, ts, retry_after_s=30)
    m = c.models["a"]
    assert c.switch_now(m, plan("a", 1, 1, 2, 1)).ok
    ts.fail_register = TorchServeError("POST /models -> 500: boom")
    result = c.switch_now(m, plan("a", 2, 2, 1, 4))
    assert not result.ok and "boom" in result.message and "keeps serving" in result.message
    assert m.plan.version == "1" and ts.registered("a") == ["1"] and "boom" in m.last_error
    assert m.hold_until == pytest.approx(clock() + 30, abs=1)
    ts.load["a"] = 8.0
    ticks(c, clock, 10)
    assert m.plan.version == "1"  # held off
    ticks(c, clock, 25)
    assert m.plan.describe() == "2x<t=1,b=4>" and m.last_error is None


def test_drain_waits_for_the_queue_then_deletes_and_times_out_when_it_never_empties(tmp_path, world):
    clock, ts = world
    c = make_controller(tmp_path, clock, ts, drain_timeout_s=20)
    m = c.models["a"]
    assert c.switch_now(m, plan("a", 1, 1, 2, 1)).ok
    ts.versions_["a"]["1"] = 3  # requests still queued on the old version
    c.start_switch(SwitchTo(plan("a", 2, 2, 1, 1), Reason.MANUAL))
    ticks(c, clock, 5)
    # promoted: the drain goes on beside the loop, and the model may switch again meanwhile
    (draining,) = c.draining
    assert draining.phase.name == "DRAINING" and m.plan.version == "2" and not c.switches
    assert not c.views()[0].switching
    ts.versions_["a"]["1"] = 0
    ticks(c, clock, 2)
    assert not c.draining and ts.registered("a") == ["2"]
    ts.versions_["a"]["2"] = 5  # never drains
    c.start_switch(SwitchTo(plan("a", 3, 1, 2, 1), Reason.MANUAL))
    ticks(c, clock, 19)
    assert [s.model for s in c.draining] == ["a"]
    ticks(c, clock, 2)
    assert not c.draining and ts.registered("a") == ["2", "3"]  # left registered
    assert m.plan.version == "3" and m.last_error is None


def test_drain_rule():
    w = start_drain(0.0, max_batch_delay_ms=10, batch_ms=100, timeout_s=5)
    assert w.empty_needed_s == pytest.approx(0.41) and w.idle_needed_s == pytest.approx(0.12)
    w, v = observe_drain(w, 0.0, pending=0, cpu_s=1.0)
    assert v is Drain.WAIT
    w, v = observe_drain(w, 0.3, pending=0, cpu_s=1.5)  # a batch still runs: CPU grew
    assert v is Drain.WAIT and w.idle_since is None
    w, v = observe_drain(w, 0.35, pending=0, cpu_s=1.5)
    w, v = observe_drain(w, 0.45, pending=0, cpu_s=1.5)
    assert v is Drain.WAIT  # idle only 0.1 s
    w, v = observe_drain(w, 0.5, pending=0, cpu_s=1.5)
    assert v is Drain.DRAINED
    w = start_drain(0.0, 10, 100, timeout_s=5)
    for t in range(6):
        w, v = observe_drain(w, float(t), pending=None, cpu_s=0.0)  # unknown counts as busy
    assert v is Drain.TIMED_OUT
    # an old plan the profile cannot tell (predicted inf) drains like one of a second a batch
    w = start_drain(0.0, 10, math.inf, timeout_s=120)
    assert w.empty_needed_s == pytest.approx(2.21)
    for t in (0.0, 1.0, 2.0, 2.5):
        w, v = observe_drain(w, t, pending=0, cpu_s=1.5)
    assert v is Drain.DRAINED


def test_requests(tmp_path, world):
    clock, ts = world
    c = make_controller(tmp_path, clock, ts)
    assert c.switch_now(c.models["a"], plan("a", 1, 1, 2, 1)).ok

    def ask(rid, body):
        path = c.run.requests / f"{rid}.json"
        path.write_text(body) if isinstance(body, str) else write_json(path, body)
        for _ in range(50):
            c.tick()
            clock.sleep(0.05)
            if (c.run.requests / f"{rid}.result.json").exists():
                return read_json(c.run.requests / f"{rid}.result.json")
        raise AssertionError("no answer")

    assert "not a JSON object" in ask("bad", "{not json")["message"]
    assert "must be an integer" in ask("str", {"model": "a", "for_batch": "2"})["message"]
    assert "together" in ask("half", {"model": "a", "threads": 1})["message"]
    assert "need 18 cores" in ask("big", {"model": "a", "instances": 9, "threads": 2, "batch": 1})["message"]
    beyond = ask("beyond", {"model": "a", "for_batch": 99})
    assert not beyond["ok"] and "the profile serves B = 1..16" in beyond["message"]
    same = ask("same", {"model": "a", "instances": 1, "threads": 2, "batch": 1})
    assert same["ok"] and "already serves" in same["message"] and not c.models["a"].auto
    manual = ask("manual", {"model": "a", "for_batch": 4})
    assert manual["ok"] and manual["plan"]["instances"] == 2 and not c.models["a"].auto
    auto = ask("auto", {"model": "a", "auto": True})
    assert auto["ok"] and c.models["a"].auto
    # after --auto the controller watches the load (window + patience + 1 intervals) first
    assert c.models["a"].hold_until == pytest.approx(clock() + 7, abs=0.5)


def test_frontend_watchdog_restarts_backs_off_and_serves_every_plan_again(tmp_path, world, monkeypatch):
    clock, ts = world
    alive = {"pid": 10}
    monkeypatch.setattr(watchdog_module, "is_running", lambda server: server.frontend_pid == alive["pid"])
    monkeypatch.setattr(watchdog_module, "stop_server", lambda server: None)
    restarts = []

    def restart():
        restarts.append(clock())
        if len(restarts) == 1:
            raise PackratError("port taken")
        alive["pid"] = 11
        ts.versions_.clear()
        ts.default.clear()
        return ServerProcess(11, tmp_path)

    c = make_controller(tmp_path, clock, ts, models=("a", "b"), retry_after_s=30)
    c.server, c.restart_server = ServerProcess(10, tmp_path), restart
    assert c.switch_now(c.models["a"], plan("a", 1, 2, 1, 2), Reason.MANUAL).ok  # held
    assert c.switch_now(c.models["b"], plan("b", 1, 1, 2, 1)).ok  # B = 1's plan
    ticks(c, clock, 2)
    assert restarts == []
    alive["pid"] = None  # the frontend dies
    ticks(c, clock, 1)
    assert len(restarts) == 1 and "could not be restarted: port taken" in c.server_event
    ticks(c, clock, 20)
    assert len(restarts) == 1  # backing off
    ticks(c, clock, 15)
    assert len(restarts) == 2 and c.server.frontend_pid == 11 and c.server_restarts == 1
    assert c.models["a"].plan.describe() == "2x<t=1,b=2>" and c.models["b"].plan.describe() == "1x<t=2,b=1>"
    assert ts.registered("a") == [c.models["a"].plan.version] != ["1"]
    assert c.models["a"].reconfigurations == 0  # a restore is no reconfiguration
    assert "restarted as pid 11" in read_json(c.run.state_file)["torchserve_event"]


def test_a_switch_in_flight_when_torchserve_dies_is_answered_as_failed(tmp_path, world, monkeypatch):
    clock, ts = world
    alive = {"up": True}
    monkeypatch.setattr(watchdog_module, "is_running", lambda server: alive["up"])
    monkeypatch.setattr(watchdog_module, "stop_server", lambda server: None)
    pool = HeldPool(hold=True)
    c = make_controller(tmp_path, clock, ts, pool=pool)
    c.server, c.restart_server = ServerProcess(10, tmp_path), lambda: ServerProcess(10, tmp_path)
    m = c.models["a"]
    m.plan, m.auto = plan("a", 1, 1, 2, 1), False  # serving a manual plan
    write_json(c.run.requests / "r.json", {"model": "a", "instances": 2, "threads": 1, "batch": 1})
    c.tick()
    assert c.switches["a"].plan.instances == 2 and not (c.run.requests / "r.json").exists()
    alive["up"] = False
    c.tick()
    answer = read_json(c.run.requests / "r.result.json")
    assert not answer["ok"] and "TorchServe exited" in answer["message"]


def test_a_reconfigure_request_survives_its_file():
    for r in (Reconfigure("a", auto=True), Reconfigure("a", for_batch=4),
              Reconfigure("a", instances=2, threads=1, batch=4)):
        assert Reconfigure.from_json("id1", r.to_json()) == replace(r, id="id1")
    with pytest.raises(PackratError, match="instances must be an integer"):
        Reconfigure.from_json("x", {"model": "a", "instances": 1.5})


def test_sample_sums_versions_and_survives_their_counters_restarting(tmp_path, world):
    clock, ts = world
    c = make_controller(tmp_path, clock, ts)
    m = c.models["a"]
    key = lambda metric, version: (metric, "a", version)  # noqa: E731
    req, lat = "ts_inference_requests_total", "ts_inference_latency_microseconds"
    c.sample(m, {key(req, "default"): 10, key(lat, "default"): 1e6, key(req, "1"): 5,
                 key(lat, "1"): 5e5, ("ts_inference_requests_total", "b", "default"): 99})
    assert m.totals == (15, 1.5e6)  # both versions of a; model b left out
    clock.sleep(1)
    # version 1 deleted (its series gone), "default" restarted from 0 (TorchServe restarted)
    c.sample(m, {key(req, "default"): 4, key(lat, "default"): 5e5})
    assert m.totals == (19, 2e6)  # a reset counts from 0: only increases are added
    clock.sleep(1)
    c.sample(m, {key(req, "default"): 8, key(lat, "default"): 4.5e6})
    assert m.totals == (23, 6e6)
    assert m.estimator.last.requests == 23 and m.estimator.recent  # the estimator saw them


def test_an_attached_torchserve_is_waited_for_never_restarted_and_served_again(tmp_path, world):
    clock, ts = world
    up = {"ping": True}
    ts.ping = lambda: up["ping"]
    c = make_controller(tmp_path, clock, ts, models=("a", "b"))
    c.attached = True
    c.restart_server = lambda: pytest.fail("an attached TorchServe is never restarted")
    assert c.switch_now(c.models["a"], plan("a", 1, 1, 2, 1), Reason.MANUAL).ok
    assert c.switch_now(c.models["b"], plan("b", 1, 1, 2, 1), Reason.MANUAL).ok
    ticks(c, clock, 2)
    up["ping"] = False  # the user's TorchServe stops answering
    ticks(c, clock, 5)
    event = read_json(c.run.state_file)["torchserve_event"]
    assert "stopped answering" in event and "does not restart" in event
    # it comes back having lost model a's version (the user restarted it without it)
    ts.versions_.pop("a")
    ts.default.pop("a")
    kept_b = ts.registered("b")
    up["ping"] = True
    ticks(c, clock, 3)
    assert ts.registered("a") == [c.models["a"].plan.version] != ["1"]
    assert c.models["a"].plan.describe() == "1x<t=2,b=1>"
    assert ts.registered("b") == kept_b  # b's version was still there: left alone
    assert "answers again" in read_json(c.run.state_file)["torchserve_event"]


def test_a_switch_is_measured_into_the_models_switch_costs(tmp_path, world):
    clock, ts = world
    ts.load["a"] = 2.0  # mean requests in the system: a steady load
    c = make_controller(tmp_path, clock, ts)
    m = c.models["a"]
    assert c.switch_now(m, plan("a", 1, 1, 2, 1), Reason.MANUAL).ok
    ticks(c, clock, 5)
    assert m.stats.cold.count == 0  # the first switch had no traffic before it
    assert c.switch_now(m, plan("a", 2, 2, 1, 1), Reason.MANUAL).ok
    ticks(c, clock, 2)
    assert m.stats.cold.count == 1 and m.stats.warm.count == 0
    assert m.stats.cold.slowdown == pytest.approx(0.0, abs=0.05)  # the fake never slows
    assert m.levels.batch == m.estimator.estimate  # B levels are followed
