"""`packrat serve`, `stop`, `status` and `reconfigure`: the controller's process around the loop.

`serve` takes the run directory's controller lock (a second controller refuses), profiles each
model (cached), starts TorchServe (or adopts the one this run directory already runs), serves
each model with the plan for B = 1, then runs the control loop until SIGINT or SIGTERM (which
`packrat stop` sends), and stops TorchServe on the way out.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

from packrat.core.decide import Reason
from packrat.errors import PackratError
from packrat.jsonfile import read_json
from packrat.measure.cpus import usable_cores
from packrat.model.sample import Sample
from packrat.serving.calibrate import (
    cached_calibration,
    calibrated_profile,
    version_numbers,
)
from packrat.serving.controller import Controller, ControllerParams, ModelRuntime
from packrat.serving.corebudget import move, plan_for
from packrat.serving.prepare import prepare_model
from packrat.serving.rundir import ControllerLock, RunDir
from packrat.serving.switch import Retire, drive
from packrat.serving.versions import retire_version
from packrat.torchserve import (
    Ports,
    ServerSettings,
    TorchServeClient,
    find_server,
    load_settings,
    start_server,
    stop_server,
)
from packrat.torchserve.attach import AttachedServer, check_attached
from packrat.torchserve.userconfig import UserConfig, settings_for

log = logging.getLogger(__name__)


class ServerOrigin(Enum):
    STARTED = "started"   # by this controller
    ADOPTED = "adopted"   # left running by a controller that died; it serves live traffic
    ATTACHED = "attached"  # the user's (serve --attach): never started, stopped or restarted


@dataclass(frozen=True)
class ModelSource:
    name: str
    archive: Path
    profile: Path | None = None  # a profile CSV to use instead of measuring
    sample: Sample | None = None  # one request as a client sends it (else the built-in example)
    slo_ms: float | None = None   # --slo: on its batch latency, for the allocator


@dataclass(frozen=True)
class ServeOptions:
    run_dir: Path
    models: tuple[ModelSource, ...]
    cores: int | None = None
    ports: Ports | None = None
    max_batch: int = 32           # profiling grid
    initial_batch: int = 1
    calibrate: bool = True        # scale measured profiles by served latency (packrat.serving.calibrate)
    controller: ControllerParams = ControllerParams()
    ts_config: UserConfig | None = None     # the user's config.properties to start TorchServe from
    attach: AttachedServer | None = None    # manage this TorchServe instead of starting one
    envelope: str | None = None             # the attached TorchServe's service_envelope


def serve(options: ServeOptions, say: Callable[[str], None] = lambda s: None) -> None:
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
        controller.stopping = True  # the loop ends after this tick; TorchServe stops after it

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server = None
    try:
        all_cores = usable_cores()
        n = options.cores or len(all_cores)
        if not 1 <= n <= len(all_cores):
            raise PackratError(f"--cores {n}: this process may use 1..{len(all_cores)} cores")
        cores = all_cores[:n]
        if options.attach is not None:
            _check_attached(run, options.attach, say)  # before the long profiling
        else:
            run.set_attached(None)
        envelope = options.ts_config.service_envelope if options.ts_config else options.envelope
        runtimes = [_prepare_model(run, src, cores, options, say, envelope)
                    for src in options.models]
        if stop["flag"]:
            return

        if options.attach is not None:
            origin = ServerOrigin.ATTACHED
            controller = Controller(run, options.attach.client(), options.controller,
                                    attached=True)
        else:
            server, settings, origin = _start_or_adopt(run, options, say)
            controller = Controller(run, TorchServeClient(settings), options.controller,
                                    server=server, restart_server=lambda: start_server(settings))
        for m in runtimes:
            controller.models[m.name] = m
            if options.calibrate and m.profile_path is not None:
                _calibrate(controller, m, origin, say)
        controller.place(cores)  # several models: each one's cores
        if len(runtimes) > 1:
            say("cores: " + "; ".join(
                f"{m.name} " + (f"shares core {m.cores[0]} (idle)" if m.shared else
                                f"{','.join(map(str, m.cores))}") for m in runtimes)
                + f" ({options.controller.core_split.value})")
        for m in runtimes:
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
            if options.attach is not None:
                _leave_attached(controller)  # the user's TorchServe serves on; server is None
            server = controller.server  # it may have restarted TorchServe
            controller.ctx.pool.shutdown(wait=False, cancel_futures=True)  # switches under way
        if server is not None:
            # log, not say: stderr may be a pipe whose reader is gone, and a failed write
            # here must not leave TorchServe running
            log.info("stopping TorchServe")
            stop_server(server)
        if options.attach is None and (server is not None or find_server(run.torchserve) is None):
            # never the files of a TorchServe that still serves (a controller that failed
            # before adopting it leaves it as it found it)
            _clear_versions(run)
        lock.release()
        logging.getLogger("packrat").removeHandler(handler)
        handler.close()


def _check_attached(run: RunDir, server: AttachedServer, say) -> None:
    check = check_attached(server)
    run.set_attached(server)
    say(f"attached to the TorchServe at {server.management.url} (model store "
        f"{server.model_store}); it is never started, stopped or restarted by Packrat")
    if not check.request_counters:
        say(f"its metrics API ({server.metrics.url}) serves no request counters, so Packrat "
            "cannot estimate the batch size: set metrics_mode=prometheus in its "
            "config.properties and restart it; until then plans change only by "
            "`packrat reconfigure`")


def _start_or_adopt(run: RunDir, options: ServeOptions, say):
    """Adopt the TorchServe this run directory runs (a restarted controller), else start one
    (from the user's config.properties if given): (server, settings, origin)."""
    server = find_server(run.torchserve)
    if server is not None:
        say(f"adopting TorchServe (pid {server.frontend_pid}) of {run.path}")
        return server, load_settings(run.torchserve), ServerOrigin.ADOPTED
    run.state_file.unlink(missing_ok=True)  # a past run's: nothing of it is live
    if options.ts_config is not None:
        user = settings_for(options.ts_config, workdir=run.torchserve,
                            model_store=run.model_store)
        for warning in user.warnings:
            say(f"warning: {warning}")
        settings = user.settings
    else:
        settings = ServerSettings(workdir=run.torchserve, model_store=run.model_store,
                                  ports=options.ports or Ports.free())
    server = start_server(settings)
    urls = settings.endpoints()
    say(f"TorchServe: inference {urls.inference.url}, management {urls.management.url}, "
        f"metrics {urls.metrics.url}"
        + (f" (token: {urls.key_file})" if urls.key_file else " (no token authorization)"))
    return server, settings, ServerOrigin.STARTED


def _leave_attached(controller: Controller) -> None:
    """On the way out of an attached TorchServe: let switches under way finish (bounded),
    then unregister every version Packrat made but the live one, which serves on."""
    run, client = controller.run, controller.client
    deadline = controller.clock() + controller.params.drain_timeout_s
    try:
        while (controller.switches or controller.prewarms or controller.draining) and \
                controller.clock() < deadline:
            controller.advance_switches()
            controller.sleep(controller.params.tick_s)
        for name in controller.models:
            for v in client.versions(name):
                if not v.is_default and run.version_dir(name, v.version).is_dir():
                    retire_version(run, client, name, v.version)
    except PackratError as e:
        log.error("leaving the attached TorchServe: %s", e)


def _prepare_model(run: RunDir, src: ModelSource, cores, options: ServeOptions, say,
                   envelope: str | None) -> ModelRuntime:
    p = prepare_model(run, src.name, src.archive, cores, max_batch=options.max_batch,
                      largest_b=options.initial_batch, say=say, profile_csv=src.profile,
                      what_b="--initial-batch", sample=src.sample, envelope=envelope)
    return ModelRuntime(name=p.name, base_dir=p.base_dir, optimizer=p.optimizer,
                        cores=tuple(cores), warm=p.warm, profile_path=p.profile_path,
                        slo_ms=src.slo_ms)


def _calibrate(controller: Controller, m: ModelRuntime, origin: ServerOrigin, say) -> None:
    """Scale m's measured profile by its served latency per thread count (cached beside the
    profile). A restarted controller adopting a serving TorchServe uses a cached calibration
    only: measuring would compete with the live traffic."""
    delay = controller.params.max_batch_delay_ms
    if origin is ServerOrigin.ADOPTED:  # (an attached one is measured: the user asked now)
        found = cached_calibration(m.profile_path, len(m.cores), delay)
        if found is None:
            say(f"{m.name}: no cached calibration; planning with the profile as measured")
            return
    else:
        try:
            found = calibrated_profile(controller.run, controller.client, m.base_dir, m.name,
                                       m.profile_path, m.cores, m.warm, version_numbers(m),
                                       max_batch_delay_ms=delay, say=say)
        except PackratError as e:  # serving matters more than a better plan
            say(f"{m.name}: calibration failed ({e}); planning with the profile as measured")
            return
    m.optimizer = found.optimizer
    m.calibration = found.calibration.describe()
    say(f"{m.name}: calibrated profile ({m.calibration}; {found.path})")


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
            held = state.get("cores")
            if len(controller.models) > 1 and held and set(held) <= set(controller.budget.cores):
                move(m, tuple(held), bool(state.get("shared")))  # as it was
            m.auto = state.get("auto", True)
            m.reconfigurations = state.get("reconfigurations", 0)
            m.last_reconfiguration_unix = state.get("last_reconfiguration_unix")
            run = controller.run
            for v in versions:
                # an attached TorchServe's versions that Packrat did not make are the user's
                if v.version != default.version and (run.attached is None or
                                                     run.version_dir(m.name, v.version).is_dir()):
                    old = controller.run.read_plan(m.name, v.version) or replace(plan, version=v.version)
                    drive(Retire(controller.ctx, m.name, old), controller.sleep,
                          controller.params.tick_s)
            say(f"{m.name}: adopted version {plan.version} ({plan.describe()})")
            return
    theirs = [v.version for v in versions
              if not controller.run.version_dir(m.name, v.version).is_dir()]
    if theirs and controller.run.attached is not None:
        say(f"{m.name}: the attached TorchServe has version(s) {', '.join(theirs)} that "
            "Packrat did not make; they stay registered, and Packrat's version becomes the "
            "default")
    plan = plan_for(m, batch)
    result = controller.switch_now(m, plan, Reason.AUTO)
    if not result.ok:
        raise PackratError(result.message)
    say(f"{m.name}: serving {plan.describe()} (plan for B={plan.for_batch}, "
        f"{plan.predicted()})")


def _clear_versions(run: RunDir) -> None:
    for d in ("model_store", "plans", "slots"):
        shutil.rmtree(run.path / d, ignore_errors=True)
