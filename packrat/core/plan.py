"""A served plan: what one TorchServe model version runs, and the cores of each worker."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from packrat.errors import PlanError


def describe(instances: int, threads: int | None, batch_size: int) -> str:
    """The one spelling of <i, t, b>: "2x<t=1,b=4>" (threads None: unpinned, TorchServe's
    default threads)."""
    inner = f"t={threads}" if threads is not None else "unpinned"
    return f"{instances}x<{inner},b={batch_size}>"


@dataclass(frozen=True)
class ServedPlan:
    """What one TorchServe model version runs: `instances` workers of `threads` threads,
    batch_size `batch_size`, worker K pinned to slots[K]."""

    model: str
    version: str
    threads: int
    instances: int
    batch_size: int
    slots: tuple[tuple[int, ...], ...]
    predicted_ms: float
    for_batch: int
    # an idle model's worker on the shared core, which a busy model's plan also holds (the
    # one exception to "no core in two models' plans"; several models, --core-split auto)
    shared: bool = False

    def same_shape(self, other: "ServedPlan | None") -> bool:
        return other is not None and (self.threads, self.instances, self.batch_size) == (
            other.threads, other.instances, other.batch_size)

    def describe(self) -> str:
        return describe(self.instances, self.threads, self.batch_size)

    def predicted(self) -> str:
        """Its predicted batch latency in words (a manual plan may use points the profiler
        skipped, and then the profile cannot tell)."""
        return (f"predicted {self.predicted_ms:.1f} ms" if math.isfinite(self.predicted_ms)
                else "latency not profiled")

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "ServedPlan":
        data = dict(data)
        data["slots"] = tuple(tuple(s) for s in data["slots"])
        return ServedPlan(**data)



# (instances, threads, batch_size): what makes two plans of a model interchangeable.
Shape = tuple[int, int, int]


def shape_of(plan: ServedPlan) -> Shape:
    return (plan.instances, plan.threads, plan.batch_size)


def slots_for(threads: int, instances: int, cores: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Give instance K the K-th run of `threads` cores, in Packrat's core order (physical first)."""
    if threads * instances > len(cores):
        raise PlanError(
            f"{instances} instances x {threads} threads need {threads * instances} cores; "
            f"only {len(cores)} are available ({','.join(map(str, cores))})"
        )
    return tuple(tuple(cores[k * threads:(k + 1) * threads]) for k in range(instances))


@dataclass(frozen=True)
class Unpinned:
    """TorchServe's default configuration (what `packrat bench` compares against): workers
    that pin nothing and keep torch's default threads."""

    instances: int
    batch_size: int

    def describe(self) -> str:
        return describe(self.instances, None, self.batch_size)


# How a version's workers run: pinned to a plan's slots, or as TorchServe starts them.
Layout = ServedPlan | Unpinned
