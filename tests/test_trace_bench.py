"""`packrat bench --trace`: the pure parts (the B of a rate, the scaling to 80% of the best
plan's throughput, the plans held, switch records, the JSON and the table), the standby
memory watch, its CLI errors, the plot from fake results, and one end-to-end run on small-cnn
(real TorchServe)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from packrat.bench.configs import Config
from packrat.bench.trace import (
    CONFIGURATIONS,
    PEAK_FRACTION,
    ConfigResult,
    HeldPlan,
    StandbyMemory,
    SwitchRecord,
    TraceResult,
    baseline_plan,
    batch_for_rate,
    best_throughput,
    load_trace,
    plan_throughput,
    rated,
    reactions,
    read_switches,
    static_plan,
    ts_config_text,
    warmup_seconds,
)
from packrat.bench.trace_serve import StandbyWatch
from packrat.cli import build_parser
from packrat.cli.bench import render_trace
from packrat.core.optimizer import Optimizer
from packrat.core.profile import Profile, ProfilePoint
from packrat.core.trace import Step, Trace, arrivals
from packrat.errors import PackratError
from packrat.measure.memory import pss_mb
from packrat.measure.openloop import OpenLoopResult, Outcome, RequestRecord
from packrat.serving.rundir import RunDir
from packrat.torchserve import Ports, server_processes
from packrat.torchserve.endpoints import ApiAddress, is_loopback
from packrat.torchserve.userconfig import read_user_config
from tests.conftest import TORCHSERVE, has_torchserve, require
from tests.serving import CORES, N_SERVE

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# 2 cores. Served plans: B=1 1x<t=2,b=1> 6 ms (167 rps); B=2 2x<t=1,b=1> 10 ms (200 rps);
# B=4 2x<t=1,b=2> 16 ms (250 rps); B=8 2x<t=1,b=4> 28 ms (286 rps); B=16 2x<t=1,b=8> 50 ms
# (320 rps, the best); t=2 serves b=8 in 30 ms.
TABLE = {1: {1: 10.0, 2: 16.0, 4: 28.0, 8: 50.0}, 2: {1: 6.0, 2: 10.0, 4: 17.0, 8: 30.0}}
OPT = Optimizer(Profile(tuple(ProfilePoint(t, b, x) for t, r in TABLE.items()
                              for b, x in r.items())), 2)


def test_throughput_of_a_batch_is_b_over_its_served_latency():
    assert plan_throughput(OPT, 1) == pytest.approx(1000 / 6)
    assert plan_throughput(OPT, 8) == pytest.approx(8000 / 28)
    assert best_throughput(OPT) == (pytest.approx(320.0), 16)


def test_batch_for_a_rate_is_the_smallest_that_keeps_up():
    assert batch_for_rate(OPT, 100) == 1
    assert batch_for_rate(OPT, 1000 / 6) == 1   # exactly covered
    assert batch_for_rate(OPT, 170) == 2
    assert batch_for_rate(OPT, 250) == 4
    assert batch_for_rate(OPT, 256) == 8        # 80% of 320
    assert batch_for_rate(OPT, 320) == 16
    assert batch_for_rate(OPT, 1e6) == 16       # nothing keeps up: the best plan's B


def test_shapes_are_scaled_to_80_percent_of_the_best_throughput_csv_as_given(tmp_path):
    base, is_shape = load_trace("step", 30, seed=0)
    assert is_shape and base.duration_s == 30
    trace = rated(base, is_shape, OPT)
    assert trace.peak_rps == pytest.approx(PEAK_FRACTION * 320)
    assert trace.mean_rps == pytest.approx(0.5 * PEAK_FRACTION * 320)  # 25%, 100%, 25%
    assert load_trace("bursty", None, seed=3)[0].duration_s == 180    # the default length
    csv = tmp_path / "t.csv"
    csv.write_text("seconds,rps\n0,5\n10,50\n")
    given, is_shape = load_trace(str(csv), None, seed=0)
    assert not is_shape and rated(given, is_shape, OPT) is given
    assert given.peak_rps == 50 and given.duration_s == 20
    with pytest.raises(PackratError, match="neither a shape"):
        load_trace(str(tmp_path / "missing.csv"), None, 0)


def test_the_held_plans():
    base = baseline_plan(OPT, 256)  # the peak's B on one all-cores instance
    assert base.config == Config(2, 1, 8) and base.predicted_ms == 30.0
    assert base.to_json() == {"instances": [{"threads": 2, "batch": 8}], "latency_ms": 30.0}
    assert static_plan(OPT, 128).config == Config(2, 1, 1)  # B = 1 keeps up with 128 rps
    static = static_plan(OPT, 240)   # B = 4: the optimizer's served plan for it
    assert static.config == Config(1, 2, 2) and static.predicted_ms == 16.0
    assert static.to_json()["instances"] == [{"threads": 1, "batch": 2}] * 2
    # a batch the all-cores row has no figure for: predicted None
    assert baseline_plan(OPT, 310).to_json() == {"instances": [{"threads": 2, "batch": 16}],
                                                 "latency_ms": None}


def test_switch_records_from_switches_jsonl(tmp_path):
    since = 1_700_000_000.0

    def line(**kw):
        d = {"model": "m", "reason": "auto", "ok": True, "at_unix": since + 5, "seconds": 2.5,
             "warm": False, "version": "3", "plan": {"instances": 2, "threads": 1, "batch": 4}}
        return json.dumps({**d, **kw})

    path = tmp_path / "switches.jsonl"
    path.write_text("\n".join([
        line(at_unix=since - 1),                      # during the warm-up: left out
        line(at_unix=since + 41.25, warm=True, seconds=0.5,
             plan={"instances": 1, "threads": 2, "batch": 1}),
        line(),
        line(reason="manual"),                        # packrat reconfigure: left out
        line(ok=False),                               # failed: left out
        line(model="other"),
        "{not json", "",
    ]) + "\n")
    got = read_switches(path, "m", since)
    assert got == (SwitchRecord(5.0, 2.5, False, Config(1, 2, 4)),
                   SwitchRecord(41.25, 0.5, True, Config(2, 1, 1)))
    assert got[0].to_json() == {"at_s": 5.0, "seconds": 2.5, "warm": False,
                                "to": {"instances": [{"threads": 1, "batch": 4}] * 2}}
    assert read_switches(tmp_path / "none.jsonl", "m", since) == ()


def _records(lat_ms, start=0.0, gap=0.1):
    return tuple(RequestRecord(k, start + k * gap, Outcome.ANSWERED, 0.0, x)
                 for k, x in enumerate(lat_ms))


def _fake_result() -> TraceResult:
    trace = Trace("step", 10.0, (Step(0.0, 5.0), Step(4.0, 20.0)))
    load = OpenLoopResult(_records([10.0, 20.0, 30.0, 400.0], gap=2.0), 10.0, 120.0, 64)
    sw = (SwitchRecord(4.2, 1.5, False, Config(1, 2, 4)), SwitchRecord(8.0, 0.5, True,
                                                                       Config(2, 1, 1)))
    configs = {
        "baseline": ConfigResult("baseline", HeldPlan(Config(2, 1, 8), 30.0), load, (), 20.0),
        "static": ConfigResult("static", HeldPlan(Config(1, 2, 2), 16.0), load, ()),
        "packrat-cold": ConfigResult("packrat-cold", None, load, sw[:1], foreign_cores=0.5,
                                     standby=StandbyMemory(0.0, 0.0, 9)),
        "packrat-warm": ConfigResult("packrat-warm", None, load, sw,
                                     standby=StandbyMemory(6000.0, 812.34, 8)),
    }
    return TraceResult("small-cnn", trace, 1, 40.0, "2 x the baseline's p50", configs)


def test_json_shape():
    out = json.loads(json.dumps(_fake_result().to_json()))
    assert out.keys() == {"model", "trace", "duration_s", "seed", "configurations"}
    assert (out["model"], out["trace"], out["duration_s"], out["seed"]) == ("small-cnn", "step",
                                                                            10.0, 1)
    assert list(out["configurations"]) == list(CONFIGURATIONS)
    keys = {"plan", "requests", "failed", "unanswered", "dropped", "mean_ms", "p50_ms", "p99_ms",
            "slo_ms", "slo_attainment", "switches"}
    for name, c in out["configurations"].items():
        assert c.keys() == keys | ({"load_changes", "standby_memory"} if name.startswith("packrat")
                                   else set())
        assert (c["requests"], c["failed"], c["unanswered"], c["dropped"]) == (4, 0, 0, 0)
        assert c["mean_ms"] == 115.0 and c["p50_ms"] == 25.0 and c["slo_ms"] == 40.0
        assert c["slo_attainment"] == 0.75
    assert out["configurations"]["baseline"]["plan"] == {
        "instances": [{"threads": 2, "batch": 8}], "latency_ms": 30.0}
    assert out["configurations"]["packrat-cold"]["plan"] is None
    assert out["configurations"]["packrat-warm"]["switches"][1] == {
        "at_s": 8.0, "seconds": 0.5, "warm": True,
        "to": {"instances": [{"threads": 2, "batch": 1}]}}
    assert out["configurations"]["packrat-warm"]["load_changes"] == [
        {"at_s": 4.0, "rps_from": 5.0, "rps_to": 20.0, "serving_after_s": 1.7}]
    assert out["configurations"]["packrat-warm"]["standby_memory"] == {
        "budget_mb": 6000.0, "max_mb": 812.3, "samples": 8, "honoured": True}
    assert StandbyMemory(100.0, 100.5, 3).honoured is False
    assert StandbyMemory(100.0, None, 0).to_json()["honoured"] is None


def test_load_change_to_new_plan_serving():
    trace = Trace("t", 100.0, (Step(0.0, 2.0), Step(10.0, 10.0), Step(20.0, 11.0),
                               Step(40.0, 2.0), Step(70.0, 8.0)))
    sw = (SwitchRecord(5.0, 1.0, True, Config(1, 2, 1)),    # before any change: not counted
          SwitchRecord(12.0, 0.5, True, Config(1, 2, 4)),   # the first after 10 s
          SwitchRecord(13.0, 0.5, True, Config(1, 2, 8)),   # a second one: not counted
          SwitchRecord(45.0, 20.0, False, Config(2, 1, 1)))  # cold: decided 5 s after 40 s
    got = reactions(trace, sw)
    # 10 -> 11 requests/s at 20 s is no load change; after 70 s no switch came
    assert [(r.at_s, r.rps_from, r.rps_to, r.serving_after_s) for r in got] == [
        (10.0, 2.0, 10.0, 2.5), (40.0, 11.0, 2.0, 25.0), (70.0, 2.0, 8.0, None)]


def test_table():
    text = render_trace(_fake_result())
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["configuration", "plan", "mean"]
    rows = {ln.split()[0]: ln for ln in lines[2:6]}
    assert list(rows) == list(CONFIGURATIONS)
    assert "1x<t=2,b=8>" in rows["baseline"] and "auto" in rows["packrat-warm"]
    assert "75.0%" in rows["static"] and "0/0" in rows["static"]
    assert rows["packrat-warm"].endswith(
        "2 (median 1.0 s, 1 warm); load change to new plan median 1.7 s (1 of 1 changes)")
    assert "disturbed" in lines[-1] and "packrat-cold" in lines[-1]
    assert lines[-2] == ("standby memory at most (PSS, sampled while no switch ran): "
                         "packrat-cold 0 of 0 MB (9 samples); packrat-warm 812 of 6,000 MB "
                         "(8 samples)")


class _Status:
    def __init__(self, version, switching=None):
        self.version, self.switching = version, switching


def test_standby_watch_sums_the_versions_but_the_default_and_skips_switches(tmp_path):
    run = RunDir(tmp_path / "run").create()
    for version in ("1", "2", "3"):  # this process stands in for each version's worker
        slots = run.slot_dir("m", version)
        slots.mkdir(parents=True)
        (slots / "0.lock").write_text(str(os.getpid()))
    (run.model_store / "m-v4").mkdir()  # a version with no live worker: 0 MB
    answers = []
    watch = StandbyWatch(run, "m", 100.0, lambda: answers.pop(0))
    one = pss_mb([os.getpid()])
    answers[:] = [_Status("1"), _Status("1")]
    assert one > 0 and watch.sample() == pytest.approx(2 * one, rel=0.1)  # versions 2 and 3
    answers[:] = [_Status("1", switching="to 2x<t=1,b=1> (version 3): draining")]
    assert watch.sample() is None
    answers[:] = [_Status("1"), _Status("3")]  # a switch came and went during the look
    assert watch.sample() is None
    answers[:] = [None]
    assert watch.sample() is None


@require(HAS_MATPLOTLIB, "matplotlib (the plot extra)")
def test_plot(tmp_path):
    from packrat.bench.trace_plot import plot_trace, window_seconds

    assert window_seconds(10) == 1.0 and window_seconds(180) == 3.0
    path = plot_trace(_fake_result(), tmp_path / "trace.png")
    assert path.stat().st_size > 10_000


def test_config_properties_listen_on_loopback_with_a_large_queue(tmp_path):
    ports = Ports.free()
    conf = tmp_path / "config.properties"
    conf.write_text(ts_config_text(ports))
    cfg = read_user_config(conf)
    assert cfg.get("job_queue_size") == "10000"
    for api in ("inference", "management", "metrics"):
        addr = ApiAddress.parse(cfg.get(f"{api}_address"), api, "test")
        assert addr.is_loopback and addr.port == getattr(ports, api)
    for api in ("grpc_inference", "grpc_management"):
        assert is_loopback(cfg.get(f"{api}_address"))
        assert int(cfg.get(f"{api}_port")) == getattr(ports, api)


def test_warm_up_length():
    assert warmup_seconds(20) == 5.0 and warmup_seconds(100) == 10.0
    assert warmup_seconds(180) == 15.0


@pytest.mark.parametrize("argv, message", [
    (["--zoo", "small-cnn"], "give --batch"),
    (["--zoo", "small-cnn", "--trace", "step", "--batch", "1,2"], "--batch does not go"),
    (["--zoo", "small-cnn", "--batch", "1", "--duration", "5"], "--duration is for --trace"),
    (["--zoo", "small-cnn", "--batch", "1", "--seed", "3"], "--seed is for --trace"),
    (["--zoo", "small-cnn,resnet50", "--trace", "step"], "one model"),
    (["--zoo", "small-cnn", "--trace", "nope"], "neither a shape"),
    (["--zoo", "small-cnn", "--trace", "step", "--duration", "0"], "--duration must be > 0"),
    (["--zoo", "nope", "--trace", "step"], "nope"),
])
def test_cli_errors_before_anything_starts(argv, message, tmp_path):
    args = build_parser().parse_args(["bench", "--out", str(tmp_path / "o"), *argv])
    with pytest.raises(PackratError, match=message):
        args.func(args)
    assert not (tmp_path / "o").exists()


def test_cli_options_reach_the_trace_bench(tmp_path, monkeypatch):
    """Every flag of `packrat bench --trace` reaches TraceOptions (--quiet-wait once did not:
    on a busy machine each measurement then waited the default 120 s)."""
    import packrat.bench.trace as trace_mod

    class Stop(Exception):
        pass

    seen = {}

    def fake_run(options, say):
        seen["options"] = options
        raise Stop

    monkeypatch.setattr(trace_mod, "run_trace_bench", fake_run)
    args = build_parser().parse_args([
        "bench", "--zoo", "small-cnn", "--trace", "step", "--duration", "7", "--seed", "3",
        "--slo-ms", "40", "--cores", "1", "--max-batch", "4", "--max-batch-delay", "3",
        "--quiet-wait", "5", "--no-calibrate", "--out", str(tmp_path / "o")])
    with pytest.raises(Stop):
        args.func(args)
    o = seen["options"]
    assert (o.zoo, o.trace, o.duration_s, o.seed, o.slo_ms, o.cores) == (
        "small-cnn", "step", 7, 3, 40, 1)
    assert (o.max_batch, o.max_batch_delay_ms, o.quiet_wait_s, o.calibrate) == (4, 3, 5, False)


def test_same_seed_same_arrivals():
    trace = rated(load_trace("bursty", 60, seed=4)[0], True, OPT)
    assert arrivals(trace, 4) == arrivals(trace, 4) != arrivals(trace, 5)


# -- end to end ------------------------------------------------------------------------------

@pytest.mark.integration
@require(has_torchserve(), TORCHSERVE)
@require(len(CORES) >= N_SERVE, f"{N_SERVE} usable cores")
@require(HAS_MATPLOTLIB, "matplotlib (the plot extra)")
def test_trace_bench_small_cnn(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PACKRAT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "packrat.cli", "bench", "--zoo", "small-cnn", "--trace", "step",
         "--duration", "12", "--seed", "1", "--json", "--out", str(out), "--cores", str(N_SERVE),
         "--quiet-wait", "5", "--plot", str(tmp_path / "trace.png")],
        check=False, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result == json.loads((out / "trace.json").read_text())
    assert (result["model"], result["trace"], result["duration_s"], result["seed"]) == (
        "small-cnn", "step", 12, 1)
    configs = result["configurations"]
    assert list(configs) == list(CONFIGURATIONS)
    counts = {c["requests"] for c in configs.values()}
    assert len(counts) == 1 and counts.pop() > 0, configs  # the same seed, the same arrivals
    for name, c in configs.items():
        assert c["failed"] == 0 and c["unanswered"] == 0, (name, c)
        assert c["p50_ms"] > 0 and 0 <= c["slo_attainment"] <= 1 and c["slo_ms"] > 0
        for s in c["switches"]:
            assert s.keys() == {"at_s", "seconds", "warm", "to"} and s["to"]["instances"]
    assert configs["baseline"]["plan"]["instances"][0]["threads"] == N_SERVE
    assert configs["static"]["plan"]["instances"]
    assert configs["packrat-cold"]["plan"] is None and configs["packrat-warm"]["plan"] is None
    assert not any(s["warm"] for s in configs["packrat-cold"]["switches"])
    # the standby budget held whenever it was sampled; cold keeps no old version
    cold, warm = (configs[k]["standby_memory"] for k in ("packrat-cold", "packrat-warm"))
    assert cold["budget_mb"] == 0 and cold["max_mb"] in (None, 0), cold
    assert warm["budget_mb"] > 0 and warm["honoured"] is not False, warm
    assert (tmp_path / "trace.png").stat().st_size > 10_000
    for name in CONFIGURATIONS:  # every serve and its TorchServe stopped
        assert server_processes(RunDir(out / "runs" / name).torchserve) == []
    assert "packrat-warm: " in proc.stderr and "s of the trace left" in proc.stderr
