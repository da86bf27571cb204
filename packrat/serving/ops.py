"""What the other commands do to a running `packrat serve`: stop it, ask it for a plan
(`packrat reconfigure`) and read what it serves (`packrat status`)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

from packrat.core.decide import Reconfigure
from packrat.core.plan import ServedPlan, describe
from packrat.errors import PackratError
from packrat.jsonfile import read_json, write_json
from packrat.serving.rundir import RunDir, controller_pid
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
        if run.attached is not None:
            return (f"stopped the controller (pid {pid}); the TorchServe at "
                    f"{run.attached.management.url} keeps serving the live version")
        return f"stopped the controller (pid {pid}) and its TorchServe"
    if run.attached is not None:  # never the user's TorchServe
        return f"no controller runs on {run.path}; the attached TorchServe was left as it is"
    server = find_server(run.torchserve)
    if server is not None:
        stop_server(server)
        return f"no controller ran; stopped TorchServe (pid {server.frontend_pid})"
    return f"nothing runs on {run.path}"


@dataclass(frozen=True)
class ReconfigureAnswer:
    ok: bool
    message: str
    seconds: float
    plan: ServedPlan | None  # what serves now


def reconfigure(run_dir: Path, request: Reconfigure, timeout_s: float = 600) -> ReconfigureAnswer:
    """Ask the controller of run_dir (its answer comes once a switch has ended)."""
    run = RunDir(run_dir)
    if controller_pid(run) is None:
        raise PackratError(f"no packrat controller runs on {run.path}; start `packrat serve` first")
    rid = uuid.uuid4().hex
    path = run.requests / f"{rid}.json"
    write_json(path, request.to_json())
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
    try:
        plan = ServedPlan.from_json(answer["plan"]) if answer.get("plan") else None
        return ReconfigureAnswer(bool(answer["ok"]), str(answer["message"]),
                                 float(answer.get("seconds", 0.0)), plan)
    except (KeyError, TypeError, ValueError) as e:
        raise PackratError(f"unreadable answer from the controller ({e!r}); see {run.log_file}") from None


# -- status ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerStatus:
    threads: int
    batch: int
    cores: tuple[int, ...]          # where it runs, as the kernel says
    planned_cores: tuple[int, ...]  # its slot's cores
    pid: int | None


@dataclass(frozen=True)
class ModelStatus:
    version: str | None
    estimated_batch: int
    auto: bool
    workers: tuple[WorkerStatus, ...]
    latency_ms: float | None        # predicted batch latency of the live plan
    reconfigurations: int
    last_reconfiguration_s: float | None
    last_error: str | None
    calibration: str | None
    switching: str | None           # a switch under way, and its step
    standby: tuple[dict, ...] = ()  # old versions kept loaded: version, plan, memory_mb
    last_prewarm: str | None = None  # the last plan loaded ahead of need: what it cost
    prewarming: str | None = None    # a plan loading ahead of need now, and its step
    cores: tuple[int, ...] = ()      # the model's cores in the allocation (dedicated or shared)
    shared: bool = False             # idle: one 1-thread worker on the shared core
    slo_ms: float | None = None
    slo_met: bool | None = None      # the live plan's predicted batch latency at B within it

    def describe(self) -> str:
        """The live plan as <i, t, b>, "-" if none."""
        w = self.workers
        return describe(len(w), w[0].threads, w[0].batch) if w else "-"

    def to_json(self) -> dict:
        return {
            "version": self.version, "estimated_batch": self.estimated_batch, "auto": self.auto,
            "plan": {"instances": [{"threads": w.threads, "batch": w.batch,
                                    "cores": list(w.cores), "planned_cores": list(w.planned_cores),
                                    "pid": w.pid} for w in self.workers],
                     "latency_ms": self.latency_ms},
            "reconfigurations": self.reconfigurations,
            "last_reconfiguration_s": self.last_reconfiguration_s,
            "last_error": self.last_error, "calibration": self.calibration,
            "switching": self.switching, "standby": list(self.standby),
            "prewarming": self.prewarming, "last_prewarm": self.last_prewarm,
            "cores": "shared" if self.shared else list(self.cores),
            "shared": self.shared, "slo_ms": self.slo_ms, "slo_met": self.slo_met,
        }


@dataclass(frozen=True)
class Status:
    controller_pid: int | None
    torchserve_pid: int | None
    torchserve_restarts: int
    torchserve_event: str | None
    models: dict[str, ModelStatus]
    attached: str | None = None  # the management URL of the user's TorchServe (serve --attach)
    core_split: str | None = None  # several models: auto, even or overlap
    # the last reallocation (several models, --core-split auto): decided_unix, reason, inputs
    # (B and rate per model), shared_core, spare_cores, crowded_out, slo_feasible
    allocation: dict | None = None

    def to_json(self) -> dict:
        return {"controller_pid": self.controller_pid, "torchserve_pid": self.torchserve_pid,
                "attached": self.attached,
                "torchserve_restarts": self.torchserve_restarts,
                "torchserve_event": self.torchserve_event,
                "core_split": self.core_split, "allocation": self.allocation,
                "models": {name: m.to_json() for name, m in self.models.items()}}


def cpus_allowed(pid: int) -> tuple[int, ...]:
    """The cores a process may run on, as it really is (() if it is gone)."""
    try:
        return tuple(sorted(psutil.Process(pid).cpu_affinity()))
    except psutil.Error:
        return ()


def status(run_dir: Path) -> Status:
    """What each model serves, from the controller's state and the live processes."""
    run = RunDir(run_dir)
    if not run.state_file.is_file():
        raise PackratError(f"{run.path} holds no Packrat state; is `packrat serve --run-dir {run.path}` running?")
    state = read_json(run.state_file, None)
    if not isinstance(state, dict) or not isinstance(state.get("models", {}), dict):
        raise PackratError(f"{run.state_file} is not a Packrat state file; stop what runs there "
                           f"(`packrat stop --run-dir {run.path}`) and serve again")
    server = None if run.attached else find_server(run.torchserve)
    now = time.time()
    models = {}
    for name, st in state.get("models", {}).items():
        version = st.get("version")
        plan = run.read_plan(name, version) if version else None
        workers: list[WorkerStatus] = []
        if plan is not None:
            pids = run.slot_pids(name, version)  # the live worker holding each slot
            for k, slot in enumerate(plan.slots):
                pid = pids.get(k)
                workers.append(WorkerStatus(plan.threads, plan.batch_size,
                                            cpus_allowed(pid) if pid else (), tuple(slot), pid))
        last = st.get("last_reconfiguration_unix")
        models[name] = ModelStatus(
            version=version, estimated_batch=st.get("estimated_batch", 1),
            auto=st.get("auto", True), workers=tuple(workers),
            latency_ms=round(plan.predicted_ms, 3) if plan else None,
            reconfigurations=st.get("reconfigurations", 0),
            last_reconfiguration_s=round(now - last, 1) if last else None,
            last_error=st.get("last_error"), calibration=st.get("calibration"),
            switching=st.get("switching"), standby=tuple(st.get("standby") or ()),
            prewarming=st.get("prewarming"), last_prewarm=st.get("last_prewarm"), cores=tuple(st.get("cores") or ()),
            shared=bool(st.get("shared")), slo_ms=st.get("slo_ms"), slo_met=st.get("slo_met"))
    return Status(controller_pid(run), server.frontend_pid if server else None,
                  state.get("torchserve_restarts", 0), state.get("torchserve_event"), models,
                  run.attached.management.url if run.attached else None,
                  state.get("core_split"), state.get("allocation"))
