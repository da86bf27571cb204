"""Plots of a profile and of its predicted speedups (needs the `plot` extra: matplotlib)."""

from __future__ import annotations

from pathlib import Path

from packrat.errors import PackratError
from packrat.optimizer import Optimizer
from packrat.profile import Profile


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
