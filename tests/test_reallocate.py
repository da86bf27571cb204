"""Live reallocation (core/reallocate.py): busy and idle from the arrival rate, the shared
core, donors before receivers, cores kept where they can be, hysteresis."""

import json
from dataclasses import replace

from packrat.core.curve import ServedCurve
from packrat.core.profile import Profile, ProfilePoint
from packrat.core.reallocate import BUSY_AGAIN, IDLE_SHARE, ModelLoad, reallocate

# A model that gains from every core: t threads serve b in b * 10 / t ms (1 thread, batch 1:
# 10 ms, 100 requests/s; idle below 5/s).
PROFILE = Profile(tuple(ProfilePoint(t, b, b * 10.0 / t) for t in (1, 2, 3, 4)
                        for b in (1, 2, 4, 8)))
CURVE = ServedCurve.of(PROFILE, 4)
CORES = (0, 1, 2, 3)


def load(name, batch=4, rate=50.0, cores=(), shared=False, **kw):
    return ModelLoad(name, CURVE, batch, rate, cores=cores, shared=shared, **kw)


def test_the_idle_line_is_a_share_of_one_workers_capacity_with_a_band():
    assert load("a").idle_line() == IDLE_SHARE * 100.0
    assert not load("a", rate=4.9).busy() and load("a", rate=5.0).busy()
    # once idle, the model turns busy only above BUSY_AGAIN times the line
    assert not load("a", rate=9.9, shared=True).busy()
    assert load("a", rate=5.0 * BUSY_AGAIN, shared=True).busy()
    assert load("a", rate=None).busy()  # not measured yet


def test_first_placement_splits_by_load_and_an_idle_model_shares_a_core():
    r = reallocate([load("a", batch=8), load("b", batch=8)], CORES)
    assert r.changed and "placed" in r.reason
    assert [p.cores for p in r.placements] == [(0, 1), (2, 3)]
    r = reallocate([load("a", batch=8), load("b", rate=0.0)], CORES)
    a, b = r.placements
    assert a.cores == CORES and not a.shared
    assert b.shared and b.cores == (3,) and r.shared_core == 3 and b.batch == 0


def test_a_model_going_idle_donates_its_cores_and_the_other_grows_after_it():
    now = [load("a", batch=8, cores=(0, 1)), load("b", batch=8, rate=1.0, cores=(2, 3))]
    r = reallocate(now, CORES)
    assert r.changed and "b idle" in r.reason
    assert r.placement("a").cores == CORES and r.placement("b").shared
    assert r.donors == ("b",) and r.receivers == ("a",)


def test_a_model_waking_up_takes_cores_the_other_gives_first():
    now = [load("a", batch=8, cores=CORES), load("b", batch=8, rate=20.0, shared=True,
                                                  cores=())]
    r = reallocate(now, CORES)
    assert r.changed and "b busy" in r.reason
    a, b = r.placements
    assert set(a.cores) < set(CORES) and set(a.cores).isdisjoint(b.cores)
    assert a.cores == CORES[:len(a.cores)]  # a keeps the first of its cores
    assert r.donors == ("a",) and r.receivers == ("b",)


def test_a_wake_up_waits_for_a_falling_model_then_moves_once():
    # b's load starts as a's ends: a's fast rate has fallen to 30/s of its 200/s average
    falling = [load("a", batch=8, rate=30.0, slow_rate=200.0, cores=CORES),
               load("b", batch=8, rate=20.0, slow_rate=20.0, shared=True)]
    r = reallocate(falling, CORES, wait_for_falling=True)
    assert not r.changed and r.waiting
    assert "b busy" in r.reason and "a falls (30.0/s, 200.0/s on average)" in r.reason
    assert reallocate(falling, CORES).changed  # the caller's bound has passed: move
    # a went idle: one move, b takes every core
    idle = [replace(falling[0], rate=1.0), falling[1]]
    r = reallocate(idle, CORES, wait_for_falling=True)
    assert r.changed and not r.waiting and "a idle" in r.reason and "b busy" in r.reason
    assert r.placement("b").cores == CORES and r.placement("a").shared
    # a steady (not falling) model does not hold a wake-up up
    steady = [replace(falling[0], rate=150.0), falling[1]]
    assert reallocate(steady, CORES, wait_for_falling=True).changed


def test_a_small_gain_is_not_worth_the_switches_a_large_one_is():
    # equal loads on an even split: nothing to gain
    even = [load("a", batch=8, cores=(0, 1)), load("b", batch=8, cores=(2, 3))]
    assert not reallocate(even, CORES).changed
    # a carries 8 and b 1: 3 cores for a; weighted latency 80*8/2... predicted gain large
    skewed = [load("a", batch=8, cores=(0, 1)), load("b", batch=1, cores=(2, 3))]
    r = reallocate(skewed, CORES, stay_s=600.0, cost=(1.0, 1.0))
    assert r.changed and "weighted latency" in r.reason
    assert len(r.placement("a").cores) == 3 and r.donors == ("b",) and r.receivers == ("a",)
    # the same gain over a short stay against a costly switch: the allocation holds
    held = reallocate(skewed, CORES, stay_s=1.0, cost=(100.0, 1.0))
    assert not held.changed and "holds" in held.reason


def test_an_slo_a_split_misses_is_met_by_moving_cores():
    # b's SLO of 20 ms at B = 4 needs 2 cores (40/2); it has 1
    now = [load("a", batch=4, cores=(0, 1, 2)), load("b", batch=4, cores=(3,), slo_ms=20.0)]
    r = reallocate(now, CORES, stay_s=1.0, cost=(100.0, 1.0))
    assert r.changed and "SLOs" in r.reason and len(r.placement("b").cores) == 2


def test_more_busy_models_than_cores_crowds_out_the_least_loaded():
    loads = [load("a", rate=10.0), load("b", rate=90.0), load("c", rate=50.0)]
    r = reallocate(loads, (0, 1))
    assert r.crowded_out == ("a",) and r.placement("a").shared
    assert "treated as idle" in r.reason
    assert {len(r.placement(n).cores) for n in "bc"} == {1}


def test_a_manual_plan_keeps_its_cores_and_the_rest_is_shared_out():
    loads = [load("a", cores=(0,), manual=True), load("b", batch=8, cores=(1,)),
             load("c", batch=8, rate=0.0, cores=(2, 3))]
    r = reallocate(loads, CORES)
    assert r.placement("a").cores == (0,)
    assert r.placement("b").cores == (1, 2, 3) and r.placement("c").shared
    assert "a" not in r.donors + r.receivers


# -- the controller carries it out (a fake TorchServe, an injected clock) ----------------------

from packrat.serving.corebudget import WAKE_WAIT_S, plan_for  # noqa: E402
from packrat.serving.runtime import CoreSplit  # noqa: E402
from tests.test_controller import CORES as TWO  # noqa: E402
from tests.test_controller import make_controller, ticks, world  # noqa: E402,F401
from tests.test_standby import memory  # noqa: E402,F401


def test_the_controller_moves_cores_to_the_busy_model_donors_first(tmp_path, world):  # noqa: F811
    clock, ts = world
    c = make_controller(tmp_path, clock, ts, models=("a", "b"), core_split=CoreSplit.AUTO)
    c.place(TWO)  # nothing measured: both busy, one core each
    assert (c.models["a"].cores, c.models["b"].cores) == ((0,), (1,))
    for m in c.models.values():
        assert c.switch_now(m, plan_for(m, 1)).ok
    plans = {}  # (model, version) -> its plan, as registered
    register = ts.register

    def recording(url, *, model_name, **kw):
        register(url, model_name=model_name, **kw)
        switch = c.switches.get(model_name) or c.prewarms[model_name]
        plans[(model_name, switch.plan.version)] = (switch.plan, c.models[model_name].shared)

    ts.register = recording
    for m in c.models.values():
        plans[(m.name, m.plan.version)] = (m.plan, m.shared)

    def never_two_models_on_a_dedicated_core():
        held = {}
        for (name, version), (plan, shared) in plans.items():
            if version not in ts.versions_.get(name, {}):
                continue
            m = c.models[name]
            if version == m.plan.version:  # (a live plan may turn shared where it runs)
                shared = m.plan.shared
            for core in {x for slot in plan.slots for x in slot}:
                if not shared:
                    assert held.setdefault(core, name) == name, (core, name, held)

    def run(seconds):
        end = clock() + seconds
        while clock() < end:
            c.tick()
            never_two_models_on_a_dedicated_core()
            clock.sleep(0.05)

    ts.load.update(a=8.0, b=0.0)  # a busy, b idle: a gets both cores, b the shared one
    run(30)
    a, b = c.models["a"], c.models["b"]
    assert a.cores == (0, 1) and b.shared and b.cores == (1,)
    assert b.plan.describe() == "1x<t=1,b=1>" and b.plan.slots == ((1,),)
    state = json.loads(c.run.state_file.read_text())
    assert state["models"]["b"]["shared"] and "b idle" in state["allocation"]["reason"]
    inputs = state["allocation"]["inputs"]
    assert inputs["b"]["rate_rps"] < ModelLoad("b", c.budget.curve(b), 1, 0.0).idle_line()
    assert inputs["a"]["rate_rps"] > 100
    # b's plan on core 1 became the shared one where it ran: nothing registered for it, and
    # a grew onto both cores only then
    b_versions = [x for x in ts.calls if x[0] == "register" and x[1] == "b"]
    assert len(b_versions) == 1 and b.plan.shared, b_versions
    ts.load.update(a=0.0, b=8.0)  # the opposite
    run(40)
    assert b.cores == (0, 1) and not b.shared and a.shared
    ts.load.update(a=8.0, b=8.0)  # both busy: one core each
    run(40)
    assert {a.cores, b.cores} == {(0,), (1,)} and not a.shared and not b.shared
    assert a.last_error is None and b.last_error is None


def test_a_manual_plan_must_fit_the_models_cores_and_holds_them_until_auto(tmp_path, world):  # noqa: F811
    from packrat.jsonfile import read_json, write_json

    clock, ts = world
    c = make_controller(tmp_path, clock, ts, models=("a", "b"), core_split=CoreSplit.AUTO)
    c.place(TWO)
    for m in c.models.values():
        assert c.switch_now(m, plan_for(m, 1)).ok

    def ask(rid, body):
        write_json(c.run.requests / f"{rid}.json", body)
        for _ in range(100):
            c.tick()
            clock.sleep(0.05)
            if (c.run.requests / f"{rid}.result.json").exists():
                return read_json(c.run.requests / f"{rid}.result.json")
        raise AssertionError("no answer")

    big = ask("big", {"model": "a", "instances": 1, "threads": 2, "batch": 1})
    assert not big["ok"] and "a holds cores 0 in the allocation; b cores 1" in big["message"]
    fits = ask("fits", {"model": "a", "instances": 1, "threads": 1, "batch": 4})
    assert fits["ok"] and not c.models["a"].auto
    # a busy, b idle: b goes to the shared core, but a's manual plan keeps its one core
    ts.load.update(a=8.0, b=0.0)
    ticks(c, clock, 30)
    assert c.models["a"].cores == (0,) and c.models["a"].plan.describe() == "1x<t=1,b=4>"
    assert c.models["b"].shared
    assert ask("auto", {"model": "a", "auto": True})["ok"]
    ticks(c, clock, 30)  # handed back: the allocator gives a both cores
    assert c.models["a"].cores == (0, 1) and c.models["a"].auto


def test_even_and_overlap_splits_never_move(tmp_path, world):  # noqa: F811
    clock, ts = world
    for split, want in ((CoreSplit.EVEN, ((0,), (1,))), (CoreSplit.OVERLAP, ((0, 1), (0, 1)))):
        c = make_controller(tmp_path / split.value, clock, ts, models=("a", "b"),
                            core_split=split)
        c.place(TWO)
        assert (c.models["a"].cores, c.models["b"].cores) == want
        for m in c.models.values():
            assert c.switch_now(m, plan_for(m, 1)).ok
        ts.load.update(a=8.0, b=0.0)
        ticks(c, clock, 20)
        assert (c.models["a"].cores, c.models["b"].cores) == want
        assert not c.models["b"].shared and c.budget.last is None
        assert all(s.slots[0][0] in want[0] for s in [c.models["a"].plan])
        ts.load.clear()


def a_busy_b_idle(tmp_path, world, a_load, seconds):  # noqa: F811
    """Two models on two cores with a standby budget, each serving its plan for B = 1; then
    a under a_load and b idle for `seconds`: a holds both cores, b the shared one."""
    clock, ts = world
    c = make_controller(tmp_path, clock, ts, models=("a", "b"), core_split=CoreSplit.AUTO,
                        standby_memory_mb=1000)
    c.place(TWO)
    a, b = c.models["a"], c.models["b"]
    for m in (a, b):
        assert c.switch_now(m, plan_for(m, 1)).ok
    ts.load.update(a=a_load, b=0.0)
    ticks(c, clock, seconds)
    assert a.cores == (0, 1) and b.shared
    return c, a, b


def test_a_model_that_shrinks_drops_its_wider_standby_plans(tmp_path, world, memory):  # noqa: F811
    # a holds both cores with 2x<t=1,b=1> in standby; b wakes up: a shrinks to one core,
    # where that standby plan cannot run (it once stopped the controller: "2 instances x 1
    # threads need 2 cores")
    clock, ts = world
    c, a, b = a_busy_b_idle(tmp_path, world, 8.0, 30)
    assert c.switch_now(a, replace(plan_for(a, 2), version=str(a.next_version))).ok
    assert c.switch_now(a, replace(plan_for(a, 1), version=str(a.next_version))).ok
    assert any(e.plan.model == "a" and e.plan.instances == 2 for e in c.standby.set.entries)
    ts.load.update(b=8.0)
    ticks(c, clock, 40)
    assert {a.cores, b.cores} == {(0,), (1,)} and a.last_error is None and c.server_event is None
    assert all(e.plan.model != "a" or {x for s in e.plan.slots for x in s} <= set(a.cores)
               for e in c.standby.set.entries)


def test_a_few_requests_in_a_row_do_not_wake_an_idle_model():
    # the fast rate jumped over twice the line (5/s here), the slow one did not
    assert not load("b", rate=12.0, shared=True, slow_rate=2.0).busy()
    assert load("b", rate=12.0, shared=True, slow_rate=11.0).busy()
    assert load("b", rate=12.0, shared=False, slow_rate=0.0).busy()  # busy stays busy


def test_a_model_placed_on_its_cores_is_planned_for_its_arrivals():
    from packrat.core.optimizer import Optimizer
    from packrat.core.policy import batch_for_rate, capacity_rps, plan_for_batch

    opt = Optimizer(PROFILE, 2)  # 1 thread, batch 1: 10 ms (100/s); 2 threads: 200/s
    assert batch_for_rate(opt, None, (0, 1)) == 1
    assert batch_for_rate(opt, 150.0, (0, 1)) == 1  # 1x<t=2,b=1> serves 200/s
    # 190/s: no plan keeps up within 90% (every plan here serves 200/s): the first of most
    assert batch_for_rate(opt, 190.0, (0, 1)) == 1
    from tests.test_controller import (
        PROFILE as SUBLINEAR,  # 2 threads help less than 2x
    )
    sub = Optimizer(SUBLINEAR, 2)   # 1x<t=2,b=1>: 500/s; 2x<t=1,b=1>: 571/s
    assert batch_for_rate(sub, 400.0, (0, 1)) == 1
    assert batch_for_rate(sub, 480.0, (0, 1)) == 2
    one = Optimizer(PROFILE, 1)
    b = batch_for_rate(one, 95.0, (0,))  # one core serves 100/s at any batch: the most it can
    assert capacity_rps(one, plan_for_batch(one, "", "", b, (0,))) == 100.0
    # ResNet-50 on one core (calibrated): 5.1, 6.0, 7.3 and 7.4 requests/s at batch 1, 2, 4,
    # 8. At 6.8/s none keeps up within 90%: b=4, of nearly the most capacity at half b=8's
    # batch latency, queues least; beyond every capacity, the most capacity
    resnet = Optimizer(Profile(tuple(ProfilePoint(1, b, ms) for b, ms in
                                     ((1, 198.0), (2, 332.0), (4, 546.0), (8, 1074.0)))), 1)
    assert batch_for_rate(resnet, 5.0, (0,)) == 2
    assert batch_for_rate(resnet, 6.8, (0,)) == 4
    assert batch_for_rate(resnet, 9.0, (0,)) == 8


def test_if_woken_tells_where_a_donor_would_go():
    from packrat.core.reallocate import if_woken

    now = [load("a", batch=8, cores=CORES), load("b", batch=1, rate=0.0, shared=True)]
    r = if_woken(now, CORES)
    a, b = r.placements
    assert set(a.cores) < set(CORES) and a.cores == CORES[:len(a.cores)] and not b.shared
    assert if_woken([load("a", batch=8, cores=CORES)], CORES) is None  # no one idle


def test_a_donor_shrinks_warm_onto_a_plan_loaded_ahead_of_need(tmp_path, world, memory):  # noqa: F811
    # a busy on both cores, b idle: once a's switches have ended, its plan for one core
    # (where it would go if b woke up) is loaded into standby; when b wakes, a's shrink is a
    # set-default, and b gets its core without waiting for a cold load of a
    clock, ts = world
    c, a, b = a_busy_b_idle(tmp_path, world, 2.0, 30)  # (a's plan holds its load)
    ticks(c, clock, 30)  # the shrink plan is prewarmed
    warm = [e.plan for e in c.standby.set.entries if e.plan.model == "a"]
    assert any(p.slots == ((0,),) for p in warm), [p.describe() for p in warm]
    registered = len(ts.registered("a"))
    ts.load.update(b=8.0)
    ticks(c, clock, 40)
    assert (a.cores, b.cores) == ((0,), (1,)) and not b.shared
    assert len(ts.registered("a")) <= registered  # nothing of a loaded for the shrink
    assert a.plan.slots == ((0,),) and a.last_error is None and b.last_error is None


def test_a_reallocation_takes_a_standby_plan_that_serves_as_well(tmp_path, world):  # noqa: F811
    from packrat.core.plan import shape_of
    from packrat.serving.corebudget import warm_instead

    clock, ts = world
    c = make_controller(tmp_path, clock, ts, models=("a",))
    a = c.models["a"]
    target = plan_for(a, 8)  # 2x<t=1,b=4> on both cores
    standby = plan_for(a, 2)
    assert shape_of(standby) != shape_of(target)
    # no measured rate: the standby plan is taken unless the cold one repays its switch
    got = warm_instead(a, target, frozenset({shape_of(standby)}), clock(), 10, 0.05)
    assert got is not None and shape_of(got) == shape_of(standby)
    assert got.version == target.version and got.for_batch == target.for_batch
    assert warm_instead(a, target, frozenset({shape_of(target)}), clock(), 10, 0.05) is None
    assert warm_instead(a, target, frozenset(), clock(), 10, 0.05) is None


def test_a_donor_takes_a_standby_plan_even_one_short_of_its_arrivals(tmp_path, world):  # noqa: F811
    # its cold shrink would keep the model waiting for its cores queueing on the core they
    # share; a model that gives nothing up loads the plan that keeps up instead
    from packrat.core.plan import shape_of
    from packrat.core.policy import capacity_rps
    from packrat.serving.corebudget import warm_instead

    clock, ts = world
    c = make_controller(tmp_path, clock, ts, models=("a",))
    a = c.models["a"]
    target = plan_for(a, 8)
    small, smaller = plan_for(a, 2), plan_for(a, 1)
    shapes = frozenset({shape_of(small), shape_of(smaller)})
    most = max(capacity_rps(a.optimizer, p) for p in (small, smaller))
    a.estimator = replace(a.estimator, rate=1.5 * most)  # neither keeps up
    assert warm_instead(a, target, shapes, clock(), 10, 0.05) is None
    got = warm_instead(a, target, shapes, clock(), 10, 0.05, donor=True)
    assert got is not None and shape_of(got) in shapes
    assert capacity_rps(a.optimizer, got) == most  # the one of most capacity
    assert got.version == target.version


def test_overloaded_models_are_weighed_at_what_their_share_of_the_cores_serves():
    # queues far beyond what any core count serves in one round (B 1000, the profile takes
    # 8 per instance): still an allocation, each model on its share, not an error that
    # kept the woken model on the shared core
    now = [load("a", batch=1000, cores=CORES), load("b", batch=1000, rate=50.0, shared=True)]
    r = reallocate(now, CORES)
    a, b = r.placements
    assert r.changed and not b.shared and len(a.cores) + len(b.cores) == len(CORES)
    assert set(a.cores).isdisjoint(b.cores) and r.donors == ("a",)


def test_a_donor_loads_one_shrink_plan_however_b_wavers(tmp_path, world, memory):  # noqa: F811
    clock, ts = world
    c, _, _ = a_busy_b_idle(tmp_path, world, 2.0, 40)
    for level in (1.0, 2.0, 1.0, 2.0):  # B wavers: the shrink plan for each B differs
        ts.load.update(a=level)
        ticks(c, clock, 15)
    shrinks = [e for e in c.standby.set.entries if e.plan.model == "a" and e.plan.slots == ((0,),)]
    assert len(shrinks) == 1, [e.plan.describe() for e in c.standby.set.entries]
    # and nothing else is loaded on the cores an idle model may claim
    assert all(e.plan.slots == ((0,),) for e in c.standby.set.entries if e.plan.model == "a")


def test_a_wake_up_waits_a_bounded_time_for_a_falling_model(tmp_path, world, memory):  # noqa: F811
    # a's load falls from 800 to 50 requests/s (still busy) as b's starts (60/s: b wakes
    # once its slow average passes its line, 6 intervals on): the move waits for a to settle,
    # at most WAKE_WAIT_S, then gives b its core
    clock, ts = world
    c, a, b = a_busy_b_idle(tmp_path, world, 8.0, 30)
    ts.load.update(a=0.5, b=0.6)
    waited = None
    for _ in range(int(15 / 0.05)):
        ticks(c, clock, 0.05)
        if c.budget.waiting_since is not None:
            waited = c.budget.waiting_since
            break
    assert waited is not None and b.shared, "b's wake-up did not wait for a's falling rate"
    ticks(c, clock, WAKE_WAIT_S - 1)
    assert b.shared and a.cores == (0, 1)  # still waiting
    ticks(c, clock, 30)
    assert {a.cores, b.cores} == {(0,), (1,)} and not b.shared


def test_a_woken_model_whose_core_is_its_shared_one_keeps_its_worker(tmp_path, world, memory):  # noqa: F811
    # b idle on the shared core 1; it wakes at a rate one 1-thread worker serves, and its
    # dedicated core is core 1: the worker it has is its plan, so it is not switched (what it
    # loads later ahead of need, as its arrivals leave it headroom, goes into standby only)
    clock, ts = world
    c, a, b = a_busy_b_idle(tmp_path, world, 8.0, 30)
    calls = len(ts.calls)
    version = b.plan.version
    ts.load.update(b=0.6)
    ticks(c, clock, 40)
    assert b.cores == (1,) and not b.shared and a.cores == (0,)
    assert b.plan.version == version and not b.plan.shared
    assert not [x for x in ts.calls[calls:] if x[0] == "set-default" and x[1] == "b"]
    standby = {f"b-v{e.plan.version}" for e in c.standby.set.entries if e.plan.model == "b"}
    assert {x[2] for x in ts.calls[calls:] if x[0] == "register" and x[1] == "b"} <= standby


# One core gains from batching: 1 thread serves 285/s at batch 1, 400/s at 2, 500/s at 4.
BATCHING = Profile(tuple(ProfilePoint(t, b, ms) for t, b, ms in [
    (1, 1, 3.5), (1, 2, 5.0), (1, 4, 8.0), (1, 8, 14.0),
    (2, 1, 2.0), (2, 2, 3.0), (2, 4, 5.0), (2, 8, 9.0)]))


def test_a_model_wakes_warm_onto_its_plan_for_the_rate_it_reached_when_last_busy(
        tmp_path, world, memory):  # noqa: F811
    # b busy at 300 requests/s, then idle on the shared core while a is busy: b's plan on
    # that core for 300/s within 70% of its capacity (b=4, 500/s; b=2's 400/s would leave
    # little room to drain the queue of its wake-up) is loaded ahead of need. When b wakes,
    # its rate is still rising through the busy line: it gets that plan, warm, not its one
    # b=1 worker (285/s) and a cold switch once its queue had grown.
    from packrat.core.optimizer import Optimizer
    from packrat.core.plan import shape_of

    clock, ts = world
    c = make_controller(tmp_path, clock, ts, models=("a", "b"), core_split=CoreSplit.AUTO,
                        standby_memory_mb=1000)
    for m in c.models.values():
        m.optimizer = Optimizer(BATCHING, 2)
    c.place(TWO)
    a, b = c.models["a"], c.models["b"]
    for m in (a, b):
        assert c.switch_now(m, plan_for(m, 1)).ok
    ts.load.update(a=0.0, b=3.0)
    ticks(c, clock, 60)
    assert b.cores == (0, 1) and a.shared and b.busy_rate > 250, b.busy_rate
    assert a.busy_rate is None  # never busy: nothing to plan its wake-up for
    ts.load.update(a=4.0, b=0.0)
    ticks(c, clock, 60)
    assert a.cores == (0, 1) and b.shared and b.cores == (1,)
    waking = [e.plan for e in c.standby.set.entries if e.plan.model == "b"]
    assert any(p.slots == ((1,),) and p.batch_size == 4 for p in waking), \
        [p.describe() for p in waking]
    registered = len([x for x in ts.calls if x[0] == "register" and x[1] == "b"])
    ts.load.update(b=3.0)
    for _ in range(int(30 / 0.05)):
        ticks(c, clock, 0.05)
        if not b.shared and not c.busy:
            break
    assert b.cores == (1,) and not b.shared and a.cores == (0,)
    assert shape_of(b.plan) == (1, 1, 4), b.plan.describe()
    assert len([x for x in ts.calls if x[0] == "register" and x[1] == "b"]) == registered


def test_a_receiver_waits_for_its_donors_switches_not_for_their_loads_on_kept_cores(
        tmp_path, world):  # noqa: F811
    # phase 3 of a run: small-cnn, waking onto core 1, waited behind ResNet-50's load ahead of
    # need on core 0 (the core ResNet-50 kept) and then behind ResNet-50's next switch
    from types import SimpleNamespace

    from packrat.core.decide import Reason, SwitchTo

    clock, ts = world
    c = make_controller(tmp_path, clock, ts, models=("a", "b"), core_split=CoreSplit.AUTO)
    c.place(TWO)
    a, b = c.models["a"], c.models["b"]
    assert (a.cores, b.cores) == ((0,), (1,))
    c.prewarms["a"] = SimpleNamespace(plan=replace(plan_for(a, 1), slots=((0,),)))
    assert not c._donor_busy("a")  # loading on the core a keeps
    c.prewarms["a"] = SimpleNamespace(plan=replace(plan_for(a, 1), slots=((1,),)))
    assert c._donor_busy("a")      # loading on the core b takes
    del c.prewarms["a"]
    # while b's switch waits for a, a starts none of its own
    assert not next(v for v in c.views() if v.name == "a").switching
    c.queued.append(SwitchTo(plan_for(b, 1), Reason.REALLOCATE, after=("a",)))
    assert next(v for v in c.views() if v.name == "a").switching
