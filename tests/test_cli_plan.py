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
