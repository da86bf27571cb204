"""Helpers of the tests that run `packrat serve` on a real TorchServe (small-cnn, or the
user-style archives); the `served` fixture is in conftest.py."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from packrat.measure.cpus import usable_cores
from packrat.measure.loadgen import ClosedLoop
from packrat.serving.rundir import RunDir
from packrat.torchserve import TorchServeClient, load_settings

CORES = usable_cores()
# `packrat serve --cores N_SERVE` in the tests: it takes the first N_SERVE usable cores, so the
# figures below hold on a machine with any number of cores (at least N_SERVE).
N_SERVE = 2
SERVE_CORES = CORES[:N_SERVE]
# A profile written for the test, so plans are known: with 2 cores, one 2-thread instance is
# best for B = 1 and two 1-thread instances (of batch B/2, rounded up) for B >= 2; the largest
# batch served is PROFILE_MAX_BATCH per 1-thread instance. Batching pays, as in real CNNs, and
# by enough that the policy leaves the plan for B = 1 at B = 2, 4, 6, 7 and 8 even where the
# target's batches wait max_batch_delay (10 ms) to fill: 8 closed-loop clients hold 7 or 8
# requests in TorchServe.
PROFILE = """threads,batch,latency_ms
1,1,6.0
1,2,8.0
1,4,12.0
1,8,20.0
2,1,4.0
2,2,6.4
2,4,10.4
2,8,18.0
"""
PROFILE_MAX_BATCH = 8


def on_cores(cores):
    """preexec_fn for a subprocess that must see only `cores` (its affinity mask, which
    usable_cores reads): a command without --cores then plans for those alone."""
    return lambda: os.sched_setaffinity(0, cores)


def packrat(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "packrat.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def status(run):
    out = packrat("status", "--run-dir", run, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def start_serve(run, model, *args, log, env=None, timeout=300):
    """`packrat serve --run-dir RUN ARGS`, its output in the file `log`, once it serves
    `model`; if it exits first, fail at once with the end of its log."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "packrat.cli", "serve", "--run-dir",
                                 str(run), *map(str, args)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)

    def registered():
        if proc.poll() is not None:
            raise AssertionError(f"packrat serve exited {proc.returncode}:\n"
                                 f"{Path(log).read_text()[-3000:]}")
        return (Path(run) / "state.json").is_file() and status(run)["models"][model]["version"]

    wait_for(registered, timeout=timeout, what=f"packrat serve to register {model}")
    return proc


def stop_serve(proc, run) -> str:
    """`packrat stop` if it still runs, then wait for it; what stop printed."""
    said = ""
    if proc.poll() is None:
        out = packrat("stop", "--run-dir", run)
        assert out.returncode == 0, out.stderr
        said = out.stdout
    proc.wait(timeout=120)
    return said


def loopback_properties(ports, extra=""):
    """A user's config.properties: every listener on loopback at the given ports."""
    return (f"inference_address=http://127.0.0.1:{ports.inference}\n"
            f"management_address=http://127.0.0.1:{ports.management}\n"
            f"metrics_address=http://127.0.0.1:{ports.metrics}\n"
            f"grpc_inference_port={ports.grpc_inference}\n"
            f"grpc_management_port={ports.grpc_management}\n" + extra)


def wait_for(predicate, timeout=90, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def wait_answered(load, n, timeout=90):
    """Wait until a load generator has had n requests answered (an event, not a duration)."""
    try:
        wait_for(lambda: load.result.answered >= n, timeout=timeout, what=f"{n} answered requests")
    except AssertionError as e:
        r = load.result
        raise AssertionError(f"{e}: answered {r.answered}, failed {r.failures[:3]} "
                             f"({len(r.failures)}), unanswered {r.unanswered[:3]} "
                             f"({len(r.unanswered)})") from None


def assert_pinned(model_status, instances, threads):
    plan = model_status["plan"]["instances"]
    assert len(plan) == instances
    seen = set()
    for inst in plan:
        assert inst["pid"], inst
        assert inst["threads"] == threads and len(inst["planned_cores"]) == threads, inst
        assert inst["cores"] == inst["planned_cores"], inst  # /proc/PID/status Cpus_allowed_list
        assert not seen & set(inst["cores"])  # disjoint
        seen |= set(inst["cores"])
    assert seen <= set(SERVE_CORES)  # `packrat serve --cores 2` uses these alone


def load_for(run, example):
    client = TorchServeClient(load_settings(RunDir(run).torchserve))
    body = example.read_bytes()
    return ClosedLoop(lambda: client.predict("small-cnn", body, timeout_s=60), timeout_s=60)
