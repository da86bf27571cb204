"""Warm standby, pure: the set of old versions kept loaded within one memory budget, least
recently used evicted first (packrat.core.standby); and the controller switching back to a
standby version without registering anything (fake TorchServe, fake clock)."""

import json

import pytest

from packrat.core.decide import Reason, SwitchTo
from packrat.core.plan import ServedPlan, slots_for
from packrat.core.policy import plan_for_batch
from packrat.core.standby import (
    StandbyEntry,
    StandbySet,
    admit,
    make_room,
    off_cores,
    shape_of,
)
from packrat.serving import standby as standby_module
from packrat.serving import switch as switch_module
from tests.test_controller import CORES, HeldPool, make_controller, plan, ticks, world  # noqa: F401


def entry(model, version, instances, threads, batch, mb, used, cores=(0, 1)):
    p = ServedPlan(model, str(version), threads, instances, batch,
                   slots_for(threads, instances, cores), 1.0, instances * batch)
    return StandbyEntry(p, mb, used)


def test_make_room_evicts_least_recently_used_until_the_newcomer_fits():
    a, b, c = entry("m", 1, 1, 2, 1, 300, 10.0), entry("m", 2, 2, 1, 2, 300, 5.0), entry("n", 3, 1, 2, 4, 300, 20.0)
    s = StandbySet((a, b, c))
    kept, evicted = make_room(s, budget_mb=1000, need_mb=100)
    assert evicted == () and kept.memory_mb == 900
    kept, evicted = make_room(s, budget_mb=1000, need_mb=400)
    assert evicted == (b,) and set(kept.entries) == {a, c}  # b was used longest ago
    kept, evicted = make_room(s, budget_mb=1000, need_mb=2000)
    assert kept.entries == () and len(evicted) == 3  # the newcomer cannot fit at all
    assert admit(kept, entry("m", 4, 1, 2, 1, 2000, 30.0), 1000) is None
    grown = admit(StandbySet((a,)), c, 600)
    assert grown is not None and grown.memory_mb == 600 and admit(grown, b, 600) is None


def test_find_matches_shape_and_slots_and_off_cores_evicts():
    a = entry("m", 1, 2, 1, 2, 100, 1.0, cores=(0, 1))
    s = StandbySet((a,))
    assert s.find("m", (2, 1, 2), (0, 1)) == a
    assert s.find("m", (2, 1, 4), (0, 1)) is None  # another batch size
    assert s.find("n", (2, 1, 2), (0, 1)) is None  # another model
    assert s.find("m", (2, 1, 2), (2, 3)) is None  # pinned elsewhere
    kept, gone = off_cores(s, "m", (2, 3))
    assert gone == (a,) and kept.entries == ()
    assert off_cores(s, "m", (0, 1)) == (s, ())
    assert shape_of(a.plan) == (2, 1, 2)


@pytest.fixture
def memory(monkeypatch):
    """Every version's workers take `mb` MB of PSS (the fake TorchServe has no processes)."""
    mb = {"each": 100.0}
    monkeypatch.setattr(standby_module, "pss_mb", lambda pids: mb["each"])
    monkeypatch.setattr(standby_module.RunDir, "slot_pids", lambda self, m, v: {0: 1})
    return mb


def test_switching_back_to_a_standby_plan_registers_nothing(tmp_path, world, memory):  # noqa: F811
    clock, ts = world
    c = make_controller(tmp_path, clock, ts, standby_memory_mb=250)
    m = c.models["a"]
    assert c.switch_now(m, plan("a", 1, 1, 2, 1), Reason.MANUAL).ok
    assert c.switch_now(m, plan("a", 2, 2, 1, 1), Reason.MANUAL).ok  # cold; v1 parked
    assert ts.registered("a") == ["1", "2"]
    assert [e.plan.version for e in c.standby.set.entries] == ["1"]
    registers = len([x for x in ts.calls if x[0] == "register"])
    result = c.switch_now(m, plan("a", 3, 1, 2, 1), Reason.MANUAL)  # back to v1's plan
    assert result.ok and "from standby" in result.message
    assert m.plan.version == "1" and ts.default["a"] == "1"
    assert len([x for x in ts.calls if x[0] == "register"]) == registers  # nothing new
    assert [e.plan.version for e in c.standby.set.entries] == ["2"]  # v2 parked instead
    logged = [json.loads(line) for line in c.run.switch_log.read_text().splitlines()]
    assert [(x["version"], x["warm"]) for x in logged] == [("1", False), ("2", False), ("1", True)]
    # a third plan: v2 stays (250 MB hold two versions), a fourth evicts the oldest first
    assert c.switch_now(m, plan("a", 4, 2, 1, 2), Reason.MANUAL).ok
    assert sorted(e.plan.version for e in c.standby.set.entries) == ["1", "2"]
    clock.sleep(1)
    assert c.switch_now(m, plan("a", 5, 1, 2, 4), Reason.MANUAL).ok
    ticks(c, clock, 1)  # the eviction and deletions run in the background
    assert sorted(e.plan.version for e in c.standby.set.entries) == ["1", "4"]
    assert ("unregister", "a", "2") in ts.calls  # the least recently used went
    assert c.standby.set.memory_mb <= 250
    assert sorted(ts.registered("a")) == ["1", "4", "5"]


def test_no_budget_deletes_old_versions_as_before(tmp_path, world, memory):  # noqa: F811
    clock, ts = world
    c = make_controller(tmp_path, clock, ts)  # standby_memory_mb = 0
    m = c.models["a"]
    assert c.switch_now(m, plan("a", 1, 1, 2, 1), Reason.MANUAL).ok
    assert c.switch_now(m, plan("a", 2, 2, 1, 1), Reason.MANUAL).ok
    assert ts.registered("a") == ["2"] and c.standby.set.entries == ()
    memory["each"] = 500  # a version larger than the whole budget is never kept
    c2 = make_controller(tmp_path / "2", clock, ts, models=("b",), standby_memory_mb=250)
    assert c2.switch_now(c2.models["b"], plan("b", 1, 1, 2, 1), Reason.MANUAL).ok
    assert c2.switch_now(c2.models["b"], plan("b", 2, 2, 1, 1), Reason.MANUAL).ok
    assert ts.registered("b") == ["2"] and c2.standby.set.entries == ()


def test_a_settled_model_gets_the_next_plan_loaded_ahead_of_need(tmp_path, world, memory,  # noqa: F811
                                                                monkeypatch):
    clock, ts = world
    background = {}  # version: prepared to load at idle priority?

    def prepare(run, base, name, version, plan, **kw):
        background[version] = kw["background"]
        return f"{name}-v{version}"

    monkeypatch.setattr(switch_module, "prepare_version", prepare)
    ts.load["a"] = 0.4  # B = 1, and the live plan's one worker busy 40% of the time
    c = make_controller(tmp_path, clock, ts, standby_memory_mb=1000)
    m = c.models["a"]
    assert c.switch_now(m, plan_for_batch(m.optimizer, "a", "1", 1, CORES)).ok  # B = 1's
    live = m.plan.version
    ticks(c, clock, 30)  # settled: the plan for B = 2 is loaded, not served
    assert m.plan.version == live and ts.default["a"] == live
    warm = {e.plan.describe() for e in c.standby.set.entries}
    assert warm, "nothing was loaded ahead of need"
    logged = [json.loads(line) for line in c.run.switch_log.read_text().splitlines()]
    assert any(x["reason"] == "prewarm" and x["ok"] for x in logged)
    # loaded ahead of need at idle priority; the live plan at normal priority
    assert {x["version"]: background[x["version"]] for x in logged} == {
        x["version"]: x["reason"] == "prewarm" for x in logged}
    registers = len([x for x in ts.calls if x[0] == "register"])
    ts.load["a"] = 2.0  # the load doubles: B = 2, whose plan was loaded ahead
    ticks(c, clock, 40)
    assert m.plan.describe() in warm
    switched = [x for x in json.loads("[" + ",".join(c.run.switch_log.read_text().splitlines()) + "]")
                if x["reason"] == "auto" and x["version"] != live]
    assert switched and switched[0]["warm"], switched  # the change found its plan warm
    assert len([x for x in ts.calls if x[0] == "register"]) >= registers


def test_the_estimator_is_quicker_to_adopt_a_b_whose_plan_is_warm(tmp_path, world, memory):  # noqa: F811
    clock, ts = world
    c = make_controller(tmp_path, clock, ts, standby_memory_mb=1000)
    m = c.models["a"]
    assert c.switch_now(m, plan_for_batch(m.optimizer, "a", "1", 1, CORES)).ok
    assert c.switch_now(m, plan_for_batch(m.optimizer, "a", "2", 2, CORES), Reason.MANUAL).ok
    assert c.switch_now(m, plan_for_batch(m.optimizer, "a", "3", 1, CORES), Reason.MANUAL).ok
    base = c.params.estimator
    # B = 2's plan is in standby (v2), B = 8's is not
    warm = c.standby.estimator_params("a", m.optimizer, m.cores, 2, base)
    assert warm.patience < base.patience and warm.slow_patience < base.slow_patience
    assert c.standby.estimator_params("a", m.optimizer, m.cores, 8, base) == base


def test_a_standby_plan_wider_than_the_models_cores_is_not_found():
    plan = ServedPlan("a", "2", 1, 2, 1, ((0,), (1,)), 5.0, 2)
    s = StandbySet((StandbyEntry(plan, 100.0, 0.0),))
    assert s.find("a", (2, 1, 1), (0, 1)) is not None
    assert s.find("a", (2, 1, 1), (0,)) is None  # the model now holds one core


def test_an_overload_does_not_wait_for_a_plan_loading_ahead_of_need(tmp_path, world, memory):  # noqa: F811
    # (a load ahead of need runs at idle CPU priority: under an overload it may get no CPU
    # until the burst ends, so the switch that ends the overload must not queue behind it)
    clock, ts = world
    pool = HeldPool()
    c = make_controller(tmp_path, clock, ts, pool=pool, standby_memory_mb=1000)
    m = c.models["a"]
    assert c.switch_now(m, plan("a", 1, 1, 2, 1), Reason.MANUAL).ok
    m.auto = True
    pool.hold = True  # the load ahead of need stays under way
    c.start_switch(SwitchTo(plan("a", 2, 2, 1, 2), Reason.PREWARM))
    assert set(c.prewarms) == {"a"} and not c.switches
    assert c.start_switch(SwitchTo(plan("a", 3, 2, 1, 2), Reason.AUTO)) is None  # same plan:
    assert [a.plan.version for a in c.queued] == ["3"]  # it waits, to find it warm
    c.queued.clear()
    rescue = c.start_switch(SwitchTo(plan("a", 4, 2, 1, 1), Reason.OVERLOAD))
    assert rescue is not None and c.switches["a"] is rescue and set(c.prewarms) == {"a"}
    pool.hold = False
    pool.release()
    for _ in range(200):
        if not c.busy:
            break
        c.advance_switches()
        clock.sleep(0.05)
    assert m.plan.version == "4" and ts.default["a"] == "4"
    assert {e.plan.version for e in c.standby.set.entries} >= {"2"}  # loaded, kept warm
