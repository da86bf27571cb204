"""`packrat serve`, `stop`, `status` and `reconfigure`: the controller's process around the loop.

`serve` takes the run directory's controller lock (a second controller refuses), profiles each
model (cached), starts TorchServe (or adopts the one this run directory already runs), serves
each model with the plan for B = 1, then runs the control loop until SIGINT or SIGTERM (which
`packrat stop` sends), and stops TorchServe on the way out.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from packrat.archive import extract_archive
from packrat.calibration import (
    calibrate, calibration_path, default_target, load_calibration, save_calibration, scale_profile,
    version_numbers,
)
from packrat.controller import Controller, ControllerParams, ModelRuntime
from packrat.cpus import usable_cores
from packrat.errors import PackratError
from packrat.modelspec import ModelSpec, encode_example, load_model
from packrat.optimizer import Optimizer
from packrat.policy import plan_for_batch
from packrat.profile import read_profile
from packrat.profiler import ProfileSettings, default_threads, profile_archive
from packrat.rundir import RUN_DIR_ENV, RunDir, check_model_name, read_json, write_json
from packrat.torchserve import (
    Ports, ServerSettings, TorchServeClient, find_server, load_settings, start_server, stop_server,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    name: str
    archive: Path
    profile: Path | None = None  # a profile CSV to use instead of measuring


@dataclass(frozen=True)
class ServeOptions:
    run_dir: Path
    models: tuple[ModelSource, ...]
    cores: int | None = None
    ports: Ports | None = None
    max_batch: int = 32           # profiling grid
    initial_batch: int = 1
    calibrate: bool = True        # scale measured profiles by served latency (packrat.calibration)
    controller: ControllerParams = ControllerParams()


class ControllerLock:
    """flock on RUN/controller.lock: one controller per run directory."""

    def __init__(self, run: RunDir) -> None:
        self.path = run.path / "controller.lock"
        self.fh = None

    def acquire(self) -> None:
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "?"
            fh.close()
            raise PackratError(
                f"another packrat controller (pid {pid}) runs on {self.path.parent}; stop it "
                f"with `packrat stop --run-dir {self.path.parent}` or use another --run-dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self.fh = fh

    def release(self) -> None:
        if self.fh:
            self.fh.close()
            self.fh = None


def controller_pid(run: RunDir) -> int | None:
    """pid of the controller holding the lock, None if none runs."""
    path = run.path / "controller.lock"
    if not path.is_file():
        return None
    with open(path, "r") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            text = fh.read().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fh, fcntl.LOCK_UN)
        return None


def serve(options: ServeOptions, say=print) -> None:
    old_umask = os.umask(0o077)  # the run directory (token, plans, logs) is the user's alone
    try:
        _serve(options, say)
    finally:
        os.umask(old_umask)


def _serve(options: ServeOptions, say) -> None:
    run = RunDir(options.run_dir).create()
    lock = ControllerLock(run)
    lock.acquire()
    handler = logging.FileHandler(run.log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("packrat").addHandler(handler)
    logging.getLogger("packrat").setLevel(logging.INFO)
    stop = {"flag": False}
    controller = None

    def on_signal(signum, frame):
        stop["flag"] = True
        if controller is None:  # still setting up (profiling, starting): give up at once
            raise KeyboardInterrupt
        controller.stopping.set()  # the loop ends after the step (and switch) in progress

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server = None
    try:
        all_cores = usable_cores()
        n = options.cores or len(all_cores)
        if not 1 <= n <= len(all_cores):
            raise PackratError(f"--cores {n}: this process may use 1..{len(all_cores)} cores")
        cores = all_cores[:n]
        runtimes = [_prepare_model(run, src, cores, options, say) for src in options.models]
        if stop["flag"]:
            return

        server = find_server(run.torchserve)
        adopting = server is not None
        if server is not None:
            settings = load_settings(run.torchserve)
            say(f"adopting TorchServe (pid {server.frontend_pid}) of {run.path}")
        else:
            run.state_file.unlink(missing_ok=True)  # a past run's: nothing of it is live
            settings = ServerSettings(
                workdir=run.torchserve, model_store=run.model_store,
                ports=options.ports or Ports.free(), env=((RUN_DIR_ENV, str(run.path)),),
            )
            server = start_server(settings)
            say(f"TorchServe: inference http://127.0.0.1:{settings.ports.inference}, "
                f"management http://127.0.0.1:{settings.ports.management}, "
                f"metrics http://127.0.0.1:{settings.ports.metrics} (token: "
                f"{run.torchserve / 'key_file.json'})")
        client = TorchServeClient(settings)
        controller = Controller(run, client, options.controller, server=server,
                                restart_server=lambda: start_server(settings))
        for m in runtimes:
            controller.models[m.name] = m
            if options.calibrate and m.profile_path is not None:
                _calibrate(controller, m, adopting, say)
            _adopt_or_start(controller, m, options.initial_batch, say)
        controller.save_state()
        say(f"serving {', '.join(controller.models)}; `packrat status --run-dir {run.path}` "
            f"shows the plans; Ctrl-C or `packrat stop --run-dir {run.path}` stops")
        if stop["flag"]:
            return
        controller.run_forever()
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if controller is not None:
            server = controller.server  # it may have restarted TorchServe
        if server is not None:
            # log, not say: stderr may be a pipe whose reader is gone, and a failed write
            # here must not leave TorchServe running
            log.info("stopping TorchServe")
            stop_server(server)
        if server is not None or find_server(run.torchserve) is None:
            # never the files of a TorchServe that still serves (a controller that failed
            # before adopting it leaves it as it found it)
            _clear_versions(run)
        lock.release()
        logging.getLogger("packrat").removeHandler(handler)
        handler.close()


def _prepare_model(run: RunDir, src: ModelSource, cores, options: ServeOptions, say) -> ModelRuntime:
    name = check_model_name(src.name)
    if not Path(src.archive).exists():
        raise PackratError(f"model {name}: archive {src.archive} does not exist")
    base = extract_archive(Path(src.archive), run.path / "archives" / name)
    if src.profile is not None:
        profile = read_profile(src.profile)
        say(f"{name}: profile {src.profile}")
        # the profiler would have loaded it: find bad weights or model code before TorchServe
        # does, where all it says is "Failed to start workers"
        try:
            load_model(base)
        except PackratError:
            raise
        except Exception as e:
            raise PackratError(f"model {name}: {src.archive} does not load ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:300]})") from None
    else:
        settings = ProfileSettings(threads=default_threads(len(cores)), max_batch=options.max_batch)

        def progress(ev):
            if ev.kind in ("point", "cached"):
                say(f"{name}: profiling {ev.done}/{ev.total}" + (
                    f" t={ev.threads} b={ev.batch} {ev.latency_ms:.1f} ms" if ev.kind == "point" else " (cached)"))

        result = profile_archive(Path(src.archive), settings, progress=progress)
        profile = result.profile
    opt = Optimizer(profile, len(cores))
    if options.initial_batch > opt.max_servable:
        raise PackratError(f"--initial-batch {options.initial_batch}: the profile of {name} serves "
                           f"at most B = {opt.max_servable} on {len(cores)} cores")
    return ModelRuntime(name=name, base_dir=base, optimizer=opt, cores=tuple(cores),
                        spec=ModelSpec.load(base),
                        profile_path=None if src.profile is not None else result.path)


def _calibrate(controller: Controller, m: ModelRuntime, adopting: bool, say) -> None:
    """Scale m's measured profile by its served latency per thread count (cached beside the
    profile). A restarted controller adopting a serving TorchServe uses a cached calibration
    only: measuring would compete with the live traffic."""
    delay = controller.params.max_batch_delay_ms
    path = calibration_path(m.profile_path, len(m.cores), delay, default_target(len(m.cores)))
    calibration = load_calibration(path)
    if calibration is None and adopting:
        say(f"{m.name}: no cached calibration; planning with the profile as measured")
        return
    profile = read_profile(m.profile_path)
    if calibration is None:
        try:
            calibration = calibrate(controller.run, controller.client, m.base_dir, m.name,
                                    profile, m.cores, json.dumps(encode_example(m.spec)).encode(),
                                    version_numbers(m),
                                    max_batch_delay_ms=delay, say=say)
        except PackratError as e:  # serving matters more than a better plan
            say(f"{m.name}: calibration failed ({e}); planning with the profile as measured")
            return
        save_calibration(calibration, path)
    m.optimizer = Optimizer(scale_profile(profile, calibration), len(m.cores))
    m.calibration = calibration.describe()
    say(f"{m.name}: calibrated profile ({m.calibration}; {path})")


def _adopt_or_start(controller: Controller, m: ModelRuntime, batch: int, say) -> None:
    """Adopt the default version this run directory already serves (a restarted controller),
    delete any other leftover version, else register the plan for `batch`."""
    state = read_json(controller.run.state_file, {}).get("models", {}).get(m.name, {})
    versions = controller.client.versions(m.name)
    default = next((v for v in versions if v.is_default), None)
    if versions:
        m.next_version = max(int(v.version) for v in versions if v.version.isdigit()) + 1
    if default is not None:
        plan = controller.run.read_plan(m.name, default.version)
        if plan is not None:
            m.plan = plan
            m.auto = state.get("auto", True)
            m.reconfigurations = state.get("reconfigurations", 0)
            m.last_reconfiguration_unix = state.get("last_reconfiguration_unix")
            for v in versions:
                if v.version != default.version:
                    controller._retire(m, controller.run.read_plan(m.name, v.version) or plan)
            say(f"{m.name}: adopted version {plan.version} ({plan.describe()})")
            return
    plan = plan_for_batch(m.optimizer, m.name, str(m.next_version), batch, m.cores)
    result = controller.switch(m, plan)
    if not result.ok:
        raise PackratError(result.message)
    say(f"{m.name}: serving {plan.describe()} (plan for B={plan.for_batch}, predicted "
        f"{plan.predicted_ms:.1f} ms)")


def _clear_versions(run: RunDir) -> None:
    for d in ("model_store", "plans", "slots"):
        shutil.rmtree(run.path / d, ignore_errors=True)


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
    """The cores a process may run on, from /proc/PID/status (as it really is)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return _parse_cpu_list(line.split(":", 1)[1].strip())
    except OSError:
        pass
    return []


def _parse_cpu_list(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


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
        }
    return {
        "controller_pid": controller_pid(run),
        "torchserve_pid": server.frontend_pid if server else None,
        "torchserve_restarts": state.get("torchserve_restarts", 0),
        "torchserve_event": state.get("torchserve_event"),
        "models": models,
    }
