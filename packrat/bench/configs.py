"""The benchmark's configurations and statistics: which <i, t, b> to measure for B, how long,
and how a row of results (`Row`; `Row.to_json()` is an object of bench.json) is made from
their rounds. Pure."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

from packrat.core.optimizer import Optimizer
from packrat.core.plan import describe
from packrat.core.stats import percentile
from packrat.errors import PackratError
from packrat.measure.foreign import FOREIGN_LIMIT_CORES

DEFAULT_OUT = Path("bench-out")
MAX_BATCH_DELAY_MS = 20
QUIET_WAIT_S = 120.0  # per measurement, for other processes to finish
PREDICTION_TOLERANCE = 0.15  # |predicted / measured - 1| above this is flagged
MIN_SECONDS, MAX_SECONDS, MIN_BATCHES = 2.0, 15.0, 8


@dataclass(frozen=True, order=True)
class Config:
    """One TorchServe version: `instances` workers with `batch_size`; `threads` pinned threads
    each on their own cores, or None for TorchServe's default (unpinned, torch's threads)."""

    threads: int | None
    instances: int
    batch_size: int

    @property
    def pinned(self) -> bool:
        return self.threads is not None

    def describe(self) -> str:
        return describe(self.instances, self.threads, self.batch_size)


def normalized(threads: int | None, instances: int, batch: int) -> Config:
    """The configuration that serves B with `instances` workers of batch size ceil(B / i),
    counting only the workers that get a share of B (ceil(B / b)); an extra worker would stand
    idle, so i and that smaller i are the same configuration."""
    size = -(-batch // instances)
    return Config(threads, -(-batch // size), size)


def oracle_configs(cores: int, batch: int) -> tuple[Config, ...]:
    """Every servable <i, t, b> for B on N cores: t = 1..N, i = 1..N//t, b = ceil(B/i),
    deduplicated (see `normalized`), sorted by threads, instances."""
    if cores < 1 or batch < 1:
        raise PackratError(f"need cores >= 1 and B >= 1, got cores={cores}, B={batch}")
    found = {normalized(t, i, batch) for t in range(1, cores + 1) for i in range(1, cores // t + 1)}
    return tuple(sorted(found))


def baseline_config(cores: int, batch: int) -> Config:
    return Config(cores, 1, batch)


def default_config(cores: int, batch: int) -> Config:
    """TorchServe's CPU default: one worker per core, no pinning, batch size B."""
    return Config(None, cores, batch)


def rotated(items: list, r: int) -> list:
    if not items:
        return []
    k = r % len(items)
    return items[k:] + items[:k]


def predicted_ms(opt: Optimizer, cfg: Config, batch: int) -> float:
    """The profile's latency for B requests on cfg (inf where the profile cannot tell);
    TorchServe's default is predicted as the baseline (one N-thread worker runs the batch)."""
    from packrat.core.policy import served_latency

    threads = cfg.threads if cfg.pinned else opt.cores
    return served_latency(opt, threads, cfg.instances, cfg.batch_size, batch)


def estimated_ms(opt: Optimizer, cfg: Config, batch: int) -> float:
    """predicted_ms, or where the profile skipped the point, the nearest profiled smaller
    batch at the same threads scaled linearly: only to choose how long to measure."""
    pred = predicted_ms(opt, cfg, batch)
    if math.isfinite(pred):
        return pred
    threads = cfg.threads if cfg.pinned else opt.cores
    size = min(cfg.batch_size, batch)
    batches = -(-batch // size)
    rounds = -(-batches // cfg.instances)
    for b in range(min(size, opt.max_batch), 0, -1):
        lat = opt.latency(threads, b)
        if math.isfinite(lat):
            return rounds * lat * size / b
    return MAX_SECONDS * 1000.0 / MIN_BATCHES


def default_seconds(batch_ms: float) -> float:
    """Long enough for MIN_BATCHES batches (with a margin) and MIN_SECONDS, at most MAX_SECONDS."""
    return min(MAX_SECONDS, max(MIN_SECONDS, 1.25 * MIN_BATCHES * batch_ms / 1000.0))


def warmup_seconds(batch_ms: float) -> float:
    return min(3.0, max(0.5, 1.5 * batch_ms / 1000.0))


@dataclass(frozen=True)
class RoundResult:
    p50_ms: float
    p99_ms: float
    throughput_rps: float
    answered: int
    failed: int
    window_s: float
    foreign_cores: float = 0.0  # CPU other processes used meanwhile (see ForeignCpu)

    def to_json(self) -> dict:
        return {"p50_ms": _r(self.p50_ms), "p99_ms": _r(self.p99_ms),
                "throughput_rps": _r(self.throughput_rps), "answered": self.answered,
                "failed": self.failed, "window_s": _r(self.window_s),
                "foreign_cores": _r(self.foreign_cores)}


def round_result(samples: list[tuple[float, float]], start: float, end: float,
                 failed: int = 0) -> RoundResult:
    """From (sent, answered) times of successful requests: latency of those sent inside the
    window [start, end), throughput of those answered inside it."""
    lat = [(b - a) * 1000.0 for a, b in samples if start <= a < end]
    done = sum(1 for _, b in samples if start <= b <= end)
    window = end - start
    return RoundResult(percentile(lat, 50), percentile(lat, 99),
                       done / window if window > 0 else math.nan, len(lat), failed, window)


def _r(x: float | None, digits: int = 3) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


@dataclass(frozen=True)
class Summary:
    """Medians over rounds of the per-round p50, p99 and throughput (None where no round had
    one), rounded as bench.json writes them; totals of requests; rounds others disturbed."""

    latency_ms: float | None
    p99_ms: float | None
    throughput_rps: float | None
    answered: int
    failed: int
    disturbed_rounds: int

    def to_json(self) -> dict:
        return asdict(self)


def summarize(rounds: list[RoundResult]) -> Summary:
    def med(values):
        values = [v for v in values if math.isfinite(v)]
        return statistics.median(values) if values else math.nan

    return Summary(
        latency_ms=_r(med([r.p50_ms for r in rounds])),
        p99_ms=_r(med([r.p99_ms for r in rounds])),
        throughput_rps=_r(med([r.throughput_rps for r in rounds])),
        answered=sum(r.answered for r in rounds),
        failed=sum(r.failed for r in rounds),
        disturbed_rounds=sum(r.foreign_cores > FOREIGN_LIMIT_CORES for r in rounds),
    )


@dataclass(frozen=True)
class ConfigResult:
    """One configuration measured for B: its rounds and the profile's prediction (rounded;
    None where the profile cannot tell)."""

    config: Config
    rounds: tuple[RoundResult, ...]
    predicted_ms: float | None

    @cached_property
    def stats(self) -> Summary:
        return summarize(list(self.rounds))

    @property
    def plan(self) -> str:
        return self.config.describe()

    @property
    def latency_ms(self) -> float | None:
        return self.stats.latency_ms

    def summary_json(self) -> dict:
        """As a row's packrat, baseline and oracle entries are written."""
        return {"plan": self.plan, **self.stats.to_json(), "predicted_ms": self.predicted_ms}

    def to_json(self) -> dict:
        """As an entry of a row's `configs` is written: the summary, the shape, the rounds."""
        return {**self.summary_json(), "threads": self.config.threads,
                "instances": self.config.instances, "batch_size": self.config.batch_size,
                "rounds": [r.to_json() for r in self.rounds]}


@dataclass(frozen=True)
class PlanPrediction:
    plan: str
    predicted_ms: float | None


@dataclass(frozen=True)
class Row:
    """The results for one (model, B): one line of the table, one object of bench.json."""

    model: str
    batch: int
    cores: int
    packrat: ConfigResult            # predicted_ms: the served plan's prediction
    baseline: ConfigResult
    torchserve_default: ConfigResult | None  # None: not measured
    oracle: ConfigResult             # the fastest servable configuration measured
    configs: tuple[ConfigResult, ...]  # every configuration measured, pinned ones first
    dp_optimal: PlanPrediction       # the DP's optimum, servable or not
    ideal_ms: float | None           # L[1][1] x B / N from the profile as measured
    calibration: str | None          # Calibration.describe() of the profile planned with

    @property
    def speedup(self) -> float | None:
        p, b = self.packrat.latency_ms, self.baseline.latency_ms
        return _r(b / p, 4) if p and b else None

    @property
    def vs_oracle(self) -> float | None:
        p, o = self.packrat.latency_ms, self.oracle.latency_ms
        return _r(p / o, 4) if p and o else None

    @property
    def prediction_error(self) -> float | None:
        """packrat's predicted / measured - 1, None if either is unknown."""
        pred, meas = self.packrat.predicted_ms, self.packrat.latency_ms
        if not pred or not meas:
            return None
        return pred / meas - 1.0

    def to_json(self) -> dict:
        default = None
        if self.torchserve_default is not None:
            # its prediction (the baseline's) is written in `configs` only
            default = self.torchserve_default.summary_json()
            del default["predicted_ms"]
        return {
            "model": self.model, "batch": self.batch, "cores": self.cores,
            "packrat": self.packrat.summary_json(),
            "baseline": self.baseline.summary_json(),
            "torchserve_default": default,
            "oracle": self.oracle.summary_json(),
            "ideal_ms": self.ideal_ms,
            "calibration": self.calibration,
            "dp_optimal": asdict(self.dp_optimal),
            "speedup": self.speedup,
            "vs_oracle": self.vs_oracle,
            "configs": [c.to_json() for c in self.configs],
        }


def build_row(model: str, batch: int, cores: int, opt: Optimizer, packrat: Config,
              measured: dict[Config, list[RoundResult]], packrat_predicted: float,
              raw: Optimizer | None = None, calibration: str | None = None) -> Row:
    """One result row for (model, B) from every configuration's rounds; pure. opt: the
    profile Packrat plans with (calibrated, if it was); raw: the profile as measured."""
    results = {cfg: ConfigResult(cfg, tuple(rounds), _r(predicted_ms(opt, cfg, batch)))
               for cfg, rounds in measured.items()}
    candidates = [c for c in oracle_configs(cores, batch)
                  if c in results and results[c].latency_ms is not None]
    if not candidates:
        raise PackratError(f"{model} B={batch}: no configuration was measured")
    best = min(candidates, key=lambda c: (results[c].latency_ms, c))
    optimal = opt.plan(min(batch, opt.max_servable)).optimal
    return Row(
        model=model, batch=batch, cores=cores,
        packrat=replace(results[packrat], predicted_ms=_r(packrat_predicted)),
        baseline=results[baseline_config(cores, batch)],
        torchserve_default=results.get(default_config(cores, batch)),
        oracle=results[best],
        configs=tuple(results[c] for c in sorted(measured, key=lambda c: (c.threads is None, c))),
        dp_optimal=PlanPrediction(optimal.describe(), _r(optimal.latency_ms)),
        ideal_ms=_r((raw or opt).latency(1, 1) * batch / cores),
        calibration=calibration,
    )
