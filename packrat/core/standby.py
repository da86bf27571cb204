"""Warm standby: versions a switch left registered, loaded and idle, so that switching back to
their plan is only a set-default. Pure: which versions to keep within one memory budget for
all models, least recently used evicted first.

A non-default TorchServe version receives no traffic and an idle worker uses no CPU, so a
standby version costs only memory: its workers' PSS (proportional set size, which counts the
torch libraries the workers share once, not once per worker as RSS does).
"""

from __future__ import annotations

from dataclasses import dataclass

from packrat.core.plan import ServedPlan, Shape, shape_of, slots_for


@dataclass(frozen=True)
class StandbyEntry:
    plan: ServedPlan        # the version and the slots (cores) its workers are pinned to
    memory_mb: float        # its workers' PSS
    last_used: float        # when it stopped being the default (controller clock)

    @property
    def model(self) -> str:
        return self.plan.model


@dataclass(frozen=True)
class StandbySet:
    entries: tuple[StandbyEntry, ...] = ()

    @property
    def memory_mb(self) -> float:
        return sum(e.memory_mb for e in self.entries)

    def of(self, model: str) -> tuple[StandbyEntry, ...]:
        return tuple(e for e in self.entries if e.model == model)

    def find(self, model: str, shape: Shape, cores: tuple[int, ...]) -> StandbyEntry | None:
        """A standby version of model with this shape, pinned to the slots a plan of that
        shape gets on these cores."""
        instances, threads, _ = shape
        if instances * threads > len(cores):  # e.g. the model's cores shrank: none fits
            return None
        slots = slots_for(threads, instances, cores)
        for e in self.entries:
            if e.model == model and shape_of(e.plan) == shape and e.plan.slots == slots:
                return e
        return None

    def without(self, *gone: StandbyEntry) -> StandbySet:
        return StandbySet(tuple(e for e in self.entries if e not in gone))


def make_room(standby: StandbySet, budget_mb: float, need_mb: float
              ) -> tuple[StandbySet, tuple[StandbyEntry, ...]]:
    """Evict least recently used entries until need_mb more fits in the budget: (kept,
    evicted). Everything is evicted if need_mb alone exceeds the budget (the caller then
    does not keep the newcomer either)."""
    kept = sorted(standby.entries, key=lambda e: e.last_used)
    evicted = []
    while kept and sum(e.memory_mb for e in kept) + need_mb > budget_mb:
        evicted.append(kept.pop(0))
    return StandbySet(tuple(kept)), tuple(evicted)


def admit(standby: StandbySet, entry: StandbyEntry, budget_mb: float) -> StandbySet | None:
    """The set with entry added, or None if it does not fit (make_room first)."""
    if standby.memory_mb + entry.memory_mb > budget_mb:
        return None
    return StandbySet(standby.entries + (entry,))


def off_cores(standby: StandbySet, model: str, cores: tuple[int, ...]
              ) -> tuple[StandbySet, tuple[StandbyEntry, ...]]:
    """A model's cores changed: its standby versions pinned elsewhere go. (kept, evicted)."""
    gone = tuple(e for e in standby.of(model) if not _cores(e.plan) <= set(cores))
    return standby.without(*gone), gone


def _cores(plan: ServedPlan) -> set[int]:
    return {c for slot in plan.slots for c in slot}
