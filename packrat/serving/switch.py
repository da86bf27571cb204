"""A switch of one model to a new plan, as a state machine that the controller advances on
each tick without ever blocking its loop.

The steps (make-before-break; see packrat.serving.versions for each):
1. PREPARING: the new version's directory, plan and slot directory;
2. REGISTERING: TorchServe accepts the version and starts its workers (the call does not wait
   for them: TorchServe would hold serving connections meanwhile); each claims a slot and
   pins itself to that slot's cores before the model loads;
3. STARTING: every worker is up and holds its slot on the right cores, or one wrote why it
   failed to start;
4. WARMING: full batches sent to the new version explicitly;
5. PROMOTING: set-default: new requests go to it (the switch has succeeded from here);
6. DRAINING: wait until the old version has nothing queued or running (packrat.core.drain);
7. RETIRING: delete the old version and its files, or keep it registered and idle as a warm
   standby (packrat.core.standby) when the controller asks to.
A switch to a standby version skips steps 1-4: it checks that the version's workers still
hold their slots and makes it the default. Standby versions the controller evicts to make
room are deleted first, before anything new is registered.
A failure before step 5 deletes the new version and leaves the old one serving.

Each blocking call (a REST call, the warm-up, a look at the workers) runs on a thread pool;
the switch is a generator that yields the call's future (or a time to sleep until) and is
resumed with the result on a later tick. So while one model's workers start, the controller
keeps sampling every model, answers requests, watches TorchServe and runs other switches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from packrat.core.decide import Reason, SwitchTo
from packrat.core.drain import Drain, observe_drain, start_drain
from packrat.core.plan import ServedPlan
from packrat.errors import PackratError, TorchServeError
from packrat.model.sample import Sample
from packrat.serving.rundir import RunDir
from packrat.serving.versions import (
    STARTUP_TIMEOUT_S,
    check_workers,
    prepare_version,
    remove_version_files,
    retire_version,
    warm_version,
)
from packrat.torchserve import TorchServeClient, worker_cpu_seconds

log = logging.getLogger(__name__)


class Phase(Enum):
    WAITING = "waiting for another model's switch"
    EVICTING = "deleting evicted standby versions"
    CHECKING = "checking the standby version"
    PREPARING = "preparing"
    REGISTERING = "registering"
    STARTING = "starting workers"
    WARMING = "warming"
    PROMOTING = "making it the default"
    DRAINING = "draining the old version"
    RETIRING = "deleting the old version"
    PARKING = "keeping the old version as standby"
    ROLLING_BACK = "rolling back"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class SwitchResult:
    ok: bool
    model: str
    plan: ServedPlan | None  # what serves now
    seconds: float
    message: str


@dataclass(frozen=True)
class SwitchSettings:
    max_batch_delay_ms: int
    drain_timeout_s: float
    poll_s: float = 0.05       # between two looks at a draining version or starting workers
    response_timeout_s: int = 120
    startup_timeout_s: float = STARTUP_TIMEOUT_S  # register -> every worker up on its slot


@dataclass(frozen=True)
class SwitchContext:
    """What every switch shares: where and how to act."""

    run: RunDir
    client: TorchServeClient
    pool: Executor                    # runs the blocking calls
    clock: Callable[[], float]
    settings: SwitchSettings


Step = Generator["Future | float", object, None]


class Task:
    """A generator of steps driven by tick(): each step yields a Future (resumed with its
    result, or its exception raised inside the generator) or a time to sleep until."""

    def __init__(self, ctx: SwitchContext) -> None:
        self.ctx = ctx
        self.finished = False
        self._steps = self._run()
        self._waiting: Future | float | None = None

    def _run(self) -> Step:
        raise NotImplementedError

    def tick(self) -> None:
        """Advance as far as possible without waiting."""
        while not self.finished:
            value, error = None, None
            if isinstance(self._waiting, Future):
                if not self._waiting.done():
                    return
                try:
                    value = self._waiting.result()
                except Exception as e:  # the step's own error, raised inside the generator
                    error = e
            elif isinstance(self._waiting, float) and self.ctx.clock() < self._waiting:
                return
            try:
                self._waiting = (self._steps.throw(error) if error is not None
                                 else self._steps.send(value))
            except StopIteration:
                self.finished = True

    def _call(self, fn, *args, **kwargs) -> Step:
        """Run fn on the pool; the generator resumes with its result (or its exception)."""
        return (yield self.ctx.pool.submit(fn, *args, **kwargs))

    def _pause(self, seconds: float) -> Step:
        yield self.ctx.clock() + seconds


class Switch(Task):
    """from_standby: action.plan is a registered standby version. evict: standby versions to
    delete before anything else. park_old: keep the old version as standby once drained
    (self.parked is then set)."""

    def __init__(self, ctx: SwitchContext, action: SwitchTo, old: ServedPlan | None,
                 base_dir: Path, warm: Sample,
                 on_promoted: Callable[["Switch"], None] = lambda s: None, *,
                 from_standby: bool = False, evict: tuple[ServedPlan, ...] = (),
                 park_old: bool = False) -> None:
        self.action, self.old = action, old
        self.plan = action.plan
        self.base_dir, self.warm = base_dir, warm
        self.on_promoted = on_promoted
        self.from_standby, self.evict, self.park_old = from_standby, evict, park_old
        # ahead of need: start the version and keep it as standby; the live one stays default
        self.prewarm = action.reason is Reason.PREWARM
        self.parked: ServedPlan | None = None
        self.promoted_at: float | None = None
        self.phase = Phase.WAITING
        self.started = ctx.clock()
        self.result: SwitchResult | None = None
        super().__init__(ctx)

    @property
    def model(self) -> str:
        return self.plan.model

    @property
    def parks(self) -> str | None:
        """The version this switch keeps as standby if all goes well (its memory is held for
        it in the budget meanwhile)."""
        if self.prewarm:
            return self.plan.version
        return self.old.version if self.park_old and self.old is not None else None

    def record(self, wall_now: float, clock_now: float, ok: bool) -> dict:
        """The switch for RUN/switches.jsonl, written once it is promoted (or has ended
        without): decision (its start) to new default."""
        return {"model": self.model, "reason": self.action.reason.value, "ok": ok,
                "at_unix": round(wall_now - (clock_now - self.started), 3),
                "seconds": round((self.promoted_at or clock_now) - self.started, 3),
                "warm": self.from_standby, "version": self.plan.version,
                "plan": {"instances": self.plan.instances, "threads": self.plan.threads,
                         "batch": self.plan.batch_size}}

    def abort(self, why: str) -> None:
        """TorchServe is gone: stop here and remove the new version's files."""
        if self.result is not None:
            return
        self._steps.close()
        self.finished = True
        remove_version_files(self.ctx.run, self.model, self.plan.version)
        self._finish(self.phase in (Phase.DRAINING, Phase.RETIRING, Phase.PARKING),
                     f"switch of {self.model} to {self.plan.describe()} stopped: {why}")

    # -- the steps --------------------------------------------------------------------------

    def _run(self) -> Step:
        ctx, plan, name = self.ctx, self.plan, self.model
        log.info("%s: %s %s -> %s (version %s, %s at B=%d)", name,
                 "prewarming" if self.prewarm else "switching",
                 self.old.describe() if self.old else "nothing", plan.describe(),
                 plan.version, plan.predicted(), plan.for_batch)
        try:
            for gone in self.evict:
                self.phase = Phase.EVICTING
                try:
                    yield from self._call(retire_version, ctx.run, ctx.client, gone.model,
                                          gone.version)
                except PackratError as e:
                    log.warning("%s: evicting standby version %s failed: %s", gone.model,
                                gone.version, e)
            if self.from_standby:
                self.phase = Phase.CHECKING
                check = yield from self._call(check_workers, ctx.run, ctx.client, name,
                                              plan.version, plan)
                if not check.ready:  # e.g. a worker TorchServe is restarting
                    raise PackratError(f"standby version {plan.version} is not ready "
                                       f"({check.workers} workers, {check.slots} slots)")
            else:
                yield from self._start_new()
            if self.prewarm:
                self.parked = plan
                self._finish(True, f"{name}: {plan.describe()} loaded as standby version "
                             f"{plan.version}")
                return
            self.phase = Phase.PROMOTING
            yield from self._call(ctx.client.set_default, name, plan.version)
        except (PackratError, OSError) as e:
            yield from self._roll_back(e)
            return
        self.promoted_at = ctx.clock()
        self.on_promoted(self)
        if self.old is not None:
            self.phase = Phase.DRAINING
            if self.park_old:
                if (yield from wait_drained(self, name, self.old)) is Drain.DRAINED:
                    self.phase = Phase.PARKING
                    self.parked = self.old
            else:
                yield from retire_when_drained(self, name, self.old)
        self._finish(True, f"{name} serves {plan.describe()} as version {plan.version}"
                     + (" (from standby)" if self.from_standby else ""))

    def _start_new(self) -> Step:
        """Steps 1-4: make, register, check and warm the new version."""
        ctx, plan, name = self.ctx, self.plan, self.model
        s = ctx.settings
        self.phase = Phase.PREPARING
        url = yield from self._call(prepare_version, ctx.run, self.base_dir, name,
                                    plan.version, plan,
                                    max_batch_delay_ms=s.max_batch_delay_ms,
                                    background=self.prewarm)
        self.phase = Phase.REGISTERING
        yield from self._call(ctx.client.register, url, model_name=name,
                              batch_size=plan.batch_size,
                              max_batch_delay_ms=s.max_batch_delay_ms,
                              initial_workers=plan.instances,
                              response_timeout_s=s.response_timeout_s, wait=False)
        self.phase = Phase.STARTING
        deadline = ctx.clock() + s.startup_timeout_s
        while not (check := (yield from self._call(
                check_workers, ctx.run, ctx.client, name, plan.version, plan))).ready:
            if check.failed or ctx.clock() > deadline:
                raise check.error(ctx.run, s.startup_timeout_s)
            yield from self._pause(s.poll_s)
        self.phase = Phase.WARMING
        yield from self._call(warm_version, ctx.client, name, plan.version,
                              plan.instances * plan.batch_size, self.warm)

    def _roll_back(self, error: Exception) -> Step:
        self.phase = Phase.ROLLING_BACK
        message = f"switch of {self.model} to {self.plan.describe()} failed: {error}"
        if self.old is not None:
            message += f"; version {self.old.version} ({self.old.describe()}) keeps serving"
        log.error("%s", message)
        try:
            yield from self._call(retire_version, self.ctx.run, self.ctx.client, self.model,
                                  self.plan.version)
        except PackratError as e:
            log.warning("%s: could not delete failed version %s: %s", self.model,
                        self.plan.version, e)
            remove_version_files(self.ctx.run, self.model, self.plan.version)
        self._finish(False, message)

    def _finish(self, ok: bool, message: str) -> None:
        self.phase = Phase.DONE if ok else Phase.FAILED
        seconds = self.ctx.clock() - self.started
        if ok:
            log.info("%s after %.1f s", message, seconds)
        self.result = SwitchResult(ok, self.model, self.plan if ok else self.old, seconds,
                                   message)


def wait_drained(task: Task, model: str, old: ServedPlan) -> Step:
    """Wait until nothing is queued or running on the old version: DRAINED, or None if it is
    gone, TIMED_OUT if it stays busy, or cannot be looked at (it is left registered then)."""
    ctx = task.ctx
    watch = start_drain(ctx.clock(), ctx.settings.max_batch_delay_ms, old.predicted_ms,
                        ctx.settings.drain_timeout_s)
    while True:
        try:
            look = yield from task._call(_observe_version, ctx.client, model,
                                         old.version)
        except TorchServeError as e:
            log.warning("%s: cannot look at version %s (%s); left registered",
                        model, old.version, e)
            return Drain.TIMED_OUT
        if look is None:
            return None  # already gone
        watch, verdict = observe_drain(watch, ctx.clock(), *look)
        if verdict is Drain.DRAINED:
            return verdict
        if verdict is Drain.TIMED_OUT:
            log.warning("%s: version %s still busy after %.0f s; left registered",
                        model, old.version, ctx.settings.drain_timeout_s)
            return verdict
        yield from task._pause(ctx.settings.poll_s)


def retire_when_drained(task: Task, model: str, old: ServedPlan) -> Step:
    """Delete the old version once nothing is queued or running on it."""
    verdict = yield from wait_drained(task, model, old)
    if verdict is not Drain.DRAINED:
        return  # gone, or left registered
    if isinstance(task, Switch):
        task.phase = Phase.RETIRING
    try:
        yield from task._call(retire_version, task.ctx.run, task.ctx.client, model, old.version)
    except TorchServeError as e:
        log.warning("%s: deleting version %s failed: %s", model, old.version, e)


class Retire(Task):
    """Only the drain-then-delete of a switch: for a leftover version found at start-up."""

    def __init__(self, ctx: SwitchContext, model: str, old: ServedPlan) -> None:
        self.model, self.old = model, old
        super().__init__(ctx)

    def _run(self) -> Step:
        yield from retire_when_drained(self, self.model, self.old)


def drive(task: Task, sleep: Callable[[float], None], poll_s: float) -> None:
    """Run a task to its end, blocking (at start-up, before the loop runs)."""
    task.tick()
    while not task.finished:
        sleep(poll_s)
        task.tick()


def _observe_version(client: TorchServeClient, name: str,
                     version: str) -> tuple[int | None, float] | None:
    """(pending requests, workers' CPU seconds) of a version; None if it is not registered."""
    info = next((v for v in client.versions(name) if v.version == version), None)
    if info is None:
        return None
    return info.pending_requests, worker_cpu_seconds(info)
