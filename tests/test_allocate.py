"""The allocator (packrat/core/allocate.py) against brute force, and its rules one by one."""

import itertools
import math
import random
from pathlib import Path

import pytest

from packrat.core.allocate import (
    ModelDemand,
    allocate,
    cores_for_slo,
    evaluate_split,
    even_split,
    proportional_split,
    within,
)
from packrat.core.curve import ServedCurve
from packrat.core.optimizer import Optimizer
from packrat.core.profile import Profile, ProfilePoint, read_profile
from packrat.errors import PlanError
from tests.reference_dp import best_served

DATA = Path(__file__).resolve().parent / "data"  # see data/README.md
PUBLISHED = ("resnet", "inception", "gpt2", "bert")


def make_profile(table: dict[int, dict[int, float]]) -> Profile:
    return Profile(
        tuple(ProfilePoint(t, b, lat) for t, row in table.items() for b, lat in row.items())
    )


def curve(table, cores):
    return ServedCurve.of(make_profile(table), cores)


def random_table(rng: random.Random, cores: int) -> dict[int, dict[int, float]]:
    """Thread counts up to `cores` (the smallest may exceed 1: then few cores serve nothing),
    a few batch sizes, integer latencies (exact ties happen), not always monotone."""
    threads = set(rng.sample(range(1, cores + 1), rng.randint(1, min(cores, 4))))
    if rng.random() < 0.7:
        threads.add(1)
    table = {}
    for t in threads:
        batches = sorted(rng.sample([1, 2, 3, 4, 6, 8], rng.randint(1, 4)))
        lats = [rng.randint(1, 40) for _ in batches]
        if rng.random() < 0.7:
            lats.sort()
        table[t] = {b: float(x) for b, x in zip(batches, lats)}
    return table


# -- the brute-force oracle --------------------------------------------------------------------

def brute_force(models, cores):
    """models: (table, batch, slo_ms) of the busy ones. Every split n_m >= 1, sum <= cores,
    with latencies from tests/reference_dp.best_served; the objective of the module doc.
    Returns (least worst ratio or None, least weighted sum, fewest cores), or None when no
    split serves every model."""
    rows = []
    for split in itertools.product(range(1, cores + 1), repeat=len(models)):
        if sum(split) > cores:
            continue
        lats = [best_served(table, n, b) for (table, b, _), n in zip(models, split)]
        if any(math.isinf(x) for x in lats):
            continue
        ratios = [x / slo for x, (_, _, slo) in zip(lats, models) if slo is not None]
        worst = max(ratios) if ratios else None
        weighted = sum(b * x for x, (_, b, _) in zip(lats, models))
        rows.append((split, worst, weighted))
    if not rows:
        return None
    least_worst = None
    if any(slo is not None for _, _, slo in models):
        least_worst = min(w for _, w, _ in rows)
        bound = 1.0 if within(least_worst, 1.0) else least_worst
        rows = [r for r in rows if within(r[1], bound)]
    least = min(w for _, _, w in rows)
    rows = [r for r in rows if within(r[2], least)]
    return least_worst, least, min(sum(s) for s, _, _ in rows)


def random_case(rng):
    cores = rng.randint(2, 8)
    models = []
    for k in range(rng.randint(2, 4)):
        table = random_table(rng, cores)
        batch = 0 if rng.random() < 0.2 else rng.randint(1, 8)
        slo = None
        if rng.random() < 0.6:
            # around one of the table's latencies: met, exactly met and missed SLOs all occur
            slo = float(max(1, round(rng.choice([x for row in table.values() for x in row.values()])
                                     * rng.choice([0.5, 0.8, 1.0, 1.0, 1.5, 3.0]))))
        models.append((f"m{k}", table, batch, slo))
    return cores, models


@pytest.mark.parametrize("block", range(8))
def test_allocation_matches_brute_force(block):
    rng = random.Random(1000 + block)
    solved = infeasible = errors = 0
    for _ in range(60):
        cores, models = random_case(rng)
        demands = [ModelDemand(name, curve(table, cores), b, slo)
                   for name, table, b, slo in models]
        busy = [(table, b, slo) for _, table, b, slo in models if b > 0]
        expected = brute_force(busy, cores) if len(busy) <= cores else None
        if expected is None:
            with pytest.raises(PlanError):
                allocate(demands, cores)
            errors += 1
            continue
        least_worst, least, fewest = expected
        got = allocate(demands, cores)
        used = sum(m.cores for m in got.models)
        assert used + got.spare_cores == cores
        for (name, table, b, slo), m in zip(models, got.models):
            assert m.name == name and m.batch == b and m.slo_ms == slo
            if b == 0:
                assert m.shared and m.cores == 0 and m.plan is None and m.slo_met is None
                continue
            assert m.cores >= 1 and not m.shared
            assert m.plan.batch == b and m.plan.servable and m.plan.cores <= m.cores
            assert m.plan.latency_ms == best_served(table, m.cores, b)
        weighted_sum = sum(m.batch * m.plan.latency_ms for m in got.busy)
        assert weighted_sum == pytest.approx(least, rel=1e-9)
        if busy:
            assert got.weighted_latency_ms == pytest.approx(
                least / sum(b for _, b, _ in busy), rel=1e-9)
        else:
            assert got.weighted_latency_ms is None
        assert used == fewest
        if least_worst is None:
            assert got.worst_slo_ratio is None and got.slo_feasible and got.missed == ()
        elif within(least_worst, 1.0):
            assert got.slo_feasible and got.missed == ()
            assert within(got.worst_slo_ratio, 1.0)
        else:
            infeasible += 1
            assert not got.slo_feasible
            assert got.worst_slo_ratio == pytest.approx(least_worst, rel=1e-9)
            assert {miss.name for miss in got.missed} == {
                m.name for m in got.busy if m.slo_ms is not None
                and not within(m.plan.latency_ms / m.slo_ms, 1.0)}
        solved += 1
    # the generator reaches every branch
    assert solved > 25 and infeasible > 0 and errors > 0


@pytest.mark.parametrize("seed", range(4))
def test_served_curve_is_an_optimizer_per_core_count(seed):
    rng = random.Random(seed)
    for _ in range(40):
        cores = rng.randint(1, 8)
        table = random_table(rng, cores)
        profile = make_profile(table)
        c = ServedCurve.of(profile, cores)
        for n in range(1, cores + 1):
            try:
                opt = Optimizer(profile, n)
            except PlanError:  # no thread count <= n
                opt = None
            for b in range(1, 12):
                expected = None
                if opt is not None and b <= opt.max_servable:
                    expected = opt.plan(b).served
                assert c.plan(b, n) == expected, (table, n, b)


def test_served_curve_on_published_profiles():
    for model in PUBLISHED:
        profile = read_profile(DATA / f"pytorch_{model}_latency.csv")
        c = ServedCurve.of(profile, 16)
        for n in (1, 3, 8, 13, 16):
            opt = Optimizer(profile, n)
            for b in (1, 5, 8, 33, 100):
                assert c.plan(b, n) == opt.plan(b).served
        assert c.largest_batch() == 16 * 1024


# -- the rules, one by one ---------------------------------------------------------------------

# latency of one instance on t threads serving b <= 10: halves per doubling of threads
SCALING = {t: {10: 120.0 / t} for t in (1, 2, 3, 4, 6, 8)}


def test_weighted_latency_prefers_the_heavier_model():
    light = ModelDemand("light", curve(SCALING, 8), 1)
    heavy = ModelDemand("heavy", curve(SCALING, 8), 9)
    got = allocate([light, heavy], 8)
    # B=1 and B=9 cost the same per instance (b <= 10 is one batch), the heavier weighs 9x:
    # 2 + 6 cores give (60 + 9 * 20) / 10, better than 1 + 6 (120 + 180) or 4 + 4 (30 + 270)
    assert (got.model("light").cores, got.model("heavy").cores) == (2, 6)
    assert got.spare_cores == 0
    assert got.weighted_latency_ms == pytest.approx((60 + 9 * 20) / 10)
    # on 13 cores, 4 + 8 is best (no 5- or 9-thread point helps): one core is spare
    got = allocate([ModelDemand("light", curve(SCALING, 13), 1),
                    ModelDemand("heavy", curve(SCALING, 13), 9)], 13)
    assert (got.model("light").cores, got.model("heavy").cores, got.spare_cores) == (4, 8, 1)


def test_slo_takes_cores_from_the_weighted_optimum():
    heavy = ModelDemand("heavy", curve(SCALING, 8), 9)
    # 40 ms needs 3 cores for the light model; then 4 + 4 (30 + 9 * 30) beats 3 + 5 (40 + 270)
    got = allocate([ModelDemand("light", curve(SCALING, 8), 1, slo_ms=40.0), heavy], 8)
    assert got.slo_feasible and got.missed == ()
    assert (got.model("light").cores, got.model("heavy").cores) == (4, 4)
    assert got.model("light").slo_met is True and got.worst_slo_ratio == pytest.approx(0.75)
    # an SLO met exactly is met: 60 ms is what the unconstrained optimum (2 + 6) gives it
    got = allocate([ModelDemand("light", curve(SCALING, 8), 1, slo_ms=60.0), heavy], 8)
    assert (got.model("light").cores, got.model("heavy").cores) == (2, 6)
    assert got.slo_feasible and got.worst_slo_ratio == 1.0


def test_infeasible_slos_minimize_the_worst_ratio_and_say_by_how_much():
    a = ModelDemand("a", curve(SCALING, 4), 1, slo_ms=20.0)
    b = ModelDemand("b", curve(SCALING, 4), 1, slo_ms=40.0)
    got = allocate([a, b], 4)
    # on n cores 120/n ms (n <= 4). Worst ratios: a 2 + b 1: max(3, 3) = 3; 2 + 2: max(3,
    # 1.5) = 3; 3 + 1: max(2, 3) = 3; anything with a on 1 core: 6. The least is 3.0, and
    # among those splits 2 + 2 has the least weighted latency (60 + 60)
    assert not got.slo_feasible
    assert got.worst_slo_ratio == pytest.approx(3.0)
    assert (got.model("a").cores, got.model("b").cores) == (2, 2)
    assert [m.name for m in got.missed] == ["a", "b"]
    miss = got.missed[0]
    assert miss.latency_ms == 60.0 and miss.slo_ms == 20.0
    assert miss.over_ms == pytest.approx(40.0) and miss.ratio == pytest.approx(3.0)
    assert "+40.0 ms" in miss.describe()
    assert got.to_json()["missed"][0] == {"model": "a", "latency_ms": 60.0, "slo_ms": 20.0,
                                          "ratio": 3.0, "over_ms": 40.0}


def test_ties_go_to_fewer_cores():
    flat = {1: {4: 10.0}, 2: {4: 10.0}, 4: {4: 10.0}}
    got = allocate([ModelDemand("a", curve(flat, 8), 4)], 8)
    assert got.model("a").cores == 1 and got.spare_cores == 7


def test_float_near_ties_count_as_ties():
    # 0.1 + 0.2 != 0.3 in floats: one core at 0.30000000000000004 ties two at 0.3
    table = {1: {1: 0.1 + 0.2}, 2: {1: 0.3}}
    got = allocate([ModelDemand("a", curve(table, 2), 1, slo_ms=0.3)], 2)
    assert got.model("a").cores == 1 and got.spare_cores == 1
    assert got.slo_feasible and got.model("a").slo_met is True


def test_idle_models_hold_no_cores():
    busy = ModelDemand("busy", curve(SCALING, 8), 4)
    idle = ModelDemand("idle", curve(SCALING, 8), 0, slo_ms=10.0)
    got = allocate([idle, busy], 8)
    assert [m.name for m in got.models] == ["idle", "busy"]  # the order given
    assert got.model("idle").shared and got.model("idle").plan is None
    assert got.model("idle").slo_met is None and got.slo_feasible  # idle: nothing to judge
    assert got.model("busy").cores == 8
    data = got.to_json()
    assert data["models"]["idle"] == {"batch": 0, "cores": 0, "shared": True, "slo_ms": 10.0,
                                      "slo_met": None, "plan": None}
    nobody = allocate([idle], 8)
    assert nobody.spare_cores == 8 and nobody.weighted_latency_ms is None


def test_json_shape():
    got = allocate([ModelDemand("a", curve(SCALING, 4), 2, slo_ms=50.0),
                    ModelDemand("b", curve(SCALING, 4), 0)], 4)
    data = got.to_json()
    assert set(data) >= {"cores", "spare_cores", "slo_feasible", "weighted_latency_ms", "models"}
    assert data["cores"] == 4 and data["spare_cores"] == 0 and data["slo_feasible"] is True
    assert data["models"]["a"] == {
        "batch": 2, "cores": 4, "shared": False, "slo_ms": 50.0, "slo_met": True,
        "plan": {"instances": [{"threads": 4, "batch": 2}], "latency_ms": 30.0}}
    assert data["weighted_latency_ms"] == 30.0


@pytest.mark.parametrize(
    "demands,cores,message",
    [
        (lambda c: [ModelDemand("a", c, 1), ModelDemand("b", c, 1), ModelDemand("c", c, 1)], 2,
         "3 busy models need a dedicated core each but there are only 2 cores"),
        (lambda c: [ModelDemand("a", c, 1), ModelDemand("a", c, 2)], 2, "given twice"),
        (lambda c: [ModelDemand("a", c, 21)], 2, "B=21 cannot be served on 2 cores"),
        (lambda c: [ModelDemand("a", c, 1)], 0, "cores must be"),
    ],
)
def test_errors_are_one_line(demands, cores, message):
    c = curve({1: {10: 5.0}}, 2)
    with pytest.raises(PlanError, match=message) as e:
        allocate(demands(c), cores)
    assert "\n" not in str(e.value)


def test_demand_validation():
    c = curve({1: {10: 5.0}}, 2)
    with pytest.raises(PlanError, match="batch must be an integer >= 0"):
        ModelDemand("a", c, -1)
    for bad in (0.0, -5.0, math.inf, math.nan, True):
        with pytest.raises(PlanError, match="SLO must be a positive number"):
            ModelDemand("a", c, 1, slo_ms=bad)
    with pytest.raises(PlanError, match="non-empty"):
        ModelDemand("", c, 1)


def test_models_that_cannot_all_be_served():
    # each needs 2 threads (no 1-thread point) and both are busy on 3 cores
    c = curve({2: {4: 5.0}}, 3)
    with pytest.raises(PlanError, match=r"need 4 cores to serve their batches at all \(a 2, b 2\)"):
        allocate([ModelDemand("a", c, 1), ModelDemand("b", c, 1)], 3)


# -- splits and the cost view ------------------------------------------------------------------

def test_even_and_proportional_splits():
    c = curve(SCALING, 16)
    demands = [ModelDemand("a", c, 8), ModelDemand("b", c, 4), ModelDemand("c", c, 2),
               ModelDemand("d", c, 2), ModelDemand("idle", c, 0)]
    assert even_split(demands, 16) == (4, 4, 4, 4, 0)
    assert even_split(demands[:3], 16) == (6, 5, 5, 0)[:3]  # the remainder to the busiest
    assert proportional_split(demands, 16) == (8, 4, 2, 2, 0)
    # a tiny load still gets one core; the floor is taken back from the furthest over quota
    skewed = [ModelDemand("big", c, 100), ModelDemand("tiny", c, 1), ModelDemand("t2", c, 1)]
    assert proportional_split(skewed, 4) == (2, 1, 1)
    # largest remainder: quotas 16 * (5, 3, 2) / 10 = 8, 4.8, 3.2
    mixed = [ModelDemand("a", c, 5), ModelDemand("b", c, 3), ModelDemand("c", c, 2)]
    assert proportional_split(mixed, 16) == (8, 5, 3)
    split = evaluate_split(demands, (4, 4, 4, 4, 0), 16)
    assert split.weighted_latency_ms == pytest.approx(30.0)
    assert allocate(demands, 16).weighted_latency_ms <= split.weighted_latency_ms
    with pytest.raises(PlanError, match="busy model needs >= 1"):
        evaluate_split(demands, (4, 4, 4, 0, 4), 16)


@pytest.mark.parametrize("seed", range(3))
def test_cores_for_slo_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(60):
        cores = rng.randint(1, 8)
        table = random_table(rng, cores)
        c = curve(table, cores)
        batch = rng.randint(1, 8)
        slo = float(rng.randint(1, 45))
        lats = {n: best_served(table, n, batch) for n in range(1, cores + 1)}
        if math.isinf(lats[cores]):
            with pytest.raises(PlanError, match="cannot be served"):
                cores_for_slo(c, batch, slo)
            continue
        got = cores_for_slo(c, batch, slo)
        meeting = [n for n in lats if lats[n] <= slo]
        assert got.cores == (min(meeting) if meeting else None)
        assert got.met == bool(meeting)
        if meeting:
            assert got.plan.latency_ms == lats[got.cores] and got.plan.cores == got.cores
        assert got.best_latency_ms == lats[cores]
        assert got.best_cores == min(n for n in lats if lats[n] == lats[cores])


# -- 16 cores, the published profiles ----------------------------------------------------------

@pytest.fixture(scope="module")
def published():
    return {m: read_profile(DATA / f"pytorch_{m}_latency.csv") for m in PUBLISHED}


def test_sixteen_cores_published_profiles_against_brute_force(published):
    curves = {m: ServedCurve.of(p, 16) for m, p in published.items()}
    lat = {m: {b: [None] + [Optimizer(p, n).plan(b).served.latency_ms for n in range(1, 17)]
               for b in (8, 32)} for m, p in published.items()}
    mixes = [
        {"resnet": (8, None), "inception": (8, None), "gpt2": (8, None), "bert": (8, None)},
        {"resnet": (32, 120.0), "inception": (8, None), "gpt2": (8, 150.0), "bert": (8, None)},
        {"resnet": (8, 20.0), "inception": (8, 20.0), "gpt2": (8, 20.0), "bert": (8, 20.0)},
    ]
    for mix in mixes:
        demands = [ModelDemand(m, curves[m], b, slo) for m, (b, slo) in mix.items()]
        got = allocate(demands, 16)
        best = None
        for split in itertools.product(range(1, 14), repeat=4):
            if sum(split) > 16:
                continue
            lats = [lat[m][mix[m][0]][n] for m, n in zip(mix, split)]
            ratios = [x / mix[m][1] for x, m in zip(lats, mix) if mix[m][1] is not None]
            worst = max(ratios, default=0.0)
            key = (max(worst, 1.0), sum(mix[m][0] * x for x, m in zip(lats, mix)), sum(split))
            best = key if best is None or key < best else best
        worst = got.worst_slo_ratio or 0.0
        assert max(worst, 1.0) == pytest.approx(best[0], rel=1e-9)
        assert got.weighted_latency_ms * sum(b for b, _ in mix.values()) == pytest.approx(
            best[1], rel=1e-9)
        assert sum(m.cores for m in got.models) == best[2]
        for split in (even_split(demands, 16), proportional_split(demands, 16)):
            other = evaluate_split(demands, split, 16)
            if other.slo_feasible:
                assert got.slo_feasible
                assert got.weighted_latency_ms <= other.weighted_latency_ms * (1 + 1e-9)
            else:
                assert (got.worst_slo_ratio or 0.0) <= other.worst_slo_ratio * (1 + 1e-9)
    # 20 ms at B = 8 is out of reach on 4 cores each: reported, not hidden
    assert not got.slo_feasible and len(got.missed) >= 1
