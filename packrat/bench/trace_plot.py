"""The trace benchmark's plot (needs the `plot` extra: matplotlib): per configuration, the
windowed p50 and p99 latency over the trace, the SLO, each switch of the plan (cold or warm),
and the trace's request rate on a second axis."""

from __future__ import annotations

from pathlib import Path

from packrat.bench.trace import TraceResult


def window_seconds(duration_s: float) -> float:
    """About 60 windows over the trace, at least 1 s each."""
    return max(1.0, round(duration_s / 60.0))


def plot_trace(result: TraceResult, path: Path) -> Path:
    from packrat.bench.plots import _pyplot, save_figure

    plt = _pyplot()
    trace = result.trace
    names = list(result.configurations)
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 2.6 * len(names)), sharex=True,
                             squeeze=False)
    window = window_seconds(trace.duration_s)
    xs = [s.start_s for s in trace.steps] + [trace.duration_s]
    rates = [s.rps for s in trace.steps] + [trace.steps[-1].rps]
    for ax, name in zip(axes[:, 0], names):
        c = result.configurations[name]
        series = c.load.series(window, until_s=trace.duration_s)
        mid = [w.start_s + window / 2 for w in series]
        ax.plot(mid, [w.p50_ms for w in series], marker=".", ms=3, label="p50")
        ax.plot(mid, [w.p99_ms for w in series], ls="--", lw=1, label="p99")
        ax.axhline(result.slo_ms, color="grey", ls=":", lw=1, label=f"SLO {result.slo_ms:.0f} ms")
        for k, s in enumerate(c.switches):
            color = "tab:green" if s.warm else "tab:red"
            ax.axvline(s.at_s, color=color, lw=1)
            ax.axvspan(s.at_s, s.at_s + s.seconds, color=color, alpha=0.12,
                       label=(("warm" if s.warm else "cold") + " switch") if k == 0 else None)
            ax.annotate(s.to.describe(), (s.at_s, 1.0), xycoords=("data", "axes fraction"),
                        fontsize=7, rotation=90, va="top", ha="right", color=color)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        plan = c.plan.config.describe() if c.plan else "automatic"
        ax.set_title(f"{name} ({plan}): p50 {_ms(c.load.p50_ms())}, p99 {_ms(c.load.p99_ms())}, "
                     f"SLO met {c.load.slo_attainment(result.slo_ms):.1%}", fontsize=9)
        rate = ax.twinx()
        rate.step(xs, rates, where="post", color="black", alpha=0.35, lw=1)
        rate.fill_between(xs, rates, step="post", color="black", alpha=0.06)
        rate.set_ylabel("requests/s", fontsize=8)
        rate.set_ylim(bottom=0)
        ax.set_zorder(rate.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.legend(loc="upper left", fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel(f"seconds into the trace (windows of {window:g} s)")
    axes[-1, 0].set_xlim(0, trace.duration_s)
    fig.suptitle(f"{result.model}: trace {trace.describe()}, seed {result.seed}", fontsize=10)
    return save_figure(fig, path)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms"
