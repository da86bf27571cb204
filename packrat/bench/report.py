"""The benchmark's text table and summary lines."""

from __future__ import annotations

import statistics

from packrat.bench.configs import PREDICTION_TOLERANCE, Row
from packrat.measure.foreign import ATTEMPTS, FOREIGN_LIMIT_CORES

ORACLE_TARGET = 1.05         # the target: packrat within 5% of the oracle


def render_text(rows: list[Row]) -> str:
    lines: list[str] = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        lines.append(f"{model}: N = {mine[0].cores} cores; batch latency p50 in ms under B "
                     "closed-loop clients, median over rounds (p99 and throughput in the JSON)")
        lines.append(f"{'B':>4}  {'packrat plan':<14}{'measured':>9}{'predicted':>10}{'err':>6}  "
                     f"{'baseline':>9}{'predicted':>10}  {'ts default':>10}  "
                     f"{'oracle plan':<14}{'oracle':>9}{'ideal':>8}  {'speedup':>7}  {'/oracle':>7}")
        for r in mine:
            err = r.prediction_error
            ts = r.torchserve_default
            flag = "*" if err is not None and abs(err) > PREDICTION_TOLERANCE else " "
            lines.append(
                f"{r.batch:>4}  {r.packrat.plan:<14}{_f(r.packrat.latency_ms):>9}"
                f"{_f(r.packrat.predicted_ms):>10}"
                f"{(f'{err:+.0%}' if err is not None else '-'):>6}{flag} "
                f"{_f(r.baseline.latency_ms):>9}{_f(r.baseline.predicted_ms):>10}  "
                f"{_f(ts.latency_ms if ts else None):>10}  "
                f"{r.oracle.plan:<14}{_f(r.oracle.latency_ms):>9}{_f(r.ideal_ms):>8}  "
                f"{(_f(r.speedup, 2) + 'x') if r.speedup else '-':>7}  "
                f"{_f(r.vs_oracle, 3):>7}"
            )
        lines.extend(summary_lines(mine))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def summary_lines(rows: list[Row]) -> list[str]:
    model = rows[0].model
    out = []
    speedups = [r.speedup for r in rows if r.speedup]
    if speedups:
        slower = [r.batch for r in rows if r.speedup and r.speedup < 1.0]
        out.append(f"{model}: average speedup over the baseline {statistics.mean(speedups):.3f}x "
                   f"(B = {','.join(str(r.batch) for r in rows)}); "
                   + (f"packrat slower than the baseline at B = {','.join(map(str, slower))}"
                      if slower else "never slower than the baseline"))
    ratios = [(r.vs_oracle, r.batch) for r in rows if r.vs_oracle]
    if ratios:
        worst, at = max(ratios)
        over = [b for v, b in ratios if v > ORACLE_TARGET]
        out.append(f"{model}: worst packrat/oracle {worst:.3f} at B = {at}; "
                   + (f"over {ORACLE_TARGET:.2f} at B = {','.join(map(str, over))}"
                      if over else f"within {ORACLE_TARGET - 1:.0%} of the oracle at every B"))
    off = []
    for r in rows:
        err = r.prediction_error
        if err is not None and abs(err) > PREDICTION_TOLERANCE:
            off.append(f"B={r.batch} ({r.packrat.predicted_ms:.1f} predicted, "
                       f"{r.packrat.latency_ms:.1f} measured, {err:+.0%})")
    out.append(f"{model}: prediction off by more than {PREDICTION_TOLERANCE:.0%} at "
               + ("; ".join(off) if off else "no B"))
    disturbed = [f"B={r.batch} {c.plan}" for r in rows for c in r.configs
                 if c.stats.disturbed_rounds]
    if disturbed:
        out.append(f"{model}: rounds disturbed by other processes (> {FOREIGN_LIMIT_CORES} "
                   f"cores) even after {ATTEMPTS} attempts: {', '.join(disturbed)}")
    return out


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
