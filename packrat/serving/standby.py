"""The controller's warm standby versions: old versions a switch kept registered, loaded and
idle within one memory budget for all models, and the switches back to them. The choices
are packrat.core.standby's; this holds the set and measures the memory (PSS)."""

from __future__ import annotations

import logging
from dataclasses import replace

from packrat.core.decide import Reason, SwitchTo
from packrat.core.estimator import EstimatorParams
from packrat.core.optimizer import Optimizer
from packrat.core.plan import ServedPlan, Shape
from packrat.core.policy import plan_for_batch
from packrat.core.standby import (
    StandbyEntry,
    StandbySet,
    admit,
    make_room,
    off_cores,
    shape_of,
)
from packrat.core.switchcost import patience_for
from packrat.errors import PlanError
from packrat.measure.memory import pss_mb
from packrat.serving.rundir import RunDir
from packrat.serving.versions import remove_version_files

log = logging.getLogger(__name__)


class Standby:
    def __init__(self, run: RunDir, budget_mb: float) -> None:
        self.run, self.budget_mb = run, budget_mb
        self.set = StandbySet()
        # (model, version) -> MB it will hold once a switch under way parks it
        self.parking: dict[tuple[str, str], float] = {}

    def take(self, action: SwitchTo, cores: tuple[int, ...]) -> tuple[SwitchTo, bool]:
        """The action switching to a standby version of the same plan if there is one
        (which leaves the set: it becomes live), and whether it does."""
        if action.reason in (Reason.RESTORE, Reason.PREWARM) or not self.budget_mb:
            return action, False
        entry = self.set.find(action.model, shape_of(action.plan), cores)
        if entry is None:
            return action, False
        self.set = self.set.without(entry)
        plan = replace(entry.plan, predicted_ms=action.plan.predicted_ms,
                       for_batch=action.plan.for_batch)
        return replace(action, plan=plan), True

    def room_for(self, old: ServedPlan | None, reason: Reason
                 ) -> tuple[tuple[ServedPlan, ...], bool]:
        """(standby versions to delete first, whether the old version stays as standby once
        drained): the least recently used go so that it fits the budget, before anything new
        is registered; nothing is kept if it alone does not fit."""
        # (a reallocation's old version is on cores the model leaves, or on fewer than it
        # gets: no use as standby)
        if not self.budget_mb or old is None or reason in (Reason.RESTORE, Reason.PREWARM,
                                                           Reason.REALLOCATE):
            return (), False
        need = pss_mb(self.run.slot_pids(old.model, old.version).values())
        room = self.budget_mb - sum(self.parking.values())  # versions other switches will park
        if not 0 < need <= room:
            return (), False
        self.set, evicted = make_room(self.set, room, need)
        self.parking[(old.model, old.version)] = need
        for e in evicted:
            log.info("%s: evicting standby version %s (%s, %.0f MB)", e.model, e.plan.version,
                     e.plan.describe(), e.memory_mb)
        return tuple(e.plan for e in evicted), True

    def off_cores(self, model: str, cores: tuple[int, ...]) -> tuple[ServedPlan, ...]:
        """The model's cores changed: its standby versions pinned elsewhere leave the set
        (the caller deletes them)."""
        self.set, gone = off_cores(self.set, model, cores)
        for e in gone:
            log.info("%s: standby version %s (%s) is pinned off the model's cores %s; deleting "
                     "it", model, e.plan.version, e.plan.describe(), ",".join(map(str, cores)))
        return tuple(e.plan for e in gone)

    def park(self, model: str, parked: ServedPlan | None, now: float,
             intended: str | None = None) -> ServedPlan | None:
        """A switch of model ended, the version it meant to park (`intended`) parked or not;
        returns a version to delete if it no longer fits (another switch took the room
        meanwhile)."""
        need = self.parking.pop((model, intended), 0.0) if intended is not None else 0.0
        if parked is None:
            return None
        admitted = admit(self.set, StandbyEntry(parked, need, now), self.budget_mb)
        if admitted is None:
            log.info("%s: no room for version %s in standby; deleting it", model, parked.version)
            return parked
        self.set = admitted
        log.info("%s: version %s (%s, %.0f MB) kept as standby; %.0f of %.0f MB in use", model,
                 parked.version, parked.describe(), need, self.set.memory_mb, self.budget_mb)
        return None

    def fits(self, live: ServedPlan, target: ServedPlan) -> bool:
        """Would target, loaded ahead of need, fit the budget without evicting anything?
        Its memory is estimated from the live version's per-worker PSS."""
        pids = self.run.slot_pids(live.model, live.version).values()
        per_worker = pss_mb(pids) / max(1, len(pids))
        need = per_worker * target.instances
        room = self.budget_mb - self.set.memory_mb - sum(self.parking.values())
        if not self.budget_mb or not 0 < need <= room:
            return False
        self.parking[(target.model, target.version)] = need
        return True

    def estimator_params(self, model: str, optimizer: Optimizer, cores: tuple[int, ...],
                         candidate: int | None, est: EstimatorParams) -> EstimatorParams:
        """A new B whose plan is warm in standby costs little to switch to: the estimator
        adopts it after a third of its usual patience."""
        if candidate is None or not self.set.of(model):
            return est
        try:
            target = plan_for_batch(optimizer, model, "0", candidate, cores)
        except PlanError:
            return est
        if shape_of(target) not in self.shapes(model, cores):
            return est
        return replace(est, patience=patience_for(True, est.patience),
                       slow_patience=patience_for(True, est.slow_patience))

    def lost(self) -> None:
        """TorchServe died and took the standby versions with it."""
        for e in self.set.entries:
            remove_version_files(self.run, e.model, e.plan.version)
        self.set, self.parking = StandbySet(), {}

    def shapes(self, model: str, cores: tuple[int, ...]) -> frozenset[Shape]:
        """The plan shapes of model a switch on these cores would find in standby."""
        return frozenset(shape_of(e.plan) for e in self.set.of(model)
                         if self.set.find(model, shape_of(e.plan), cores) is not None)

    def describe(self, model: str) -> list[dict]:
        """For state.json (and so `packrat status`)."""
        return [{"version": e.plan.version, "plan": e.plan.describe(),
                 "memory_mb": round(e.memory_mb, 1)} for e in self.set.of(model)]
