"""The reconfiguration controller: estimates B per model from live traffic and, when a better
plan is worth it, switches TorchServe to it make-before-break.

Each tick (`Controller.tick`, every `tick_s` while a switch is under way):
- the frontend watchdog (packrat/serving/watchdog.py): a dead TorchServe is restarted and
  every plan served again;
- every switch under way advances one step if its last step has finished
  (packrat.serving.switch: a switch never blocks the loop);
- `packrat reconfigure` requests are read, decided (`decide_request`) and carried out; a
  request for a model that is switching waits until the switch has ended;
- every `interval_s`: scrape the metrics, feed each model's estimator, and carry out what
  `packrat.core.decide.decide` returns for the models not switching.

Cores during a switch: both versions are pinned inside the model's cores, so while the new
workers load and warm, they share cores with the old ones. Latency rises a little during a
switch; no request is dropped, and no thread ever runs outside the allowed cores.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace

from packrat.core.ahead import prewarm
from packrat.core.decide import (
    Action,
    Answer,
    ModelView,
    Note,
    Reason,
    Reconfigure,
    SetAuto,
    SetManual,
    Stay,
    SwitchTo,
    decide,
    decide_request,
)
from packrat.core.plan import ServedPlan
from packrat.core.standby import shape_of
from packrat.core.switchcost import Kind
from packrat.errors import PackratError, PlanError, TorchServeError
from packrat.jsonfile import read_json, write_json
from packrat.serving.corebudget import CoreBudget, slo_met
from packrat.serving.rundir import RunDir
from packrat.serving.runtime import ControllerParams, ModelRuntime, sample_model
from packrat.serving.standby import Standby
from packrat.serving.switch import (
    Retire,
    Switch,
    SwitchContext,
    SwitchResult,
    SwitchSettings,
)
from packrat.serving.watchdog import Watchdog
from packrat.torchserve import ServerProcess, TorchServeClient

log = logging.getLogger(__name__)

class Controller(Watchdog):
    """server and restart_server: the TorchServe this controller watches and how to start it
    again (None: nothing is watched, as in tests of the switch alone). attached: the
    TorchServe is the user's (packrat serve --attach): it is watched through /ping and never
    restarted. pool runs the blocking calls of switches; clock and sleep are injected so
    that tests run without real time."""

    def __init__(self, run: RunDir, client: TorchServeClient,
                 params: ControllerParams = ControllerParams(),
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] | None = None,
                 server: ServerProcess | None = None,
                 restart_server: Callable[[], ServerProcess] | None = None,
                 pool: Executor | None = None, attached: bool = False):
        self.run, self.client, self.params = run, client, params
        self.clock, self.wall = clock, wall
        # Set by a signal handler: a plain flag, no lock (an Event's set() from a handler that
        # interrupted the same Event's wait() deadlocks on its condition's lock).
        self.stopping = False
        self.sleep = sleep or time.sleep
        self.models: dict[str, ModelRuntime] = {}
        self.switches: dict[str, Switch] = {}     # under way, by model, until promoted
        # loads ahead of need, by model: beside its switches, since a load at idle priority
        # may wait out a whole burst that an overload switch must not wait for
        self.prewarms: dict[str, Switch] = {}
        # promoted switches whose old version drains: the model may switch again meanwhile
        # (an overload must not wait for a drain, which under one lasted minutes)
        self.draining: list[Switch] = []
        self.standby = Standby(run, params.standby_memory_mb)  # warm old versions
        self.queued: list[SwitchTo] = []          # waiting for another model's switch
        self.retiring: list[Retire] = []          # standby versions being deleted
        self.server, self.restart_server = server, restart_server
        self.server_restarts = 0
        self.server_event: str | None = None  # the last thing that happened to TorchServe
        self.server_retry_at = 0.0
        self.attached = attached
        self.down_since: float | None = None  # wall time the attached TorchServe stopped answering
        self.next_sample = 0.0
        self.budget = CoreBudget(params)  # several models: their cores
        self.ctx = SwitchContext(
            run, client, pool or ThreadPoolExecutor(8, thread_name_prefix="packrat-switch"),
            clock, SwitchSettings(params.max_batch_delay_ms, params.drain_timeout_s))

    # -- the loop ---------------------------------------------------------------------------

    def run_forever(self) -> None:
        while not self.stopping:
            self.tick()
            self.sleep(self.params.tick_s if self.busy
                       else max(0.0, min(self.params.tick_s * 4, self.next_sample - self.clock())))

    def tick(self) -> None:
        if not self.server_up():
            return
        changed = self.busy  # status shows steps
        self.advance_switches()
        changed |= self.handle_requests() > 0  # before deciding: the user's requests go first
        now = self.clock()
        if now >= self.next_sample:
            self.next_sample = now + self.params.interval_s
            changed = True  # a new estimate
            if self.sample_all():
                try:
                    self._reallocate(now)  # first: a model it moves is switching, decide skips it
                    self.carry_out(decide(self.views(), now, self.params.policy,
                                          self.params.max_batch_delay_ms))
                    self._prewarm(now)
                except PlanError as e:  # a decision that cannot be made must not stop serving
                    log.exception("deciding: %s", e)
                    self.server_event = f"a decision failed (see {self.run.log_file}): {e}"
        if changed:  # an idle tick (every 0.2 s) writes nothing
            self.save_state()

    @property
    def busy(self) -> bool:
        """A switch, prewarm, queued switch or drain is under way."""
        return bool(self.switches or self.prewarms or self.queued or self.draining)

    def views(self, ahead: dict[str, ServedPlan] | None = None) -> list[ModelView]:
        # (a shared model's plan is the allocator's: one 1-thread worker, no automatic switch)
        ahead = ahead or {}
        return [ModelView(m.name, m.optimizer, m.cores, m.plan, m.auto and not m.shared,
                          m.estimator.estimate,
                          # (a donor a queued receiver waits for starts no switch of its
                          # own: each one kept small-cnn waiting longer)
                          m.name in self.switches or any(a.model == m.name or m.name in a.after
                                                         for a in self.queued),
                          m.hold_until, m.next_version, m.stats, m.levels,
                          self.standby.shapes(m.name, m.cores), m.estimator.smoothed,
                          m.estimator.rate, self.budget.note(m, self.models),
                          any(s.model == m.name for s in self.draining),
                          ahead.get(m.name), m.estimator.slow_rate, m.peak_rate(),
                          m.estimator.sure_rate)
                for m in self.models.values()]

    def carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            log.debug("action: %s", action)
            m = self.models.get(getattr(action, "model", None) or "")
            if isinstance(action, SwitchTo):
                if action.why:
                    log.info("%s: switching (%s)", action.model, action.why)
                self.start_switch(action)
            elif isinstance(action, Stay):
                # once per decision: the stay and the gain in `why` grow every interval
                if (m.last_stay or "").split(",")[0] != action.why.split(",")[0]:
                    log.info("%s: staying (%s)", action.model, action.why)
                m.last_stay = action.why
            elif isinstance(action, SetAuto):
                m.auto, m.hold_until = True, action.hold_until
            elif isinstance(action, SetManual):
                m.auto = False
            elif isinstance(action, Note):
                m.last_error = action.message
            elif isinstance(action, Answer):
                self._answer(action.request_id, action.ok, action.message, action.plan, 0.0)

    # -- switches ---------------------------------------------------------------------------

    def start_switch(self, action: SwitchTo) -> Switch | None:
        """Start the switch, or queue it (None) while its model or `after` is switching, or
        while the same plan loads ahead of need (it will be warm; an overload does not wait).
        A prewarm runs beside the model's switches (the caller starts one at a time)."""
        m = self.models[action.model]
        m.next_version = max(m.next_version, int(action.plan.version) + 1)
        if action.reason is Reason.MANUAL:
            m.auto = False  # a manual plan holds until --auto
        loading = self.prewarms.get(m.name)
        if action.reason is not Reason.PREWARM and (
                m.name in self.switches or any(self._donor_busy(a) for a in action.after)
                or (loading is not None and action.reason is not Reason.OVERLOAD
                    and shape_of(loading.plan) == shape_of(action.plan))):
            self.queued.append(action)
            return None
        if (action.reason is Reason.REALLOCATE and m.plan is not None
                and shape_of(m.plan) == shape_of(action.plan) and m.plan.slots == action.plan.slots):
            # Its workers already run so, e.g. a woken model whose dedicated core is the shared
            # one it served on: nothing to load (a cold switch to the same plan took 16 s).
            m.plan = replace(m.plan, shared=action.plan.shared,
                             predicted_ms=action.plan.predicted_ms, for_batch=action.plan.for_batch)
            self.run.write_plan(m.plan)
            log.info("%s: %s on cores %s already serves as planned", m.name, m.plan.describe(),
                     ",".join(map(str, m.cores)))
            return None
        action, from_standby = self.standby.take(action, m.cores)
        evict, park_old = self.standby.room_for(m.plan, action.reason)
        tasks = self.prewarms if action.reason is Reason.PREWARM else self.switches
        switch = tasks[m.name] = Switch(
            self.ctx, action, m.plan, m.base_dir, m.warm, on_promoted=self._promoted,
            from_standby=from_standby, evict=evict, park_old=park_old)
        switch.tick()
        return switch

    def _donor_busy(self, name: str) -> bool:
        """A switch of the model is under way or waiting, one of its versions retiring, or a
        version of it loading ahead of need on cores it no longer holds: a model waiting for
        its cores waits for these. (Not for a load on the cores it kept: ResNet-50's shrink
        plan, loading at idle priority, kept small-cnn off its core for a whole phase.)"""
        m = self.models[name]
        loading = self.prewarms.get(name)
        return (name in self.switches
                or any(a.model == name for a in self.queued)
                or any(t.model == name for t in self.retiring + self.draining)
                or (loading is not None
                    and not {c for s in loading.plan.slots for c in s} <= set(m.cores)))

    # -- several models, one core budget (packrat.serving.corebudget) ------------------------

    def place(self, cores: tuple[int, ...]) -> None:
        """Every model's cores, before anything serves (at start-up)."""
        self.budget.place(self.models, cores, self.clock(), self.wall())

    def _reallocate(self, now: float) -> None:
        """Carry out a reallocation worth its switches. Weighed only while no switch is under
        way or waiting (prewarms and old versions draining do not hold it up: the receivers'
        switches wait for their donors' switches, drains and deletions)."""
        if not self.budget.live(self.models) or self.queued or self.switches:
            return
        for action in self.budget.reallocate(self.models, now, self.wall(),
                                             self.standby.shapes):
            self.start_switch(action)

    # -- warm standby ------------------------------------------------------------------------

    def _prewarm(self, now: float) -> None:
        """Load a likely next plan of a settled model into standby, where it fits."""
        ahead = self.budget.wake_plans(self.models, now, self.standby.shapes)
        for view in self.views(ahead):
            if view.name in self.prewarms:
                continue
            if self.models[view.name].shared and (self.switches or self.queued or self.prewarms
                                                  or self.draining):
                # an idle model's load is the most speculative: only on quiet cores (in one
                # run three loads at once on 2 cores slowed the busy model's switch to 21 s)
                continue
            action = prewarm(view, now)
            if action is not None and self.standby.fits(view.plan, action.plan):
                log.info("%s: %s", view.name, action.why)
                self.start_switch(action)

    def start_retire(self, plan: ServedPlan) -> None:
        """Delete a version in the background (a task driven like the switches)."""
        self.retiring.append(Retire(self.ctx, plan.model, plan))

    def _promoted(self, switch: Switch) -> None:
        m = self.models[switch.model]  # (a prewarm is never promoted)
        self.run.log_switch(switch.record(self.wall(), self.clock(), True))
        if m.plan is not None and switch.action.reason is not Reason.RESTORE:
            m.reconfigurations += 1
            m.last_reconfiguration_unix = self.wall()
        m.plan, m.last_error = switch.plan, None
        self.save_state()

    def advance_switches(self) -> None:
        for task in self.retiring:
            task.tick()
        self.retiring = [t for t in self.retiring if not t.finished]
        for switch in self.draining:
            switch.tick()
            if switch.result is not None:
                self._finished(switch)
        self.draining = [s for s in self.draining if s.result is None]
        for name, switch in list(self.prewarms.items()):
            switch.tick()
            if switch.result is not None:
                del self.prewarms[name]
                self._finished(switch)
        for name, switch in list(self.switches.items()):
            switch.tick()
            if switch.result is not None:
                del self.switches[name]
                self._finished(switch)
            elif switch.promoted_at is not None:  # the rest is its old version's drain
                del self.switches[name]
                self.draining.append(switch)
        waiting, self.queued = self.queued, []
        for action in waiting:
            self.start_switch(action)

    def _finished(self, switch: Switch) -> None:
        m, result = self.models[switch.model], switch.result
        if switch.promoted_at is None:  # a promoted one was logged then
            self.run.log_switch(switch.record(self.wall(), self.clock(), result.ok))
        unfit = self.standby.park(switch.model, switch.parked, self.clock(), switch.parks)
        if unfit is not None:
            self.start_retire(unfit)
        for gone in self.standby.off_cores(m.name, m.cores):  # its cores changed
            self.start_retire(gone)
        if switch.prewarm:  # the live plan never moved: nothing to hold off or report
            if result.ok:
                m.prewarming = (switch.started, self.clock())
            else:
                log.warning("%s", result.message)
                m.hold_until = self.clock() + self.params.retry_after_s  # no retry loop
            return
        if not result.ok:
            m.last_error = result.message
            m.hold_until = self.clock() + self.params.retry_after_s
        if switch.promoted_at is not None and switch.action.reason is not Reason.OVERLOAD:
            # What the switch cost: until the old version drained, both versions' workers
            # shared the model's cores (a warm switch is a set-default, but its drain is not).
            # (Not after an overload: the load rose under it, and the slowdown is the load's.)
            m.costing = (Kind.of(switch.from_standby), switch.started, self.clock())
        if switch.action.request_id:
            self._answer(switch.action.request_id, result.ok, result.message, result.plan,
                         result.seconds)

    def switch_now(self, m: ModelRuntime, plan: ServedPlan,
                   reason: Reason = Reason.AUTO) -> SwitchResult:
        """Switch and wait for the end (at start-up, before the loop runs; in tests)."""
        self.models.setdefault(m.name, m)
        switch = self.start_switch(SwitchTo(plan, reason))
        if switch is None:
            raise PackratError(f"{m.name} is already switching")
        while switch.result is None:
            self.sleep(self.params.tick_s)
            switch.tick()
        self.advance_switches()  # hands the result over (_finished)
        return switch.result

    # -- estimating B -----------------------------------------------------------------------

    def sample_all(self) -> bool:
        try:
            metrics = self.client.metrics()
        except TorchServeError as e:
            log.warning("metrics unavailable: %s", e)
            return False
        for m in self.models.values():
            self.sample(m, metrics)
        return True

    def sample(self, m: ModelRuntime, metrics: dict[tuple[str, str, str], float]) -> None:
        est = self.standby.estimator_params(m.name, m.optimizer, m.cores,
                                            m.estimator.candidate, self.params.estimator)
        sample_model(m, metrics, self.clock(), self.params, est)

    # -- manual requests (`packrat reconfigure`) --------------------------------------------

    def handle_requests(self) -> int:
        """Carry out the requests waiting in the run directory; returns how many."""
        handled = 0
        for path in sorted(self.run.requests.glob("*.json")):
            if path.name.endswith(".result.json"):
                continue
            try:
                request = Reconfigure.from_json(path.stem, read_json(path, None))
            except PackratError as e:
                actions: list[Action] = [Answer(path.stem, False, f"bad request: {e}", None)]
            else:
                if request.model in self.switches:
                    continue  # answered after the switch under way
                est = self.params.estimator  # after --auto: the median window fills, then patience
                watch_s = (est.window + est.patience + 1) * self.params.interval_s
                actions = decide_request(self.views(), request, self.clock(), watch_s)
            path.unlink(missing_ok=True)
            self.carry_out(actions)
            handled += 1
        return handled

    def _answer(self, request_id: str, ok: bool, message: str, plan: ServedPlan | None,
                seconds: float) -> None:
        write_json(self.run.requests / f"{request_id}.result.json",
                   {"ok": ok, "message": message, "seconds": round(seconds, 2),
                    "plan": plan.to_json() if plan else None})

    # -- state for `packrat status` ---------------------------------------------------------

    def save_state(self) -> None:
        models = {}
        for m in self.models.values():
            switch = self.switches.get(m.name) or next(
                (s for s in self.draining if s.model == m.name), None)
            loading = self.prewarms.get(m.name)
            models[m.name] = {
                "version": m.plan.version if m.plan else None,
                "estimated_batch": m.estimator.estimate,
                "auto": m.auto,
                "reconfigurations": m.reconfigurations,
                "last_reconfiguration_unix": m.last_reconfiguration_unix,
                "last_error": m.last_error,
                "cores": list(m.cores),
                "calibration": m.calibration,
                "switching": (f"to {switch.plan.describe()} (version {switch.plan.version}): "
                              f"{switch.phase.value}") if switch else None,
                "standby": self.standby.describe(m.name),
                "prewarming": (f"{loading.plan.describe()} (version {loading.plan.version}): "
                               f"{loading.phase.value}") if loading else None,
                "last_prewarm": m.last_prewarm,
                "shared": m.shared,
                "slo_ms": m.slo_ms,
                "slo_met": slo_met(m),
            }
        write_json(self.run.state_file, {
            "controller_pid": os.getpid(), "models": models,
            "torchserve_restarts": self.server_restarts, "torchserve_event": self.server_event,
            "core_split": self.params.core_split.value if len(self.models) > 1 else None,
            "allocation": self.budget.last,
        })
