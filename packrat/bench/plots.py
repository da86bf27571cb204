"""Plots of a profile and of its predicted speedups (needs the `plot` extra: matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

from packrat.bench.configs import PREDICTION_TOLERANCE, Row
from packrat.core.optimizer import Optimizer
from packrat.core.profile import Profile
from packrat.errors import PackratError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        raise PackratError("plotting needs matplotlib: pip install -e '.[plot]'") from None
    return plt


def plot_profile(profile: Profile, cores: int, path: Path, title: str = "") -> Path:
    """Left: latency per batch for each thread count. Right: predicted speedup of the optimal
    and the served plan over one all-cores instance, for every B the baseline can serve."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    table = profile.table()
    colors = plt.get_cmap("viridis")
    for k, (t, row) in enumerate(sorted(table.items())):
        batches = sorted(row)
        left.plot(batches, [row[b] for b in batches], marker="o", ms=3, label=f"t={t}",
                  color=colors(k / max(len(table) - 1, 1)))
    left.set(yscale="log", xlabel="batch b", ylabel="latency (ms)",
             title="profile: one instance, t threads")
    left.set_xscale("log", base=2)
    left.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    left.legend(fontsize=7, ncol=2)

    opt = Optimizer(profile, cores)
    bs, best, served = [], [], []
    for b in range(1, opt.max_batch + 1):
        r = opt.plan(b)
        if r.speedup is None:
            continue
        bs.append(b)
        best.append(r.speedup)
        served.append(r.served_speedup or float("nan"))
    right.plot(bs, best, label="optimal plan")
    right.plot(bs, served, "--", label="served plan (one thread count)")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xscale("log", base=2)
    right.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    right.set(xlabel="batch B", ylabel=f"speedup over one {opt.threads[-1]}-thread instance",
              title=f"predicted speedup, N = {cores} cores")
    right.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bench(rows: list[Row], path: Path) -> Path:
    """Per model: latency vs B for each configuration (log-x), and predicted vs measured
    packrat latency."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda x, _: f"{x:g}")

    def plain_log(axis) -> None:
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(NullFormatter())

    def nan(values):
        return [math.nan if v is None else v for v in values]

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False)
    for (left, right), model in zip(axes, models):
        mine = sorted((r for r in rows if r.model == model), key=lambda r: r.batch)
        bs = [r.batch for r in mine]

        def series(value, mine=mine):
            return nan([value(r) for r in mine])

        left.plot(bs, series(lambda r: r.packrat.latency_ms), "o-", label="packrat (measured)",
                  lw=2)
        left.plot(bs, series(lambda r: r.packrat.predicted_ms), "o:",
                  label="packrat (predicted)", color="C0", alpha=0.6)
        left.plot(bs, series(lambda r: r.baseline.latency_ms), "s-",
                  label="baseline: 1 worker, N threads")
        left.plot(bs, series(lambda r: r.torchserve_default and r.torchserve_default.latency_ms),
                  "^-", label="TorchServe default")
        left.plot(bs, series(lambda r: r.oracle.latency_ms), "x--", label="oracle (best measured)")
        left.plot(bs, series(lambda r: r.ideal_ms), "k--", lw=0.8, label="ideal: L[1][1]·B/N")
        left.set_xscale("log", base=2)
        left.set_yscale("log")
        left.set_xticks(bs)
        plain_log(left.xaxis)
        plain_log(left.yaxis)
        left.set(xlabel="batch B (closed-loop clients)", ylabel="p50 batch latency (ms)",
                 title=f"{model}, N = {mine[0].cores} cores, measured on TorchServe")
        left.legend(fontsize=8)

        pred = series(lambda r: r.packrat.predicted_ms)
        meas = series(lambda r: r.packrat.latency_ms)
        right.scatter(pred, meas)
        for b, x, y in zip(bs, pred, meas):
            if math.isfinite(x) and math.isfinite(y):
                right.annotate(f"B={b}", (x, y), textcoords="offset points", xytext=(4, 4),
                               fontsize=8)
        finite = [v for v in pred + meas if math.isfinite(v)]
        if finite:
            lo, hi = min(finite) * 0.8, max(finite) * 1.25
            xs = [lo, hi]
            right.plot(xs, xs, "k-", lw=0.8, label="measured = predicted")
            right.fill_between(xs, [x * (1 - PREDICTION_TOLERANCE) for x in xs],
                               [x * (1 + PREDICTION_TOLERANCE) for x in xs], color="grey",
                               alpha=0.2, label=f"±{PREDICTION_TOLERANCE:.0%}")
            right.set_xlim(lo, hi)
            right.set_ylim(lo, hi)
        right.set_xscale("log")
        right.set_yscale("log")
        plain_log(right.xaxis)
        plain_log(right.yaxis)
        right.set(xlabel="predicted latency (ms, profile)",
                  ylabel="measured p50 latency (ms, TorchServe)",
                  title="packrat plan: predicted vs measured")
        right.legend(fontsize=8)
    return save_figure(fig, path)
