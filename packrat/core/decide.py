"""The controller's decisions, as data: from what is known of each model (its live plan, its
estimated B, whether a switch is under way) to the actions an executor carries out. Pure: no
clock (the time is an argument), no HTTP, no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from packrat.core.optimizer import Optimizer
from packrat.core.plan import ServedPlan, Shape, shape_of
from packrat.core.policy import (
    PolicyParams,
    manual_plan,
    plan_for_batch,
    switch_verdict,
)
from packrat.core.switchcost import (
    NO_LEVELS,
    NO_MEASUREMENTS,
    LevelHistory,
    SwitchStats,
    expected_stay_s,
)
from packrat.errors import PackratError, PlanError


@dataclass(frozen=True)
class ModelView:
    """What decide() needs to know of one model."""

    name: str
    optimizer: Optimizer
    cores: tuple[int, ...]
    plan: ServedPlan | None      # the live plan (None: nothing serves yet)
    auto: bool                   # automatic reconfiguration, or a manual plan holds
    estimate: int                # the estimator's B
    switching: bool              # a switch of this model is under way
    hold_until: float            # no automatic switch before (after a failure, after --auto)
    next_version: int
    stats: SwitchStats = NO_MEASUREMENTS     # measured switch costs (defaults until measured)
    levels: LevelHistory = NO_LEVELS         # how long B levels lasted: the expected stay
    warm_shapes: frozenset[Shape] = frozenset()  # (instances, threads, batch_size) in standby
    load: float | None = None    # the estimator's smoothed load (mean requests in the system)


class Reason(Enum):
    AUTO = "auto"          # the estimate calls for a better plan
    MANUAL = "manual"      # `packrat reconfigure`
    RESTORE = "restore"    # TorchServe restarted: serve the plan again
    PREWARM = "prewarm"    # load a likely next plan into standby; the live plan stays


@dataclass(frozen=True)
class SwitchTo:
    """Serve `plan` (a new version) make-before-break. `after`: a model whose switch must end
    before this one starts (e.g. one model shrinks before another grows onto its cores)."""

    plan: ServedPlan
    reason: Reason
    request_id: str | None = None
    after: str | None = None
    warm: bool = False  # the plan's shape is in standby: make that version the default
    why: str = ""       # the policy's reasons, for the log

    @property
    def model(self) -> str:
        return self.plan.model


@dataclass(frozen=True)
class SetAuto:
    model: str
    hold_until: float  # watch the load until then before deciding


@dataclass(frozen=True)
class SetManual:
    model: str  # the live plan holds until --auto


@dataclass(frozen=True)
class Answer:
    """The answer to a `packrat reconfigure` request that needs no switch."""

    request_id: str
    ok: bool
    message: str
    plan: ServedPlan | None


@dataclass(frozen=True)
class Note:
    """Something the user should see in `packrat status` (last_error)."""

    model: str
    message: str


@dataclass(frozen=True)
class Stay:
    """A faster plan exists but is not worth its switch yet (for the log; nothing to do).
    Repeated every interval while it holds: log it when `why` changes."""

    model: str
    why: str


Action = SwitchTo | SetAuto | SetManual | Answer | Note | Stay


def decide(models: list[ModelView], now: float, policy: PolicyParams,
           max_batch_delay_ms: float) -> list[Action]:
    """Automatic switches: for each model under automatic control, not switching and not on
    hold, the plan for its estimated B if the policy says it is worth a switch (a warm one if
    its shape is in standby); Stay where only the switch's cost holds it back."""
    actions: list[Action] = []
    for m in models:
        if not m.auto or m.switching or now < m.hold_until:
            continue
        try:
            target = plan_for_batch(m.optimizer, m.name, str(m.next_version), m.estimate, m.cores)
        except PlanError as e:
            actions.append(Note(m.name, str(e)))
            continue
        warm = shape_of(target) in m.warm_shapes
        verdict = switch_verdict(m.plan, target, m.optimizer, m.estimate, policy,
                                 max_batch_delay_ms, stats=m.stats,
                                 stay_s=expected_stay_s(m.levels, now), warm=warm)
        if verdict.switch:
            actions.append(SwitchTo(target, Reason.AUTO, warm=warm, why=verdict.why))
        elif (j := verdict.judgement) is not None and j.relative >= max(policy.min_gain, 1e-9):
            actions.append(Stay(m.name, verdict.why))  # faster, but not by enough for the cost
    return actions


@dataclass(frozen=True)
class Reconfigure:
    """A `packrat reconfigure` request: `auto`, or the plan for `for_batch`, or a manual
    ⟨instances, threads, batch⟩."""

    model: str
    auto: bool = False
    for_batch: int | None = None
    instances: int | None = None
    threads: int | None = None
    batch: int | None = None
    id: str = ""  # the request file's name, given when the controller reads it

    def to_json(self) -> dict:
        """The request file's content (the id is its name)."""
        out: dict = {"model": self.model}
        if self.auto:
            out["auto"] = True
        for key in ("for_batch", "instances", "threads", "batch"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @staticmethod
    def from_json(request_id: str, data: object) -> "Reconfigure":
        """Raises PackratError naming what is wrong with the request."""
        if not isinstance(data, dict):
            raise PackratError(f"request {request_id} is not a JSON object")

        def integer(key: str) -> int | None:
            value = data.get(key)
            if value is None:
                return None
            if type(value) is not int:
                raise PackratError(f"{key} must be an integer, got {value!r}")
            return value

        return Reconfigure(str(data.get("model")), bool(data.get("auto")),
                           integer("for_batch"), integer("instances"), integer("threads"),
                           integer("batch"), id=request_id)


def decide_request(models: list[ModelView], request: Reconfigure, now: float,
                   watch_s: float) -> list[Action]:
    """What to do about a reconfigure request. watch_s: after --auto, how long to watch the
    load before deciding (the estimate may still describe the manual period's load)."""
    view = next((m for m in models if m.name == request.model), None)
    if view is None:
        served = ", ".join(m.name for m in models) or "none"
        return [Answer(request.id, False, f"no model {request.model!r} is served; served: "
                                          f"{served}", None)]
    if request.auto:
        return [SetAuto(view.name, now + watch_s),
                Answer(request.id, True, f"{view.name}: automatic reconfiguration on", view.plan)]
    version = str(view.next_version)
    try:
        if request.for_batch is not None:
            opt = view.optimizer
            if not 1 <= request.for_batch <= opt.max_servable:
                raise PlanError(f"--for-batch {request.for_batch}: the profile serves B = 1.."
                                f"{opt.max_servable} on {len(view.cores)} cores")
            plan = plan_for_batch(opt, view.name, version, request.for_batch, view.cores)
        elif None in (request.instances, request.threads, request.batch):
            raise PlanError("give --instances, --threads and --batch together, or --for-batch, "
                            "or --auto")
        else:
            plan = manual_plan(view.optimizer, view.name, version, request.instances,
                               request.threads, request.batch, view.cores)
    except PlanError as e:
        return [Answer(request.id, False, f"bad request: {e}", view.plan)]
    if plan.same_shape(view.plan):
        return [SetManual(view.name),
                Answer(request.id, True, f"{view.name} already serves {plan.describe()}",
                       view.plan)]
    return [SwitchTo(plan, Reason.MANUAL, request_id=request.id)]


# Ahead of need: a settled model whose load leaves its cores headroom gets the plans of the
# neighbouring batch sizes loaded into standby, so that the next change is warm too.
PREWARM_SETTLED_S = 10.0    # the estimate has held this long
PREWARM_UTILIZATION = 0.5   # at most this share of the live plan's batch capacity in use


def prewarm(m: ModelView, now: float) -> SwitchTo | None:
    """A plan to load into standby for m, or None: the plan for B/2 or 2B (the next levels
    the estimator reports), neither live nor already warm, while m is under automatic
    control, settled and using at most half its live plan's capacity. The caller checks
    that it fits the standby budget without evicting anything."""
    settled = m.levels.since is not None and now - m.levels.since >= PREWARM_SETTLED_S
    load = m.load if m.load is not None else m.estimate
    if (not m.auto or m.switching or now < m.hold_until or m.plan is None or not settled
            or load > PREWARM_UTILIZATION * m.plan.instances * m.plan.batch_size):
        return None
    live = shape_of(m.plan)
    for batch in (2 * m.estimate, m.estimate // 2):
        if not 1 <= batch <= m.optimizer.max_servable:
            continue
        try:
            target = plan_for_batch(m.optimizer, m.name, str(m.next_version), batch, m.cores)
        except PlanError:
            continue
        if shape_of(target) != live and shape_of(target) not in m.warm_shapes:
            return SwitchTo(target, Reason.PREWARM, why=f"ahead of need: the plan for B={batch}")
    return None
