"""`packrat bench`: the oracle's configurations (pure), and a short real run on TorchServe."""

import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import requests

from packrat.bench.configs import (
    Config,
    RoundResult,
    baseline_config,
    build_row,
    default_config,
    oracle_configs,
    percentile,
    rotated,
    round_result,
    summarize,
)
from packrat.core.optimizer import Optimizer
from packrat.core.policy import plan_for_batch
from packrat.core.profile import Profile, ProfilePoint
from packrat.errors import TorchServeError
from packrat.measure.loadgen import measure_closed_loop
from packrat.serving.rundir import RunDir
from packrat.torchserve import server_processes, torchserve_command
from tests.conftest import require


def C(t, i, b):
    return Config(t, i, b)


def test_oracle_configs_two_cores():
    assert oracle_configs(2, 1) == (C(1, 1, 1), C(2, 1, 1))  # a 2nd 1-thread worker would idle
    assert oracle_configs(2, 4) == (C(1, 1, 4), C(1, 2, 2), C(2, 1, 4))
    assert oracle_configs(2, 5) == (C(1, 1, 5), C(1, 2, 3), C(2, 1, 5))


def test_oracle_configs_four_cores():
    assert oracle_configs(4, 1) == tuple(C(t, 1, 1) for t in (1, 2, 3, 4))
    assert oracle_configs(4, 2) == (C(1, 1, 2), C(1, 2, 1), C(2, 1, 2), C(2, 2, 1),
                                    C(3, 1, 2), C(4, 1, 2))
    # B = 3: four 1-thread workers of batch 1 leave one idle, so that is 3x<t=1,b=1>
    assert oracle_configs(4, 3) == (C(1, 1, 3), C(1, 2, 2), C(1, 3, 1), C(2, 1, 3), C(2, 2, 2),
                                    C(3, 1, 3), C(4, 1, 3))
    eight = oracle_configs(4, 8)
    assert eight == (C(1, 1, 8), C(1, 2, 4), C(1, 3, 3), C(1, 4, 2), C(2, 1, 8), C(2, 2, 4),
                     C(3, 1, 8), C(4, 1, 8))
    for cfg in eight:  # every one serves B on at most N cores, one batch per worker
        assert cfg.threads * cfg.instances <= 4
        assert cfg.instances * cfg.batch_size >= 8 > (cfg.instances - 1) * cfg.batch_size


@pytest.mark.parametrize("cores", [2, 4])
def test_packrat_and_baseline_configs_are_oracle_candidates(cores):
    points = [ProfilePoint(t, b, 10.0 * b / t ** 0.6 + t) for t in range(1, cores + 1)
              for b in (1, 2, 4, 8, 16)]
    opt = Optimizer(Profile(tuple(points)), cores)
    for batch in range(1, 17):
        plan = plan_for_batch(opt, "m", "1", batch, tuple(range(cores)))
        configs = oracle_configs(cores, batch)
        assert Config(plan.threads, plan.instances, plan.batch_size) in configs
        assert baseline_config(cores, batch) in configs
        assert default_config(cores, batch) not in configs  # unpinned: not a Packrat config


def test_rounds_windows_and_rows():
    assert rotated([1, 2, 3], 0) == [1, 2, 3] and rotated([1, 2, 3], 4) == [2, 3, 1]
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5.0], 99) == 5.0
    # sent before the window: not a latency sample; answered after it: not throughput
    r = round_result([(0.0, 0.5), (1.0, 1.2), (1.5, 1.6), (1.9, 2.4)], 1.0, 2.0)
    assert r.answered == 3 and r.p50_ms == pytest.approx(200.0)
    assert r.throughput_rps == pytest.approx(2.0)

    points = [ProfilePoint(1, 1, 10.0), ProfilePoint(1, 2, 20.0), ProfilePoint(2, 1, 6.0),
              ProfilePoint(2, 2, 11.0)]
    opt = Optimizer(Profile(tuple(points)), 2)

    def rounds(*p50s):
        return [RoundResult(p, p * 1.5, 100.0 / p, 10, 0, 1.0) for p in p50s]

    measured = {C(1, 1, 2): rounds(25, 21, 22), C(1, 2, 1): rounds(12, 13, 30),
                C(2, 1, 2): rounds(14, 12, 15), C(None, 2, 2): rounds(20, 20, 20)}
    row = build_row("m", 2, 2, opt, C(1, 2, 1), measured, 10.0)
    assert row.packrat.latency_ms == 13 and row.baseline.latency_ms == 14
    assert row.oracle.plan == "2x<t=1,b=1>" and row.oracle.latency_ms == 13
    assert row.torchserve_default.plan == "2x<unpinned,b=2>"
    assert row.speedup == pytest.approx(14 / 13, abs=1e-4) and row.vs_oracle == 1.0
    assert row.ideal_ms == 10.0 and row.baseline.predicted_ms == 11.0
    data = row.to_json()
    json.dumps(data, allow_nan=False)
    # bench.json's format: the same keys as the attributes, the role entries without rounds
    assert list(data) == ["model", "batch", "cores", "packrat", "baseline", "torchserve_default",
                          "oracle", "ideal_ms", "calibration", "dp_optimal", "speedup",
                          "vs_oracle", "configs"]
    assert data["packrat"] == {"plan": "2x<t=1,b=1>", "latency_ms": 13, "p99_ms": 19.5,
                               "throughput_rps": 7.692, "answered": 30, "failed": 0,
                               "disturbed_rounds": 0, "predicted_ms": 10.0}
    assert "predicted_ms" not in data["torchserve_default"]
    assert [c["plan"] for c in data["configs"]] == [
        "1x<t=1,b=2>", "2x<t=1,b=1>", "1x<t=2,b=2>", "2x<unpinned,b=2>"]
    assert data["configs"][1]["rounds"][2]["p50_ms"] == 30


def test_percentiles_match_numpy_on_spread_data():
    data = [7.0, 1.0, 3.0, 100.0, 2.0, 5.0, 4.0, 6.0, 9.0, 8.0, 250.0]
    for q in (0, 1, 25, 50, 90, 99, 100):
        assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))
    assert percentile(data, 50) == 6.0 and percentile(data, 99) == pytest.approx(235.0)
    # latencies of 1..100 ms, sent in the window [0, 1000) in shuffled order
    lat = [(k * 37) % 100 + 1 for k in range(100)]
    assert sorted(lat) == list(range(1, 101))
    samples = [(k * 0.01, k * 0.01 + ms / 1000.0) for k, ms in enumerate(lat)]
    r = round_result(samples, 0.0, 1000.0)
    assert r.p50_ms == pytest.approx(50.5) and r.p99_ms == pytest.approx(99.01)
    assert r.p99_ms == pytest.approx(float(np.percentile(lat, 99)))
    # a summary: the median over rounds of each round's p50 and p99, not the max or the mean;
    # a round with no answer (nan) does not count
    rounds = [RoundResult(10.0, 40.0, 5.0, 10, 0, 1.0), RoundResult(30.0, 90.0, 3.0, 10, 1, 1.0),
              RoundResult(12.0, 20.0, 4.0, 10, 0, 1.0, foreign_cores=5.0),
              RoundResult(math.nan, math.nan, 0.0, 0, 2, 1.0)]
    s = summarize(rounds)
    assert (s.latency_ms, s.p99_ms, s.throughput_rps) == (12.0, 40.0, 3.5)
    assert (s.answered, s.failed, s.disturbed_rounds) == (30, 3, 1)


def test_oracle_is_the_servable_config_of_lowest_median_latency():
    points = [ProfilePoint(1, 1, 10.0), ProfilePoint(1, 2, 20.0), ProfilePoint(2, 1, 6.0),
              ProfilePoint(2, 2, 11.0)]
    opt = Optimizer(Profile(tuple(points)), 2)

    def rounds(p50s, p99s):
        return [RoundResult(p, q, 100.0 / p, 10, 0, 1.0) for p, q in zip(p50s, p99s)]

    # By median p50 2x<t=1,b=1> is fastest; by the fastest round 1x<t=1,b=2> would be, by the
    # mean 1x<t=2,b=2>; TorchServe's default is faster still but not a servable configuration.
    measured = {C(1, 1, 2): rounds([9, 30, 31], [12, 40, 41]),
                C(1, 2, 1): rounds([18, 19, 40], [50, 25, 60]),
                C(2, 1, 2): rounds([20, 21, 22], [30, 31, 32]),
                C(None, 2, 2): rounds([5, 5, 5], [6, 6, 6])}
    row = build_row("m", 2, 2, opt, C(1, 1, 2), measured, 10.0)
    medians = {cfg: float(np.median([r.p50_ms for r in rs])) for cfg, rs in measured.items()}
    servable = [cfg for cfg in measured if cfg in oracle_configs(2, 2)]
    assert set(servable) == set(oracle_configs(2, 2))
    assert min(servable, key=medians.get) == C(1, 2, 1) == row.oracle.config
    assert row.oracle.plan == "2x<t=1,b=1>" and row.oracle.latency_ms == 19
    assert row.oracle.stats.p99_ms == 50 and row.oracle.stats.answered == 30
    assert row.packrat.plan == "1x<t=1,b=2>" and row.packrat.latency_ms == 30
    assert row.vs_oracle == pytest.approx(30 / 19, abs=1e-4)
    assert row.baseline.latency_ms == 21 and row.torchserve_default.latency_ms == 5
    data = row.to_json()
    entry = next(c for c in data["configs"] if c["plan"] == data["oracle"]["plan"])
    assert data["oracle"] == {k: entry[k] for k in data["oracle"]}
    assert data["oracle"]["latency_ms"] == 19 and data["oracle"]["p99_ms"] == 50


def test_measure_closed_loop_accounts_for_every_request():
    calls = itertools.count()

    class Answer:
        def __init__(self, status):
            self.status_code, self.text = status, "queue full"

    def send():
        k = next(calls)
        time.sleep(0.002)  # the server's time per request
        if k % 5 == 4:
            return Answer(503)
        if k % 7 == 6:
            raise requests.ConnectionError("dropped")
        return Answer(200)

    class Watch:
        started = None

        def start(self):
            self.started = time.perf_counter()

        def cores(self):
            return 0.5

    watch = Watch()
    m = measure_closed_loop(send, clients=3, warmup_s=0.05, seconds=0.2, timeout_s=5,
                            watch=watch)
    assert len(m.samples) + len(m.failures) + len(m.unanswered) == next(calls)
    assert m.failures and all(f.startswith("HTTP 503: queue full") for f in m.failures)
    assert m.unanswered and all("dropped" in u for u in m.unanswered)
    assert m.lost == len(m.failures) + len(m.unanswered)
    assert watch.started <= m.start < m.end and m.foreign_cores == 0.5
    window = m.latencies_ms()  # sent in the window only, not during the warm-up
    assert 0 < len(window) < len(m.samples) and all(ms >= 2.0 for ms in window)


def test_start_tries_fresh_ports_only_when_one_was_taken(monkeypatch):
    import packrat.torchserve as ts
    from packrat.bench.runner import start_on_free_ports

    starts = []

    def start_server(settings):
        starts.append(settings.ports)
        if len(starts) == 1:
            raise TorchServeError("TorchServe exited with status 1 while starting")
        return "server"

    monkeypatch.setattr(ts, "start_server", start_server)
    with pytest.raises(TorchServeError):  # nothing holds its ports: the failure is TorchServe's
        start_on_free_ports(lambda ports: SimpleNamespace(ports=ports))
    assert len(starts) == 1

    starts.clear()
    free, taker = ts.Ports.free, socket.socket()

    def taken_meanwhile():
        ports = free()
        if taker.getsockname()[1] == 0:  # another process takes one of the first five
            taker.bind(("127.0.0.1", ports.management))
            taker.listen()
        return ports

    monkeypatch.setattr(ts.Ports, "free", staticmethod(taken_meanwhile))
    with taker:
        settings, server = start_on_free_ports(lambda ports: SimpleNamespace(ports=ports))
    assert server == "server" and len(starts) == 2 and settings.ports == starts[1] != starts[0]


ROW_KEYS = {"model", "batch", "packrat", "baseline", "torchserve_default", "oracle", "ideal_ms",
            "speedup", "vs_oracle"}


@pytest.mark.integration
@require(shutil.which("java") is not None and torchserve_command() is not None,
         "Java 17 and torchserve")
def test_bench_small_cnn_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PACKRAT_CACHE_DIR": str(tmp_path / "cache")}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "packrat.cli", "bench", "--zoo", "small-cnn", "--batch", "1,4",
             "--rounds", "1", "--seconds", "1", "--quiet-wait", "0", "--json", "--out", str(out)],
            check=False, capture_output=True, text=True, timeout=240, env=env,
        )
    except subprocess.TimeoutExpired:
        # the bench was killed: its TorchServe would outlive the test
        for pid in server_processes(RunDir(out / "run").torchserve):
            os.kill(pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert json.loads((out / "bench.json").read_text()) == rows
    assert [(r["model"], r["batch"]) for r in rows] == [("small-cnn", 1), ("small-cnn", 4)]
    for r in rows:
        assert ROW_KEYS <= set(r), r.keys()
        by_plan = {c["plan"]: c for c in r["configs"]}
        for key in ("packrat", "baseline", "torchserve_default", "oracle"):
            e = r[key]
            assert e["latency_ms"] > 0 and e["throughput_rps"] > 0 and e["failed"] == 0
            # a role's entry is its configuration's one round, as measured
            (only,) = by_plan[e["plan"]]["rounds"]
            assert (e["latency_ms"], e["p99_ms"], e["throughput_rps"], e["answered"]) == (
                only["p50_ms"], only["p99_ms"], only["throughput_rps"], only["answered"])
        assert r["baseline"]["plan"] == f"1x<t={r['cores']},b={r['batch']}>"
        assert r["torchserve_default"]["plan"] == f"{r['cores']}x<unpinned,b={r['batch']}>"
        assert r["packrat"]["predicted_ms"] > 0 and r["baseline"]["predicted_ms"] > 0
        assert r["ideal_ms"] > 0  # a bound from the profile: not comparable to measurements
        servable = [c for c in r["configs"] if c["threads"] is not None]
        assert {c["plan"] for c in servable} == {c.describe() for c in oracle_configs(r["cores"], r["batch"])}
        # the oracle: the servable configuration measured fastest (never the unpinned default)
        fastest = min(c["latency_ms"] for c in servable)
        assert r["oracle"]["plan"] in {c["plan"] for c in servable if c["latency_ms"] == fastest}
        assert r["packrat"]["plan"] in {c["plan"] for c in servable}
        assert math.isclose(r["vs_oracle"], r["packrat"]["latency_ms"] / fastest, rel_tol=1e-3)
        assert math.isclose(
            r["speedup"], r["baseline"]["latency_ms"] / r["packrat"]["latency_ms"], rel_tol=1e-3)
    assert "round 1/1" in proc.stderr  # progress
    assert server_processes(RunDir(out / "run").torchserve) == []
