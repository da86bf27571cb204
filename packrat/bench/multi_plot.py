"""The several-models benchmark's plot (needs the `plot` extra: matplotlib): per configuration,
each model's windowed p50 (solid) and p99 (dashed) latency over the phases, its SLO (dotted),
its switches (ticks at the top), windows with lost requests (crosses at the bottom), where its
cores changed (notes at the bottom), the phases shaded and named."""

from __future__ import annotations

from pathlib import Path

from packrat.bench.multi_load import PHASES, phase_names
from packrat.bench.multi_results import MultiResult
from packrat.bench.trace_plot import window_seconds

COLORS = ("tab:blue", "tab:orange")
SHADES = ("#e8f0fb", "#fdf0e3", "#eeeeee")  # A busy, B busy, both busy


def plot_models(result: MultiResult, path: Path) -> Path:
    from packrat.bench.plots import _pyplot, save_figure

    plt = _pyplot()
    names = list(result.configurations)
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 2.8 * len(names)), sharex=True,
                             squeeze=False)
    duration = len(PHASES) * result.phase_s
    window = window_seconds(duration)
    labels = phase_names(result.names)
    for ax, cname in zip(axes[:, 0], names):
        c = result.configurations[cname]
        for i, label in enumerate(labels):
            ax.axvspan(i * result.phase_s, (i + 1) * result.phase_s, color=SHADES[i], zorder=0)
            ax.annotate(label, ((i + 0.5) * result.phase_s, 1.0),
                        xycoords=("data", "axes fraction"), ha="center", va="bottom",
                        fontsize=7, color="dimgrey")
        for k, m in enumerate(result.loads):
            color = COLORS[k % len(COLORS)]
            series = c.loads[m.name].series(window, until_s=duration)
            mid = [w.start_s + window / 2 for w in series]
            ax.plot(mid, [w.p50_ms for w in series], color=color, marker=".", ms=3,
                    label=f"{m.name} p50")
            ax.plot(mid, [w.p99_ms for w in series], color=color, ls="--", lw=1,
                    label=f"{m.name} p99")
            slo = result.slos[m.name]
            ax.axhline(slo, color=color, ls=":", lw=1, label=f"{m.name} SLO {slo:.0f} ms")
            for s in c.switches.get(m.name, ()):
                ax.axvline(s.record.at_s, ymin=0.92, ymax=1.0, color=color, lw=1.5)
            lost = [x for x, w in zip(mid, series) if w.answered < w.count]
            ax.plot(lost, [0.03 + 0.04 * k] * len(lost), ls="none", marker="x", color=color,
                    ms=5,
                    transform=ax.get_xaxis_transform(),
                    label=f"{m.name} lost requests" if lost else None)
        _cores_notes(ax, c.allocations)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        j = c.to_json(result.slos, result.phase_s)["all"]
        ax.set_title(f"{cname} ({c.serve}): both models p50 {_ms(j['p50_ms'])}, p99 "
                     f"{_ms(j['p99_ms'])}, SLO met {j['slo_attainment']:.1%}, "
                     f"{j['switches']} switches", fontsize=9, pad=12)
        ax.legend(loc="upper left", fontsize=6, ncol=4, framealpha=0.7)
    axes[-1, 0].set_xlabel(f"seconds into the phases (windows of {window:g} s; ticks at the "
                           "top: switches)")
    axes[-1, 0].set_xlim(0, duration)
    who = " + ".join(f"{m.name} ({m.zoo}, busy {m.busy_rps:.0f} rps)" for m in result.loads)
    fig.suptitle(f"{who} on {result.cores} cores, seed {result.seed}", fontsize=10)
    return save_figure(fig, path)


def _cores_notes(ax, allocations) -> None:
    """Where a model's cores change, e.g. "a 0,1 | b shared 1", at the bottom."""
    last = None
    for a in allocations:
        cores = {n: (m["shared"], tuple(m["cores"])) for n, m in a.models.items()}
        if cores == last:
            continue
        last = cores
        text = " | ".join(f"{n} {'shared ' if sh else ''}{','.join(map(str, cs)) or '-'}"
                          for n, (sh, cs) in cores.items())
        ax.annotate(text, (a.at_s, 0.08), xycoords=("data", "axes fraction"), fontsize=6,
                    rotation=90, va="bottom", ha="left", color="dimgrey")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms"
