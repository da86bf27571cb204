"""The reconfiguration controller: estimates B per model from live traffic and, when a better
plan is worth it, switches TorchServe to it make-before-break.

A switch (`Controller.switch`):
1. write the plan of the new version N into the run directory and unpack the archive as
   `model_store/NAME-vN` (weights hard-linked), with the current Packrat handler;
2. register it (`synchronous=true`): its workers start, each claims a slot of the plan and pins
   itself to that slot's cores before loading the model;
3. check that every worker is up and holds its slot, and warm it with full batches sent to the
   new version explicitly;
4. make it the default: new requests go to it;
5. wait until the old version has nothing queued and its request counter has stood still for
   longer than a batch takes (so no batch is in flight), then delete it.
Any failure before step 4 deletes the new version and leaves the old one serving.

Cores during the overlap: both versions are pinned inside the same N cores (each plan uses
the cores Packrat may use, physical first), so for the seconds of steps 2-5 the new workers
load and warm on cores where the old ones still serve. Latency rises a little during a switch;
no request is dropped, and no thread ever runs outside the allowed cores.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from packrat.core.estimator import EstimatorParams, EstimatorState, Sample, observe
from packrat.core.optimizer import Optimizer
from packrat.core.policy import PolicyParams, manual_plan, plan_for_batch, should_switch
from packrat.errors import PackratError, PlanError, TorchServeError
from packrat.model.spec import ModelSpec
from packrat.model.wire import encode_example
from packrat.serving.rundir import RunDir, ServedPlan, read_json, write_json
from packrat.serving.versions import deploy_version, remove_version_files
from packrat.torchserve import (
    ServerProcess,
    TorchServeClient,
    is_running,
    stop_server,
    worker_cpu_seconds,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ControllerParams:
    interval_s: float = 1.0
    max_batch_delay_ms: int = 10
    drain_timeout_s: float = 120.0
    retry_after_s: float = 30.0  # after a failed switch, wait this long before trying again
    policy: PolicyParams = PolicyParams()
    estimator: EstimatorParams = EstimatorParams()


@dataclass
class ModelRuntime:
    """What the controller knows of one model; mutable, owned by the controller loop."""

    name: str
    base_dir: Path                 # the unpacked archive every version is made from
    optimizer: Optimizer
    cores: tuple[int, ...]
    spec: ModelSpec
    plan: ServedPlan | None = None
    auto: bool = True
    estimator: EstimatorState = field(default_factory=EstimatorState)
    totals: tuple[float, float] = (0.0, 0.0)   # requests, latency_us summed over versions
    last_counters: dict = field(default_factory=dict)
    next_version: int = 1
    reconfigurations: int = 0
    last_reconfiguration_unix: float | None = None
    last_error: str | None = None
    retry_at: float = 0.0
    profile_path: Path | None = None  # a profile Packrat measured (and may calibrate)
    calibration: str | None = None    # Calibration.describe() of the profile planned with


@dataclass(frozen=True)
class SwitchResult:
    ok: bool
    model: str
    plan: ServedPlan | None
    seconds: float
    message: str


class Controller:
    """server and restart_server: the TorchServe this controller watches and how to start it
    again (None: nothing is watched, as in tests of the switch alone)."""

    def __init__(self, run: RunDir, client: TorchServeClient, params: ControllerParams = ControllerParams(),
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 server: ServerProcess | None = None,
                 restart_server: Callable[[], ServerProcess] | None = None):
        self.run, self.client, self.params = run, client, params
        self.clock, self.wall = clock, wall
        self.models: dict[str, ModelRuntime] = {}
        self.stopping = threading.Event()
        self.server, self.restart_server = server, restart_server
        self.server_restarts = 0
        self.server_event: str | None = None  # the last thing that happened to TorchServe
        self.server_retry_at = 0.0

    def _remove_version_files(self, model: str, version: str) -> None:
        remove_version_files(self.run, model, version)

    # -- the switch -------------------------------------------------------------------------

    def switch(self, m: ModelRuntime, plan: ServedPlan) -> SwitchResult:
        start = self.clock()
        version = plan.version
        old = m.plan
        log.info("%s: switching %s -> %s (version %s, predicted %.1f ms at B=%d)", m.name,
                 old.describe() if old else "nothing", plan.describe(), version,
                 plan.predicted_ms, plan.for_batch)
        m.next_version = max(m.next_version, int(version) + 1)
        try:
            deploy_version(self.run, self.client, m.base_dir, m.name, version, plan,
                           instances=plan.instances, batch_size=plan.batch_size,
                           max_batch_delay_ms=self.params.max_batch_delay_ms,
                           warm_body=json.dumps(encode_example(m.spec)).encode())
            self.client.set_default(m.name, version)
        except (PackratError, OSError) as e:
            try:
                if any(v.version == version for v in self.client.versions(m.name)):
                    self.client.unregister(m.name, version)
            except PackratError as e2:
                log.warning("%s: could not delete failed version %s: %s", m.name, version, e2)
            self._remove_version_files(m.name, version)
            message = f"switch of {m.name} to {plan.describe()} failed: {e}"
            if old is not None:
                message += f"; version {old.version} ({old.describe()}) keeps serving"
            m.last_error = message
            m.retry_at = self.clock() + self.params.retry_after_s
            log.error("%s", message)
            return SwitchResult(False, m.name, old, self.clock() - start, message)

        m.plan = plan
        if old is not None:
            m.reconfigurations += 1
            m.last_reconfiguration_unix = self.wall()
        m.last_error = None
        self.save_state()
        if old is not None:
            self._retire(m, old)
        seconds = self.clock() - start
        log.info("%s: now serving %s (version %s) after %.1f s", m.name, plan.describe(), version, seconds)
        return SwitchResult(True, m.name, plan, seconds, f"{m.name} serves {plan.describe()} as version {version}")

    def _retire(self, m: ModelRuntime, old: ServedPlan) -> None:
        """Delete the old version once nothing is queued or running on it."""
        if self._wait_drained(m, old):
            try:
                self.client.unregister(m.name, old.version)
            except TorchServeError as e:
                log.warning("%s: deleting version %s failed: %s", m.name, old.version, e)
                return
            self._remove_version_files(m.name, old.version)
        else:
            log.warning("%s: version %s still busy after %.0f s; left registered", m.name,
                        old.version, self.params.drain_timeout_s)

    def _wait_drained(self, m: ModelRuntime, old: ServedPlan) -> bool:
        """True once the old version has nothing queued and nothing running.

        A batch a worker has taken is no longer in the queue count, and the metrics count
        requests to /predictions/NAME under "default" whatever version served them, so the
        rule (measured, see packrat.torchserve) is: the queue read empty for longer than the
        batching delay plus two full batches, and the workers' CPU time stood still for two
        batching delays."""
        delay = self.params.max_batch_delay_ms / 1000.0
        empty_needed = delay + 2 * old.predicted_ms / 1000.0 + 0.2
        idle_needed = 2 * delay + 0.1
        deadline = self.clock() + self.params.drain_timeout_s
        empty_since = idle_since = None
        last_cpu = None
        while self.clock() < deadline:
            info = next((v for v in self.client.versions(m.name) if v.version == old.version), None)
            if info is None:
                return True  # already gone
            now = self.clock()
            cpu = worker_cpu_seconds(info)
            empty_since = (empty_since or now) if info.pending_requests == 0 else None
            idle_since = (idle_since or now) if cpu == last_cpu else None
            last_cpu = cpu
            if (empty_since is not None and now - empty_since >= empty_needed
                    and idle_since is not None and now - idle_since >= idle_needed):
                return True
            time.sleep(0.05)
        return False

    # -- estimating B -----------------------------------------------------------------------

    def sample(self, m: ModelRuntime, metrics: dict) -> None:
        """Add this scrape to the model's running totals (versions come and go, so their own
        counters restart; only their increases count) and feed the estimator."""
        requests, latency = m.totals
        seen = {}
        for (metric, model, version), value in metrics.items():
            if model != m.name or metric not in ("ts_inference_requests_total",
                                                 "ts_inference_latency_microseconds"):
                continue
            key = (metric, version)
            seen[key] = value
            prev = m.last_counters.get(key, 0.0)
            delta = value - prev if value >= prev else value
            if metric == "ts_inference_requests_total":
                requests += delta
            else:
                latency += delta
        m.last_counters = seen
        m.totals = (requests, latency)
        m.estimator = observe(m.estimator, Sample(self.clock(), requests, latency), self.params.estimator)

    # -- a dead TorchServe -----------------------------------------------------------------

    def server_up(self) -> bool:
        """True if TorchServe runs. A frontend that died (killed, out of memory) takes its
        workers with it; restart it with the same settings and register every model's plan
        again, as a new version (the old one's files and slots are stale)."""
        if self.server is None or self.restart_server is None or is_running(self.server):
            return True
        if self.clock() < self.server_retry_at:
            return False
        dead = self.server.frontend_pid
        self.server_event = (f"TorchServe frontend (pid {dead}) exited at {_hms(self.wall())}; "
                             "restarting it")
        log.error("%s", self.server_event)
        self.save_state()
        try:
            stop_server(self.server)  # what is left of it: workers still holding slot locks
            self.server = self.restart_server()
        except PackratError as e:
            self.server_event = (f"TorchServe frontend (pid {dead}) exited and could not be "
                                 f"restarted: {e}; retrying in {self.params.retry_after_s:.0f} s")
            log.error("%s", self.server_event)
            self.server_retry_at = self.clock() + self.params.retry_after_s
            self.save_state()
            return False
        self.server_restarts += 1
        restored = []
        for m in self.models.values():
            old, m.plan = m.plan, None
            if old is not None:
                remove_version_files(self.run, m.name, old.version)
                plan = replace(old, version=str(m.next_version))
            else:
                try:
                    plan = plan_for_batch(m.optimizer, m.name, str(m.next_version),
                                          m.estimator.estimate, m.cores)
                except PlanError as e:
                    m.last_error = str(e)
                    continue
            if self.switch(m, plan).ok:
                restored.append(f"{m.name} {plan.describe()}")
        self.server_event = (f"TorchServe frontend (pid {dead}) exited at {_hms(self.wall())}; "
                             f"restarted as pid {self.server.frontend_pid}, serving "
                             f"{', '.join(restored) or 'nothing (see last_error)'}")
        log.warning("%s", self.server_event)
        self.save_state()
        return True

    # -- the loop ---------------------------------------------------------------------------

    def step(self) -> None:
        if not self.server_up():
            return
        self.handle_requests()
        try:
            metrics = self.client.metrics()
        except TorchServeError as e:
            log.warning("metrics unavailable: %s", e)
            return
        for m in self.models.values():
            self.sample(m, metrics)
            if not m.auto or self.clock() < m.retry_at:
                continue
            batch = m.estimator.estimate
            try:
                target = plan_for_batch(m.optimizer, m.name, str(m.next_version), batch, m.cores)
            except PlanError as e:
                m.last_error = str(e)
                continue
            if should_switch(m.plan, target, m.optimizer, batch, self.params.policy,
                             self.params.max_batch_delay_ms):
                self.switch(m, target)
        self.save_state()

    def run_forever(self) -> None:
        while not self.stopping.is_set():
            self.step()
            self.stopping.wait(self.params.interval_s)

    # -- manual requests (`packrat reconfigure`) --------------------------------------------

    def handle_requests(self) -> None:
        for path in sorted(self.run.requests.glob("*.json")):
            if path.name.endswith(".result.json"):
                continue
            request = read_json(path, {})
            path.unlink(missing_ok=True)
            result = self.apply_request(request)
            write_json(path.with_name(path.stem + ".result.json"),
                       {"ok": result.ok, "message": result.message, "seconds": round(result.seconds, 2),
                        "plan": result.plan.to_json() if result.plan else None})

    def apply_request(self, request: dict) -> SwitchResult:
        name = request.get("model")
        m = self.models.get(name)
        if m is None:
            return SwitchResult(False, str(name), None, 0.0,
                                f"no model {name!r} is served; served: {', '.join(self.models) or 'none'}")
        try:
            version = str(m.next_version)
            if request.get("auto"):
                m.auto = True
                # watch the load for as long as the estimator needs to follow a step before
                # deciding: the estimate may still describe the load of the manual period
                est = self.params.estimator  # the median window fills, then patience runs
                m.retry_at = self.clock() + (est.window + est.patience + 1) * self.params.interval_s
                self.save_state()
                return SwitchResult(True, name, m.plan, 0.0, f"{name}: automatic reconfiguration on")
            if request.get("for_batch") is not None:
                batch = int(request["for_batch"])
                if not 1 <= batch <= m.optimizer.max_servable:
                    raise PlanError(f"--for-batch {batch}: the profile serves B = 1.."
                                    f"{m.optimizer.max_servable} on {len(m.cores)} cores")
                plan = plan_for_batch(m.optimizer, name, version, batch, m.cores)
            else:
                plan = manual_plan(m.optimizer, name, version, int(request["instances"]),
                                   int(request["threads"]), int(request["batch"]), m.cores)
        except (PackratError, KeyError, TypeError, ValueError) as e:
            return SwitchResult(False, name, m.plan, 0.0, f"bad request: {e}")
        m.auto = False  # a manual plan holds until --auto
        if plan.same_shape(m.plan):
            self.save_state()
            return SwitchResult(True, name, m.plan, 0.0, f"{name} already serves {plan.describe()}")
        return self.switch(m, plan)

    # -- state for `packrat status` ---------------------------------------------------------

    def save_state(self) -> None:
        models = {}
        for m in self.models.values():
            models[m.name] = {
                "version": m.plan.version if m.plan else None,
                "estimated_batch": m.estimator.estimate,
                "auto": m.auto,
                "reconfigurations": m.reconfigurations,
                "last_reconfiguration_unix": m.last_reconfiguration_unix,
                "last_error": m.last_error,
                "cores": list(m.cores),
                "calibration": m.calibration,
            }
        write_json(self.run.state_file, {
            "controller_pid": os.getpid(), "models": models,
            "torchserve_restarts": self.server_restarts, "torchserve_event": self.server_event,
        })


def _hms(unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix))
