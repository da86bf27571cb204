"""Calibration data: served / profiled latency per thread count, and the profile it scales.

Pure: `packrat.serving.calibrate` measures the points through TorchServe.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from packrat.core.profile import Profile


@dataclass(frozen=True)
class CalibrationPoint:
    threads: int
    instances: int
    batch: int          # per instance
    profiled_ms: float
    served_ms: float    # median latency of a request, batches of `batch` formed by the load
    foreign_cores: float = 0.0  # CPU other processes used meanwhile, if it was watched

    @property
    def scale(self) -> float:
        return self.served_ms / self.profiled_ms


@dataclass(frozen=True)
class Calibration:
    points: tuple[CalibrationPoint, ...]

    def scale(self, threads: int, batch: int) -> float | None:
        """served / profiled for row `threads` at `batch`: interpolated in log2(batch) between
        the row's calibrated batches, the nearest one's outside them; None for a row without."""
        row = sorted((p.batch, p.scale) for p in self.points if p.threads == threads)
        if not row:
            return None
        if batch <= row[0][0]:
            return row[0][1]
        for (b0, s0), (b1, s1) in zip(row, row[1:]):
            if batch <= b1:
                w = (math.log2(batch) - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
                return s0 + w * (s1 - s0)
        return row[-1][1]

    def describe(self) -> str:
        """e.g. "t=2: x1.15 at b=1, x1.22 at b=8; t=1: x1.06 at b=4"."""
        rows: dict[int, list[str]] = {}
        for p in sorted(self.points, key=lambda p: (-p.threads, p.batch)):
            rows.setdefault(p.threads, []).append(f"x{p.scale:.2f} at b={p.batch}")
        return "; ".join(f"t={t}: {', '.join(s)}" for t, s in rows.items())

    def to_json(self) -> dict:
        return {"points": [asdict(p) for p in self.points]}

    @staticmethod
    def from_json(data: dict) -> "Calibration":
        return Calibration(tuple(CalibrationPoint(**p) for p in data["points"]))


def scale_profile(profile: Profile, calibration: Calibration) -> Profile:
    """The profile with each point multiplied by its scale (rows without one unchanged)."""
    def scaled(x, s):
        return None if x is None else x * s

    points = tuple(
        replace(p, latency_ms=p.latency_ms * s, p10_ms=scaled(p.p10_ms, s), p90_ms=scaled(p.p90_ms, s))
        if (s := calibration.scale(p.threads, p.batch)) else p
        for p in profile.points
    )
    return Profile(points, profile.meta)


def calibration_batch(profile: Profile, threads: int, instances: int, target: int) -> int:
    """The largest batch of row `threads` with instances x batch <= target (at least the
    smallest batch of the row): batches of the size the plans for B near target use."""
    row = sorted(b for t, b in ((p.threads, p.batch) for p in profile.points) if t == threads)
    fitting = [b for b in row if instances * b <= max(target, instances)]
    return fitting[-1] if fitting else row[0]


def default_target(cores: int) -> int:
    return max(8, cores)
