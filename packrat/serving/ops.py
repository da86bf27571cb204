"""What the other commands do to a running `packrat serve`: stop it, ask it for a plan
(`packrat reconfigure`) and read what it serves (`packrat status`)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import psutil

from packrat.errors import PackratError
from packrat.serving.rundir import RunDir, controller_pid, read_json, write_json
from packrat.torchserve import find_server, stop_server


def stop(run_dir: Path, timeout_s: float = 60) -> str:
    run = RunDir(run_dir)
    pid = controller_pid(run)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while controller_pid(run) is not None:
            if time.monotonic() > deadline:
                raise PackratError(f"controller {pid} did not stop in {timeout_s:.0f} s")
            time.sleep(0.2)
        return f"stopped the controller (pid {pid}) and its TorchServe"
    server = find_server(run.torchserve)
    if server is not None:
        stop_server(server)
        return f"no controller ran; stopped TorchServe (pid {server.frontend_pid})"
    return f"nothing runs on {run.path}"


def reconfigure(run_dir: Path, request: dict, timeout_s: float = 600) -> dict:
    run = RunDir(run_dir)
    if controller_pid(run) is None:
        raise PackratError(f"no packrat controller runs on {run.path}; start `packrat serve` first")
    rid = uuid.uuid4().hex
    path = run.requests / f"{rid}.json"
    write_json(path, request)
    result = run.requests / f"{rid}.result.json"
    deadline = time.monotonic() + timeout_s
    while not result.is_file():
        if time.monotonic() > deadline:
            path.unlink(missing_ok=True)
            raise PackratError(f"the controller did not answer in {timeout_s:.0f} s; see {run.log_file}")
        if controller_pid(run) is None:
            raise PackratError(f"the controller stopped before answering; see {run.log_file}")
        time.sleep(0.2)
    answer = read_json(result, {})
    result.unlink(missing_ok=True)
    return answer


# -- status ----------------------------------------------------------------------------------

def cpus_allowed(pid: int) -> list[int]:
    """The cores a process may run on, as it really is ([] if it is gone)."""
    try:
        return sorted(psutil.Process(pid).cpu_affinity())
    except psutil.Error:
        return []


def status(run_dir: Path) -> dict:
    run = RunDir(run_dir)
    if not run.state_file.is_file():
        raise PackratError(f"{run.path} holds no Packrat state; is `packrat serve --run-dir {run.path}` running?")
    state = read_json(run.state_file, None)
    if not isinstance(state, dict) or not isinstance(state.get("models", {}), dict):
        raise PackratError(f"{run.state_file} is not a Packrat state file; stop what runs there "
                           f"(`packrat stop --run-dir {run.path}`) and serve again")
    server = find_server(run.torchserve)
    now = time.time()
    models = {}
    for name, st in state.get("models", {}).items():
        version = st.get("version")
        plan = run.read_plan(name, version) if version else None
        instances = []
        if plan is not None:
            pids = run.slot_pids(name, version)  # the live worker holding each slot
            for k, slot in enumerate(plan.slots):
                pid = pids.get(k)
                instances.append({
                    "threads": plan.threads, "batch": plan.batch_size,
                    "cores": cpus_allowed(pid) if pid else [], "planned_cores": list(slot),
                    "pid": pid,
                })
        last = st.get("last_reconfiguration_unix")
        models[name] = {
            "version": version,
            "estimated_batch": st.get("estimated_batch", 1),
            "auto": st.get("auto", True),
            "plan": {"instances": instances,
                     "latency_ms": round(plan.predicted_ms, 3) if plan else None},
            "reconfigurations": st.get("reconfigurations", 0),
            "last_reconfiguration_s": round(now - last, 1) if last else None,
            "last_error": st.get("last_error"),
            "calibration": st.get("calibration"),
            "switching": st.get("switching"),  # a switch under way, and its step
        }
    return {
        "controller_pid": controller_pid(run),
        "torchserve_pid": server.frontend_pid if server else None,
        "torchserve_restarts": state.get("torchserve_restarts", 0),
        "torchserve_event": state.get("torchserve_event"),
        "models": models,
    }
