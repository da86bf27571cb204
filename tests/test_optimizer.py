import math
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from packrat.errors import PlanError
from packrat.core.optimizer import Optimizer, mean_speedup
from packrat.core.profile import Profile, ProfilePoint, read_profile
from tests.reference_dp import best_served, brute_force, cost, textbook_dp

DATA = Path(__file__).resolve().parent / "data"  # see data/README.md


def make_profile(table: dict[int, dict[int, float]]) -> Profile:
    return Profile(
        tuple(ProfilePoint(t, b, lat) for t, row in table.items() for b, lat in row.items())
    )


@st.composite
def tables(draw, monotone: bool):
    threads = draw(st.sets(st.integers(1, 4), min_size=1, max_size=4))
    table = {}
    for t in threads:
        batches = sorted(draw(st.sets(st.sampled_from([1, 2, 3, 4, 6, 8]), min_size=1)))
        lats = draw(st.lists(st.integers(1, 60), min_size=len(batches), max_size=len(batches)))
        if monotone:
            lats = sorted(lats)
        table[t] = {b: float(x) for b, x in zip(batches, lats)}
    return table


def check_plan(table, result, cores, batch):
    plan = result.optimal
    assert plan.batch == batch
    assert plan.cores <= cores
    assert all(i.batch >= 1 and i.threads in table for i in plan.instances)
    assert plan.latency_ms == max(cost(table, i.threads, i.batch) for i in plan.instances)


@settings(max_examples=300, deadline=None)
@given(table=tables(monotone=False), cores=st.integers(1, 6), batch=st.integers(1, 10))
def test_dp_matches_brute_force(table, cores, batch):
    expected = brute_force(table, cores, batch)
    try:
        opt = Optimizer(make_profile(table), cores)
    except PlanError:
        assert min(table) > cores
        return
    if math.isinf(expected):
        with pytest.raises(PlanError):
            opt.plan(batch)
        return
    result = opt.plan(batch)
    assert result.optimal.latency_ms == pytest.approx(expected)
    check_plan(table, result, cores, batch)
    served = best_served(table, cores, batch)
    if math.isinf(served):  # no single thread count can serve B
        assert result.served is None
        return
    assert result.served.latency_ms == pytest.approx(served)
    assert result.served.batch == batch and result.served.servable
    assert result.served.cores <= cores


@settings(max_examples=100, deadline=None)
@given(table=tables(monotone=True), cores=st.integers(1, 5), batch=st.integers(1, 8))
def test_dp_equals_textbook_recurrence_on_monotone_profiles(table, cores, batch):
    expected = textbook_dp(table, cores, batch)
    if math.isinf(expected) or min(table) > cores:
        return
    assert Optimizer(make_profile(table), cores).plan(batch).optimal.latency_ms == expected


def test_textbook_recurrence_on_published_resnet_profile():
    profile = read_profile(DATA / "pytorch_resnet_latency.csv")
    opt = Optimizer(profile, 8)
    table = {t: row for t, row in profile.table().items() if t <= 8}
    for b in (1, 3, 8, 13):
        assert opt.plan(b).optimal.latency_ms == pytest.approx(textbook_dp(table, 8, b))


@pytest.mark.parametrize(
    "model,anchor",
    [("resnet", 2.270), ("inception", 2.129), ("gpt2", 1.652), ("bert", 1.589)],
)
def test_published_anchor_figures(model, anchor):
    profile = read_profile(DATA / f"pytorch_{model}_latency.csv")
    batches = [2**k for k in range(3, 11)]
    assert mean_speedup(profile, 16, batches) == pytest.approx(anchor, rel=0.005)


def test_plan_is_deterministic_and_serializable():
    profile = read_profile(DATA / "pytorch_bert_latency.csv")
    a = Optimizer(profile, 16).plan(100).to_json()
    b = Optimizer(profile, 16).plan(100).to_json()
    assert a == b
    assert a["batch"] == 100 and a["cores"] == 16
    assert sum(i["batch"] for i in a["optimal"]["instances"]) == 100
    assert a["speedup"] == pytest.approx(a["baseline_latency_ms"] / a["optimal"]["latency_ms"], rel=1e-3)


def test_more_cores_than_profiled_allow_more_instances():
    profile = read_profile(DATA / "pytorch_resnet_latency.csv")
    r16 = Optimizer(profile, 16).plan(64)
    r128 = Optimizer(profile, 128).plan(64)
    assert r128.optimal.latency_ms < r16.optimal.latency_ms
    assert r128.optimal.cores <= 128
    assert r128.baseline_threads == 16  # the largest profiled thread count


def test_errors():
    profile = make_profile({1: {1: 1.0, 2: 2.0}, 2: {1: 0.8, 2: 1.5}})
    with pytest.raises(PlanError, match="cores"):
        Optimizer(profile, 0)
    opt = Optimizer(profile, 2)
    with pytest.raises(PlanError, match="batch size must be"):
        opt.plan(0)
    with pytest.raises(PlanError, match="largest servable batch is 4"):
        opt.plan(5)
    with pytest.raises(PlanError, match="no thread count"):
        Optimizer(make_profile({4: {1: 1.0}}), 2)
