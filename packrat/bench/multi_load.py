"""The several-models benchmark's load and options (pure): the models and SLOs asked for,
each model's busy and idle rates and its per-phase trace. See packrat.bench.multi for the design.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packrat.bench.trace import (
    MAX_BATCH,
    MAX_BATCH_DELAY_MS,
    best_throughput,
)
from packrat.core.optimizer import Optimizer
from packrat.core.reallocate import IDLE_SHARE
from packrat.core.trace import Step, Trace
from packrat.errors import PackratError

CONFIGURATIONS = ("torchserve-default", "overlap", "even", "allocator")
CORE_SPLIT = {"overlap": "overlap", "even": "even", "allocator": "auto"}  # --core-split
SLO_BASIS = ("overlap", "torchserve-default", "even", "allocator")  # where the SLO comes from
TAKES_SLO = ("even", "allocator")  # configurations `--slo` is passed to
DEFAULT_MODELS = "small-cnn,resnet50"
DEFAULT_PHASE_S = 60.0
BUSY_FRACTION = 0.5   # of a model's best-plan throughput on all the cores
IDLE_RPS = 0.5        # an idle model's trickle of requests
PHASES = ((True, False), (False, True), (True, True))  # per phase: (A busy, B busy)
SAMPLE_EVERY_S = 1.0  # the allocation, from `packrat status`


def parse_models(spec: str) -> tuple[tuple[str, str], ...]:
    """(name, zoo model) pairs from "a=small-cnn,b=resnet50" or "small-cnn,resnet50" (a zoo
    name alone is also the model's name): exactly two, with distinct names."""
    pairs = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, zoo = item.partition("=")
        name, zoo = name.strip(), zoo.strip()
        if not sep:
            zoo = name
        if not name or not zoo:
            raise PackratError(f"--models {spec}: {item!r} is not NAME=ZOO or ZOO")
        pairs.append((name, zoo))
    names = [n for n, _ in pairs]
    if len(pairs) != 2:
        raise PackratError(f"--models {spec}: the benchmark takes exactly two models, got "
                           f"{len(pairs)} (e.g. a=small-cnn,b=resnet50)")
    if len(set(names)) != len(names):
        raise PackratError(f"--models {spec}: model {names[0]!r} is named twice; give the "
                           "same zoo model two names, e.g. a=small-cnn,b=small-cnn")
    return tuple(pairs)


def parse_slos(specs: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """{model: SLO ms} from NAME=MS items (each spec may hold several, comma-separated)."""
    out: dict[str, float] = {}
    for spec in specs:
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            name, sep, ms = item.partition("=")
            name = name.strip()
            if not sep:
                raise PackratError(f"--slo {item}: expected NAME=MS")
            if name not in names:
                raise PackratError(f"--slo {item}: no model {name!r} (models: "
                                   f"{', '.join(names)})")
            try:
                value = float(ms)
            except ValueError:
                raise PackratError(f"--slo {item}: {ms.strip()!r} is not a number of "
                                   "milliseconds") from None
            if not (math.isfinite(value) and value > 0):
                raise PackratError(f"--slo {item}: the SLO must be > 0 ms")
            out[name] = value
    return out


@dataclass(frozen=True)
class ModelLoad:
    """One model's load: `busy_rps` while busy, `idle_rps` while idle."""

    name: str
    zoo: str
    best_rps: float   # the best plan's throughput on all the cores
    busy_rps: float
    idle_rps: float

    def rate(self, busy: bool) -> float:
        return self.busy_rps if busy else self.idle_rps

    def to_json(self) -> dict:
        return {"zoo": self.zoo, "best_rps": rounded(self.best_rps), "busy_rps": rounded(self.busy_rps),
                "idle_rps": rounded(self.idle_rps)}


def idle_ceiling(opt: Optimizer) -> float:
    """Half the allocator's idle line: IDLE_SHARE of one 1-thread worker's requests per
    second at batch 1 (inf where the profile cannot tell)."""
    ms = opt.latency(1, 1)
    return 0.5 * IDLE_SHARE * 1000.0 / ms if ms > 0 and math.isfinite(ms) else math.inf


def model_load(name: str, zoo: str, opt: Optimizer, busy_fraction: float = BUSY_FRACTION,
               idle_rps: float = IDLE_RPS) -> ModelLoad:
    """busy = busy_fraction x the best served plan's throughput on opt's cores; idle =
    idle_rps, at most idle_ceiling(opt)."""
    if not 0 < busy_fraction <= 1:
        raise PackratError(f"--busy-fraction must be in (0, 1], got {busy_fraction}")
    if not (math.isfinite(idle_rps) and idle_rps >= 0):
        raise PackratError(f"--idle-rps must be >= 0, got {idle_rps}")
    best = best_throughput(opt)[0]
    busy = busy_fraction * best
    idle_rps = min(idle_rps, idle_ceiling(opt))
    if not idle_rps < busy:
        raise PackratError(f"{name}: its idle rate {idle_rps:g} rps is not below its busy rate "
                           f"{busy:.2f} rps ({busy_fraction:g} x {best:.2f}); lower --idle-rps")
    return ModelLoad(name, zoo, best, busy, idle_rps)


def model_trace(load: ModelLoad, k: int, phase_s: float) -> Trace:
    """Model k's rate over the three phases (k = 0: A, 1: B)."""
    if not (math.isfinite(phase_s) and phase_s > 0):
        raise PackratError(f"--phase-s must be > 0, got {phase_s}")
    return Trace(load.name, len(PHASES) * phase_s,
                 tuple(Step(i * phase_s, load.rate(p[k])) for i, p in enumerate(PHASES)))


def phase_names(names: Sequence[str]) -> tuple[str, ...]:
    """e.g. ("a busy, b idle", "a idle, b busy", "both busy")."""
    a, b = names
    return tuple("both busy" if pa and pb else
                 f"{a} {'busy' if pa else 'idle'}, {b} {'busy' if pb else 'idle'}"
                 for pa, pb in PHASES)


def trace_seed(seed: int, k: int) -> int:
    return 1000 * seed + k


def warmup_seed(seed: int, k: int) -> int:
    return 1000 * seed + 500 + k


@dataclass(frozen=True)
class MultiOptions:
    models: tuple[tuple[str, str], ...]      # (name, zoo model), two
    phase_s: float = DEFAULT_PHASE_S
    busy_fraction: float = BUSY_FRACTION
    idle_rps: float = IDLE_RPS
    seed: int = 0
    slos: dict[str, float] = field(default_factory=dict)  # given; the others measured
    profiles: dict[str, Path] = field(default_factory=dict)  # given (model: CSV); others measured
    configurations: tuple[str, ...] = CONFIGURATIONS
    out: Path = Path("bench-out")
    cores: int | None = None                 # None: all usable
    max_batch: int = MAX_BATCH
    max_batch_delay_ms: int = MAX_BATCH_DELAY_MS
    calibrate: bool = True
    quiet_wait_s: float = 120.0              # before each warm-up, for other processes to end

    def check(self) -> None:
        """Errors found before anything starts."""
        parse_models(",".join(f"{n}={z}" for n, z in self.models))
        unknown = [c for c in self.configurations if c not in CONFIGURATIONS]
        if unknown or not self.configurations:
            raise PackratError(f"--configs: {', '.join(unknown) or 'none given'}; choose among "
                               f"{', '.join(CONFIGURATIONS)}")
        if not (math.isfinite(self.phase_s) and self.phase_s > 0):
            raise PackratError(f"--phase-s must be > 0, got {self.phase_s}")
        if not 0 < self.busy_fraction <= 1:
            raise PackratError(f"--busy-fraction must be in (0, 1], got {self.busy_fraction}")
        if not (math.isfinite(self.idle_rps) and self.idle_rps >= 0):
            raise PackratError(f"--idle-rps must be >= 0, got {self.idle_rps}")
        names = [n for n, _ in self.models]
        parse_slos([f"{n}={v}" for n, v in self.slos.items()], names)
        for name, csv in self.profiles.items():
            if name not in names:
                raise PackratError(f"--profiles {name}={csv}: no model {name!r} (models: "
                                   f"{', '.join(names)})")
            if not Path(csv).is_file():
                raise PackratError(f"--profiles {name}={csv}: no such file")


def parse_profiles(spec: str | None) -> dict[str, Path]:
    """{model: profile CSV} from "a=A.csv,b=B.csv" (MultiOptions.check checks them)."""
    out: dict[str, Path] = {}
    for item in (s.strip() for s in (spec or "").split(",")):
        if not item:
            continue
        name, sep, csv = item.partition("=")
        if not sep or not name.strip() or not csv.strip():
            raise PackratError(f"--profiles {item}: expected NAME=FILE.csv")
        out[name.strip()] = Path(csv.strip())
    return out


def rounded(x: float | None, digits: int = 3) -> float | None:
    """x rounded for the JSON; None for None or a non-finite x."""
    return None if x is None or not math.isfinite(x) else round(float(x), digits)
