"""Packrat's entry point around a user's handler (packrat.worker.wrapper), run in a fresh
process as a TorchServe worker runs it: it claims a slot, pins and sets the threads before
the handler's module is imported, sets them back after a handler's initialize changed them,
and delegates every call untouched."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import packrat.worker
from packrat.core.plan import ServedPlan
from packrat.measure.cpus import usable_cores
from packrat.model.spec import IDLE_START_FILE, WORKER_FILE
from packrat.worker.priority import may_raise_back
from packrat.worker.slots import WorkerConfig, read_failure

IDLE_START = Path(packrat.worker.__file__).with_name(IDLE_START_FILE)  # as installed

GREEDY_HANDLER = '''
import os

import torch

SEEN_AT_IMPORT = (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"),
                  sorted(os.sched_getaffinity(0)))


class Greedy:
    """Takes every core and thread it can in initialize, as some handlers do."""

    def initialize(self, context):
        torch.set_num_threads(os.cpu_count())
        os.sched_setaffinity(0, range(os.cpu_count()))

    def handle(self, data, context):
        return [{"echo": row["body"], "seen_at_import": list(SEEN_AT_IMPORT)} for row in data]
'''

WORKER = '''
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])  # TorchServe puts the model directory on the path
from ts.context import Context
import torch
from packrat.worker import wrapper

ctx = Context("m", sys.argv[1], {"model": {"modelName": "m"}}, 1, None, "0.12.0")
assert wrapper.handle(None, ctx) is None
answer = wrapper.handle([{"body": "hello"}], ctx)
affinity = set()
for task in Path("/proc/self/task").iterdir():
    affinity |= os.sched_getaffinity(int(task.name))
print(json.dumps({"answer": answer, "threads": torch.get_num_threads(),
                  "affinity": sorted(affinity), "slot": wrapper._worker.slot}))
'''


def test_the_entry_point_pins_before_import_resets_after_initialize_and_delegates(tmp_path):
    cores = usable_cores()
    slot = (cores[-1],)  # one core: a 1-thread instance
    plan = ServedPlan("m", "1", 1, 1, 1, (slot,), 1.0, 1)
    vdir = tmp_path / "m-v1"
    vdir.mkdir()
    (vdir / "greedy_handler.py").write_text(GREEDY_HANDLER)
    config = WorkerConfig(plan, vdir / ".packrat-slots", "greedy_handler")
    (vdir / WORKER_FILE).write_text(json.dumps(config.to_json()))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(WORKER), str(vdir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    threads, omp, affinity_at_import = got["answer"][0]["seen_at_import"]
    assert (threads, omp, affinity_at_import) == (1, "1", list(slot))  # before the import
    assert got["answer"] == [{"echo": "hello", "seen_at_import": [1, "1", list(slot)]}]
    assert got["threads"] == 1 and got["affinity"] == list(slot)  # set back after initialize
    assert got["slot"] == 0
    assert (vdir / ".packrat-slots" / "0.lock").is_file()
    if os.cpu_count() > 1:  # the handler could take more than its slot: it was told
        assert "the handler's initialize changed" in out.stderr


FAILING_HANDLER = '''
class Failing:
    def initialize(self, context):
        raise RuntimeError("weights missing: /nowhere/model.pt")

    def handle(self, data, context):
        return data
'''


def test_a_worker_that_cannot_start_writes_why_for_packrat(tmp_path):
    """TorchServe does not answer a registration made without waiting with the workers'
    failure (it retries them): the slot directory says why instead, for check_workers."""
    plan = ServedPlan("m", "1", 1, 1, 1, ((usable_cores()[-1],),), 1.0, 1)
    vdir = tmp_path / "m-v1"
    vdir.mkdir()
    (vdir / "failing_handler.py").write_text(FAILING_HANDLER)
    slots = vdir / ".packrat-slots"
    assert read_failure(slots) is None
    (vdir / WORKER_FILE).write_text(json.dumps(
        WorkerConfig(plan, slots, "failing_handler").to_json()))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(WORKER), str(vdir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "weights missing" in out.stderr  # TorchServe's log too
    assert read_failure(slots) == "RuntimeError: weights missing: /nowhere/model.pt"


POLICY_HANDLER = '''
import os

import torch


def _seen():
    return {"policy": os.sched_getscheduler(0), "threads": torch.get_num_threads()}


class Watch:
    """Reports the CPU scheduling policy of the thread it runs on."""

    def initialize(self, context):
        self.at_load = _seen()

    def handle(self, data, context):
        return [{"at_load": self.at_load, "now": _seen()} for _ in data]
'''

BACKGROUND_WORKER = '''
import json, os, sys
started = os.sched_getscheduler(0)  # after sitecustomize, before anything of Packrat's
sys.path.insert(0, sys.argv[1])
from ts.context import Context, RequestProcessor
from packrat.worker import wrapper

ctx = Context("m", sys.argv[1], {"model": {"modelName": "m"}}, 1, None, "0.12.0")
assert wrapper.handle(None, ctx) is None
ctx.request_processor = [RequestProcessor({"x-packrat-warm-up": "1"})]
warm = wrapper.handle([{"body": "w"}], ctx)
ctx.request_processor = [RequestProcessor({"content-type": "application/json"})]
real = wrapper.handle([{"body": "r"}], ctx)
idle = [t for t in os.listdir("/proc/self/task") if os.sched_getscheduler(int(t)) == os.SCHED_IDLE]
print(json.dumps({"warm": warm[0], "real": real[0], "main": os.sched_getscheduler(0),
                  "started": started, "idle_threads_after": len(idle)}))
'''


def _run_watch(tmp_path, background: bool, idle_start: bool = False) -> dict:
    """The Watch handler behind the entry point: what it saw at load, on a warm-up request
    and on a real one. idle_start: the version directory has Packrat's sitecustomize.py and
    is on PYTHONPATH, as TorchServe starts a background version's worker."""
    plan = ServedPlan("m", "1", 1, 1, 1, ((usable_cores()[-1],),), 1.0, 1)
    vdir = tmp_path / "m-v1"
    vdir.mkdir()
    (vdir / "watch_handler.py").write_text(POLICY_HANDLER)
    config = WorkerConfig(plan, vdir / ".packrat-slots", "watch_handler", background)
    (vdir / WORKER_FILE).write_text(json.dumps(config.to_json()))
    env = dict(os.environ)
    if idle_start:
        shutil.copyfile(IDLE_START, vdir / "sitecustomize.py")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(vdir), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(BACKGROUND_WORKER), str(vdir)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_background_version_loads_and_warms_up_at_idle_priority_and_serves_normally(tmp_path):
    got = _run_watch(tmp_path, background=True)
    idle = {"policy": os.SCHED_IDLE, "threads": 1}
    assert got["warm"] == {"at_load": idle, "now": idle}  # (the header's case does not matter)
    assert got["real"]["now"] == {"policy": os.SCHED_OTHER, "threads": 1}
    assert got["main"] == os.SCHED_OTHER


def test_a_background_worker_starts_at_idle_priority_where_it_may_raise_it_back(tmp_path):
    got = _run_watch(tmp_path, background=True, idle_start=True)
    may = may_raise_back()
    # Python's own start-up and every import before the handler's load ran at idle priority
    assert got["started"] == (os.SCHED_IDLE if may else os.SCHED_OTHER)
    idle = {"policy": os.SCHED_IDLE, "threads": 1}
    assert got["warm"] == {"at_load": idle, "now": idle}
    # the first real request raised every thread back: real requests run at normal priority
    assert got["real"]["now"] == {"policy": os.SCHED_OTHER, "threads": 1}
    assert got["main"] == os.SCHED_OTHER and got["idle_threads_after"] == 0


def test_the_idle_start_runs_the_sitecustomize_it_shadows(tmp_path):
    ours, theirs = tmp_path / "version", tmp_path / "site"
    ours.mkdir()
    theirs.mkdir()
    shutil.copyfile(IDLE_START, ours / "sitecustomize.py")
    (theirs / "sitecustomize.py").write_text("import os\nos.environ['THEIRS_RAN'] = '1'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ours), str(theirs)])}
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('THEIRS_RAN'))"],
                         capture_output=True, text=True, timeout=60, env=env, cwd=ours)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_a_live_version_loads_and_warms_up_at_normal_priority(tmp_path):
    got = _run_watch(tmp_path, background=False)
    normal = {"policy": os.SCHED_OTHER, "threads": 1}
    assert got["warm"] == {"at_load": normal, "now": normal}
