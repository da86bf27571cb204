"""Pure serving policy, and the run directory's slot claiming with real processes."""

import multiprocessing
import os
import time

import pytest

from packrat.errors import PackratError, PlanError
from packrat.core.optimizer import Optimizer
from packrat.core.policy import (
    PolicyParams, manual_plan, plan_for_batch, served_latency, should_switch,
)
from packrat.core.profile import Profile, ProfilePoint
from packrat.core.plan import slots_for
from packrat.serving.rundir import RunDir, check_model_name
from packrat.worker.slots import claim_slot

# 4 cores; one 4-thread instance is best for B=1, four 1-thread instances for B >= 4.
TABLE = {
    1: {1: 10.0, 2: 19.0, 4: 37.0},
    2: {1: 6.0, 2: 11.0, 4: 21.0},
    4: {1: 4.0, 2: 7.5, 4: 14.0},
}
OPT = Optimizer(Profile(tuple(ProfilePoint(t, b, x) for t, r in TABLE.items() for b, x in r.items())), 4)
CORES = (0, 1, 2, 3)


def test_plan_for_batch_assigns_disjoint_cores():
    one = plan_for_batch(OPT, "m", "1", 1, CORES)
    assert (one.instances, one.threads, one.batch_size, one.slots) == (1, 4, 1, ((0, 1, 2, 3),))
    four = plan_for_batch(OPT, "m", "2", 4, CORES)
    assert (four.instances, four.threads, four.batch_size) == (4, 1, 1)
    assert four.slots == ((0,), (1,), (2,), (3,))
    assert four.predicted_ms == 10.0
    # beyond what the profile serves, plan for the largest servable B
    assert plan_for_batch(OPT, "m", "3", 10_000, CORES).for_batch == OPT.max_servable


def test_served_latency_counts_rounds():
    # 2 workers of batch 1 serving 4 requests: two rounds of a 1-batch at 2 threads
    assert served_latency(OPT, 2, 2, 1, 4) == 12.0
    assert served_latency(OPT, 4, 1, 4, 4) == 14.0
    assert served_latency(OPT, 4, 1, 8, 2) == 7.5  # a batch is never larger than B


def test_should_switch_needs_enough_gain():
    one = plan_for_batch(OPT, "m", "1", 1, CORES)
    four = plan_for_batch(OPT, "m", "2", 4, CORES)
    assert should_switch(None, one, OPT, 1)
    assert not should_switch(one, plan_for_batch(OPT, "m", "9", 1, CORES), OPT, 1)  # same shape
    whole = manual_plan(OPT, "m", "3", 1, 4, 4, CORES)  # serves B = 4 in one round: 14 ms
    assert should_switch(whole, four, OPT, 4)  # 14 ms -> 10 ms
    assert not should_switch(whole, four, OPT, 4, PolicyParams(min_gain=0.5))
    assert not should_switch(four, one, OPT, 4)


def test_a_plan_that_needs_several_rounds_for_b_is_replaced():
    # one 4-thread instance of batch 1 is predicted at 4 x 4 ms = 16 ms for B = 4 (four rounds),
    # faster on paper than two 2-thread instances of batch 2 at 11 ms each... but not served in one round
    one = plan_for_batch(OPT, "m", "1", 1, CORES)
    two = manual_plan(OPT, "m", "2", 2, 2, 2, CORES)
    assert served_latency(OPT, 4, 1, 1, 4) == 16.0
    assert should_switch(one, two, OPT, 4, PolicyParams(min_gain=0.3))
    # ...where the target is predicted faster by the floor at least
    assert not should_switch(one, two, OPT, 4, PolicyParams(min_gain=0.4))


def test_a_batch_size_b_cannot_fill_pays_the_batching_delay():
    # after 8 clients, one 4-thread instance of batch 4; now 1 client: every batch of 1 waits
    # TorchServe's max_batch_delay for three more requests that never come
    big = manual_plan(OPT, "m", "1", 1, 4, 4, CORES)
    one = plan_for_batch(OPT, "m", "2", 1, CORES)
    assert served_latency(OPT, 4, 1, 4, 1, delay_ms=10) == 14.0  # 4 ms + 10 ms waiting
    assert served_latency(OPT, 4, 1, 1, 1, delay_ms=10) == 4.0   # a full batch never waits
    assert should_switch(big, one, OPT, 1, delay_ms=10)
    assert not should_switch(big, one, OPT, 1)  # without the delay they look the same


def test_manual_plan_checks_cores():
    plan = manual_plan(OPT, "m", "1", 2, 2, 2, CORES)
    assert plan.slots == ((0, 1), (2, 3)) and plan.predicted_ms == 11.0
    with pytest.raises(PlanError, match="need 6 cores"):
        manual_plan(OPT, "m", "1", 3, 2, 1, CORES)
    with pytest.raises(PlanError, match="--threads must be >= 1"):
        manual_plan(OPT, "m", "1", 1, 0, 1, CORES)
    with pytest.raises(PlanError):
        slots_for(5, 1, CORES)


@pytest.mark.parametrize("name", ["", "a/b", "..", "../x", "a.b", "x" * 65, "-lead"])
def test_bad_model_names(name):
    with pytest.raises(PackratError, match="invalid model name"):
        check_model_name(name)


def _claim_and_report(path, queue, hold_s):
    claim = claim_slot(RunDir(path).slot_dir("m", "1"), 2)
    queue.put(None if claim is None else claim[0])
    time.sleep(hold_s)


def test_slots_are_claimed_once_and_freed_when_the_worker_dies(tmp_path):
    run = RunDir(tmp_path).create()
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    a = ctx.Process(target=_claim_and_report, args=(tmp_path, q, 30))
    b = ctx.Process(target=_claim_and_report, args=(tmp_path, q, 30))
    a.start(); first = q.get(timeout=10)
    b.start(); second = q.get(timeout=10)
    assert {first, second} == {0, 1}
    c = ctx.Process(target=_claim_and_report, args=(tmp_path, q, 0))
    c.start(); assert q.get(timeout=10) is None  # both slots taken
    c.join()
    pids = run.slot_pids("m", "1")
    assert pids == {first: a.pid, second: b.pid}
    a.kill(); a.join()
    # a replacement worker finds the dead worker's slot free
    d = ctx.Process(target=_claim_and_report, args=(tmp_path, q, 30))
    d.start(); assert q.get(timeout=10) == first
    assert run.slot_pids("m", "1") == {first: d.pid, second: b.pid}
    for p in (b, d):
        p.kill(); p.join()
    assert oct(os.stat(tmp_path).st_mode & 0o777) == "0o700"
