"""`packrat plan` and profile files as a user meets them: the real console command."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"  # see data/README.md


def packrat(*args):
    return subprocess.run(
        [sys.executable, "-m", "packrat.cli", *map(str, args)], capture_output=True, text=True
    )


def write(tmp_path, text, name="p.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = "threads,batch,latency_ms\n1,1,10\n1,2,19\n2,1,6\n2,2,11\n"


def test_plan_json_single_and_many(tmp_path):
    prof = write(tmp_path, GOOD)
    one = packrat("plan", "--profile", prof, "--cores", 2, "--batch", 2, "--json")
    assert one.returncode == 0, one.stderr
    data = json.loads(one.stdout)
    assert data["batch"] == 2 and data["cores"] == 2
    # two 1-thread instances with b=1 each (10 ms) beat one 2-thread instance with b=2 (11 ms)
    assert data["optimal"] == {"instances": [{"threads": 1, "batch": 1}] * 2, "latency_ms": 10.0}
    assert data["served"]["latency_ms"] == 10.0
    assert data["baseline_latency_ms"] == 11.0
    assert data["speedup"] == pytest.approx(1.1)
    many = packrat("plan", "--profile", prof, "--cores", 2, "--batch", "1,2", "--json")
    assert [d["batch"] for d in json.loads(many.stdout)] == [1, 2]


def test_plan_table_on_published_profile():
    out = packrat("plan", "--profile", DATA / "pytorch_resnet_latency.csv",
                  "--cores", 16, "--batch", "8,1024")
    assert out.returncode == 0, out.stderr
    assert "8x<t=2,b=1>" in out.stdout and "16x<t=1,b=64>" in out.stdout


def test_plan_for_many_more_cores_than_this_machine():
    plans = {}
    for cores in (16, 128):
        out = packrat("plan", "--profile", DATA / "pytorch_bert_latency.csv",
                      "--cores", cores, "--batch", 1024, "--json")
        assert out.returncode == 0, out.stderr
        plans[cores] = json.loads(out.stdout)
    wide = plans[128]["optimal"]
    # planning is arithmetic: 128 cores allow more instances than the 16 profiled ones, and
    # they serve B = 1024 faster
    assert 16 < sum(i["threads"] for i in wide["instances"]) <= 128
    assert sum(i["batch"] for i in wide["instances"]) == 1024
    assert wide["latency_ms"] < plans[16]["optimal"]["latency_ms"]


def test_published_torchserve_format_is_read():
    path = DATA / "torchserve_bert_results.csv"
    out = packrat("plan", "--profile", path, "--cores", 16, "--batch", 32, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    # the baseline is the file's row for one 16-core instance serving 32 (default allocator)
    with open(path) as f:
        row = next(r for r in csv.DictReader(f) if r["cores"] == "16" and r["batch_size"] == "32"
                   and r["allocator"] == "default" and r["instances"] == "1")
    assert data["baseline_threads"] == 16
    assert data["baseline_latency_ms"] == pytest.approx(float(row["mean_ts_latency"]))


@pytest.mark.parametrize(
    "content,args,message",
    [
        (None, ["--cores", 2, "--batch", 1], "does not exist"),
        ("", ["--cores", 2, "--batch", 1], "is empty"),
        ("threads,batch\n1,1\n", ["--cores", 2, "--batch", 1], "unrecognized columns"),
        ("batch,threads,latency_ms\n1,1,3\n", ["--cores", 2, "--batch", 1], "unrecognized columns"),
        ("threads,batch,latency_ms\n1,1,nan\n", ["--cores", 2, "--batch", 1], "latency_ms is 'nan'"),
        ("threads,batch,latency_ms\n1,1,0\n", ["--cores", 2, "--batch", 1], "must be > 0"),
        ("threads,batch,latency_ms\n1,1,-3\n", ["--cores", 2, "--batch", 1], "must be > 0"),
        ("threads,batch,latency_ms\n1,1,x\n", ["--cores", 2, "--batch", 1], "not a number"),
        ("threads,batch,latency_ms\n1,,3\n", ["--cores", 2, "--batch", 1], "is missing"),
        ("threads,batch,latency_ms\n", ["--cores", 2, "--batch", 1], "no measurements"),
        ("threads,batch,latency_ms\n1,1,3\n1,1,4\n", ["--cores", 2, "--batch", 1], "twice"),
        (GOOD, ["--cores", 0, "--batch", 1], "cores must be"),
        (GOOD, ["--cores", -4, "--batch", 1], "cores must be"),
        (GOOD, ["--cores", 2, "--batch", 0], "batch size must be"),
        (GOOD, ["--cores", 2, "--batch", -1], "batch size must be"),
        (GOOD, ["--cores", 2, "--batch", 5], "largest servable batch is 4"),
        (GOOD, ["--cores", 2, "--batch", "x"], "not a list of integers"),
    ],
)
def test_plan_errors_are_one_line(tmp_path, content, args, message):
    prof = tmp_path / "p.csv" if content is None else write(tmp_path, content)
    out = packrat("plan", "--profile", prof, *args)
    assert out.returncode != 0
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_plan_on_a_profile_measured_by_packrat_on_16_cores():
    """tests/data holds `packrat profile` output from a 16-core Xeon server (with metadata)."""
    from packrat.core.profile import read_profile

    profile = read_profile(DATA / "xeon16-resnet50.csv")
    assert profile.meta.cores == tuple(range(16)) and profile.meta.model == "resnet50"
    out = packrat("plan", "--profile", DATA / "xeon16-resnet50.csv", "--cores", 16,
                  "--batch", "1,16", "--json")
    one, sixteen = json.loads(out.stdout)
    assert one["speedup"] == 1.0  # nothing to split
    assert sixteen["speedup"] > 1.5  # 16 one-thread instances beat one 16-thread instance


# -- the cost view: --slo-ms -------------------------------------------------------------------

def test_plan_slo_cost_json_keeps_the_fields_and_adds_the_cost():
    resnet = DATA / "pytorch_resnet_latency.csv"
    out = packrat("plan", "--profile", resnet, "--cores", 16, "--batch", 8, "--slo-ms", 60,
                  "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    plain = json.loads(packrat("plan", "--profile", resnet, "--cores", 16, "--batch", 8,
                               "--json").stdout)
    assert {k: v for k, v in data.items() if k != "slo_cost"} == plain
    # 8x<t=2,b=1> on all 16 cores takes 32 ms; 60 ms needs only 8 cores: 4x<t=2,b=2>
    cost = data["slo_cost"]
    assert cost["met"] is True and cost["cores"] == 8 and cost["slo_ms"] == 60.0
    assert cost["plan"]["instances"] == [{"threads": 2, "batch": 2}] * 4
    assert cost["plan"]["latency_ms"] <= 60.0
    assert cost["best_latency_ms"] == data["served"]["latency_ms"]


def test_plan_slo_cost_out_of_reach_and_text():
    resnet = DATA / "pytorch_resnet_latency.csv"
    out = packrat("plan", "--profile", resnet, "--cores", 16, "--batch", "8,64",
                  "--slo-ms", 60)
    assert out.returncode == 0, out.stderr
    assert "SLO 60 ms at B=8: 8 of 16 cores, 4x<t=2,b=2>" in out.stdout
    assert "SLO 60 ms at B=64: not met on 16 cores; the best is 220.94 ms" in out.stdout
    data = json.loads(packrat("plan", "--profile", resnet, "--cores", 16, "--batch", 8,
                              "--slo-ms", 20, "--json").stdout)
    assert data["slo_cost"]["met"] is False and data["slo_cost"]["cores"] is None
    assert data["slo_cost"]["plan"] is None and data["slo_cost"]["best_cores"] == 16


# -- several models: --models ------------------------------------------------------------------

def spec(**models):
    """name=(model, B[, SLO]) -> NAME=PROFILE:B[:SLO],..."""
    parts = []
    for name, (model, *rest) in models.items():
        parts.append(f"{name}={DATA / f'pytorch_{model}_latency.csv'}:" + ":".join(map(str, rest)))
    return ",".join(parts)


def test_plan_models_json_shape():
    models = spec(resnet=("resnet", 8, 60), bert=("bert", 4), gpt2=("gpt2", 0))
    out = packrat("plan", "--models", models, "--cores", 16, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert list(data)[:5] == ["cores", "spare_cores", "slo_feasible", "weighted_latency_ms",
                              "worst_slo_ratio"]
    assert data["cores"] == 16 and data["slo_feasible"] is True and data["missed"] == []
    assert list(data["models"]) == ["resnet", "bert", "gpt2"]
    assert data["models"]["gpt2"] == {"batch": 0, "cores": 0, "shared": True, "slo_ms": None,
                                      "slo_met": None, "plan": None}
    resnet, bert = data["models"]["resnet"], data["models"]["bert"]
    assert set(resnet) == {"batch", "cores", "shared", "slo_ms", "slo_met", "plan"}
    assert resnet["batch"] == 8 and resnet["slo_ms"] == 60.0 and resnet["slo_met"] is True
    assert bert["slo_ms"] is None and bert["slo_met"] is None and not bert["shared"]
    assert resnet["cores"] + bert["cores"] + data["spare_cores"] == 16
    for m in (resnet, bert):
        instances = m["plan"]["instances"]
        assert sum(i["batch"] for i in instances) == m["batch"]
        assert sum(i["threads"] for i in instances) <= m["cores"]
        assert len({i["threads"] for i in instances}) == 1  # one version: one thread count
    assert resnet["plan"]["latency_ms"] <= 60.0
    weighted = (8 * resnet["plan"]["latency_ms"] + 4 * bert["plan"]["latency_ms"]) / 12
    assert data["weighted_latency_ms"] == pytest.approx(weighted, abs=1e-3)


def test_plan_models_text_and_missed_slos():
    models = spec(resnet=("resnet", 8, 30), bert=("bert", 4, 20), gpt2=("gpt2", 0))
    out = packrat("plan", "--models", models, "--cores", 16)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("N = 16 cores:")
    assert any(line.split()[:3] == ["gpt2", "0", "shared"] for line in lines)
    assert "SLOs cannot all be met on 16 cores" in out.stdout
    assert "missed: bert:" in out.stdout
    data = json.loads(packrat("plan", "--models", models, "--cores", 16, "--json").stdout)
    assert data["slo_feasible"] is False
    assert {m["model"] for m in data["missed"]} == {"resnet", "bert"}
    assert data["worst_slo_ratio"] == max(m["ratio"] for m in data["missed"])


def test_plan_models_same_profile_twice_and_idle_only():
    models = spec(a=("resnet", 4), b=("resnet", 4))
    data = json.loads(packrat("plan", "--models", models, "--cores", 4, "--json").stdout)
    assert data["models"]["a"]["cores"] == data["models"]["b"]["cores"] == 2
    idle = json.loads(packrat("plan", "--models", spec(a=("resnet", 0)), "--cores", 4,
                              "--json").stdout)
    assert idle["spare_cores"] == 4 and idle["weighted_latency_ms"] is None


@pytest.mark.parametrize(
    "args,message",
    [
        (["--models", "resnet", "--cores", 4], "is not NAME=PROFILE:B[:SLO_MS]"),
        (["--models", "resnet=p.csv", "--cores", 4], "is not NAME=PROFILE:B[:SLO_MS]"),
        (["--models", "=p.csv:1", "--cores", 4], "is not NAME=PROFILE:B[:SLO_MS]"),
        (["--models", "a=p.csv:1:2:3", "--cores", 4], "is not NAME=PROFILE:B[:SLO_MS]"),
        (["--models", "a=p.csv:x", "--cores", 4], "B is 'x', not an integer"),
        (["--models", "a=p.csv:-1", "--cores", 4], "B must be >= 0"),
        (["--models", "a=p.csv:1:0", "--cores", 4], "an SLO must be a positive number"),
        (["--models", "a=p.csv:1:-5", "--cores", 4], "an SLO must be a positive number"),
        (["--models", "a=p.csv:1:nan", "--cores", 4], "an SLO must be a positive number"),
        (["--models", "a=p.csv:1,a=p.csv:2", "--cores", 4], "'a' is given twice"),
        (["--models", "a=missing.csv:1", "--cores", 4], "does not exist"),
        (["--models", "a=p.csv:1,b=p.csv:1,c=p.csv:1", "--cores", 2],
         "3 busy models need a dedicated core each but there are only 2 cores"),
        (["--models", "a=p.csv:99", "--cores", 2], "B=99 cannot be served on 2 cores"),
        (["--models", "a=p.csv:1", "--profile", "p.csv", "--cores", 2],
         "--models takes the place of --profile"),
        (["--models", "a=p.csv:1", "--batch", 1, "--cores", 2],
         "--models takes the place of --profile"),
        (["--models", "a=p.csv:1", "--slo-ms", 5, "--cores", 2],
         "--models takes the place of --profile"),
        (["--profile", "p.csv", "--cores", 2], "give --profile FILE and --batch B"),
        (["--cores", 2], "give --profile FILE and --batch B, or --models"),
        (["--profile", "p.csv", "--batch", 1, "--slo-ms", 0, "--cores", 2],
         "an SLO must be a positive number"),
        (["--profile", "p.csv", "--batch", 1, "--slo-ms", -3, "--cores", 2],
         "an SLO must be a positive number"),
        (["--profile", "p.csv", "--batch", 1, "--slo-ms", "x", "--cores", 2],
         "is not a number of ms"),
    ],
)
def test_plan_models_errors_are_one_line(tmp_path, monkeypatch, args, message):
    write(tmp_path, GOOD)  # p.csv: 1 or 2 threads, batches up to 2
    monkeypatch.chdir(tmp_path)
    out = packrat("plan", *args)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
