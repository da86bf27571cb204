"""Helpers of the tests that run `packrat serve` on a real TorchServe with small-cnn; the
`served` fixture is in conftest.py."""

import json
import subprocess
import sys
import time

from packrat.measure.cpus import usable_cores
from packrat.measure.loadgen import ClosedLoop
from packrat.serving.rundir import RunDir
from packrat.torchserve import TorchServeClient, load_settings

CORES = usable_cores()
# A profile written for the test, so plans are known: with 2 cores, one 2-thread instance is
# best for B = 1 and two 1-thread instances of batch B/2 for B >= 2.
PROFILE = """threads,batch,latency_ms
1,1,3.5
1,2,7.0
1,4,14.0
1,8,28.0
2,1,2.0
2,2,4.0
2,4,8.0
2,8,16.0
"""


def packrat(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "packrat.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def status(run):
    out = packrat("status", "--run-dir", run, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_for(predicate, timeout=90, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def assert_pinned(model_status, instances, threads):
    plan = model_status["plan"]["instances"]
    assert len(plan) == instances
    seen = set()
    for inst in plan:
        assert inst["pid"], inst
        assert inst["threads"] == threads
        assert inst["cores"] == inst["planned_cores"], inst  # /proc/PID/status Cpus_allowed_list
        assert not seen & set(inst["cores"])  # disjoint
        seen |= set(inst["cores"])
    assert seen <= set(CORES)


def load_for(run, example):
    client = TorchServeClient(load_settings(RunDir(run).torchserve))
    body = example.read_bytes()
    return ClosedLoop(lambda: client.predict("small-cnn", body, timeout_s=60), timeout_s=60)
