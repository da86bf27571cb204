"""`packrat bench`: its arguments and output."""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import threading
from pathlib import Path

from packrat.bench.configs import (
    DEFAULT_OUT,
    MAX_BATCH_DELAY_MS,
    MAX_SECONDS,
    MIN_BATCHES,
    MIN_SECONDS,
    QUIET_WAIT_S,
)
from packrat.errors import PackratError
from packrat.measure.foreign import ATTEMPTS, FOREIGN_LIMIT_CORES


def add_parser(sub) -> argparse.ArgumentParser:
    """Add `bench` to the CLI's subparsers (it takes their parser class)."""
    from packrat.bench.trace import CONFIGURATIONS, DEFAULT_DURATION_S
    from packrat.bench.trace import MAX_BATCH as TRACE_MAX_BATCH
    from packrat.bench.trace import MAX_BATCH_DELAY_MS as TRACE_DELAY_MS
    from packrat.cli.args import int_list
    from packrat.core.trace import SHAPES

    b = sub.add_parser("bench", help="measure Packrat's plans against the baseline, TorchServe's "
                                     "default and the best measured configuration (--batch), or "
                                     "replay a load trace against fixed and automatic plans "
                                     "(--trace)")
    b.add_argument("--zoo", required=True,
                   help="zoo model(s): small-cnn, resnet50, bert-base, gpt2 (comma-separated; "
                        "one with --trace)")
    b.add_argument("--batch", type=int_list,
                   help="batch sizes B (closed-loop clients), e.g. 1,2,4,8,16")
    b.add_argument("--trace", metavar="SHAPE|FILE",
                   help=f"replay an open-loop trace against {', '.join(CONFIGURATIONS)}: a "
                        f"shape ({', '.join(SHAPES)}; scaled to peak at 80%% of the best "
                        "plan's throughput) or a CSV of seconds,requests_per_second rows "
                        "(used as given); results in OUT/trace.json")
    b.add_argument("--duration", type=float,
                   help=f"with --trace: the trace's length in seconds (default "
                        f"{DEFAULT_DURATION_S:g} for shapes, a CSV's own)")
    b.add_argument("--seed", type=int, default=0,
                   help="with --trace: seed of the arrivals (and of bursty's bursts; default 0)")
    b.add_argument("--slo-ms", type=float,
                   help="with --trace: latency SLO in ms (default: 2x the baseline's p50 at "
                        "the trace's mean rate)")
    b.add_argument("--cores", type=int,
                   help="with --trace: cores each packrat serve uses (default: all usable)")
    b.add_argument("--json", action="store_true",
                   help="print the rows as JSON (with --trace: one object)")
    b.add_argument("--plot", help="write a PNG: latency vs B per configuration, predicted vs "
                                  "measured (with --trace: latency over time, switches, rate)")
    b.add_argument("--out", default=str(DEFAULT_OUT),
                   help="archives, run directories and bench.json or trace.json (default "
                        "./bench-out)")
    b.add_argument("--rounds", type=int, default=3,
                   help="rounds over all configurations; figures are medians (default 3)")
    b.add_argument("--seconds", type=float,
                   help=f"seconds of load per configuration and round (default: {MIN_BATCHES} "
                        f"batches, at least {MIN_SECONDS:g} s, at most {MAX_SECONDS:g} s)")
    b.add_argument("--max-batch", type=int,
                   help="largest batch to profile (default and minimum: the largest B; with "
                        f"--trace {TRACE_MAX_BATCH}, as packrat serve)")
    b.add_argument("--max-batch-delay", type=int,
                   help=f"TorchServe max_batch_delay in ms (default {MAX_BATCH_DELAY_MS}; with "
                        f"--trace {TRACE_DELAY_MS}, as packrat serve)")
    b.add_argument("--quiet-wait", type=float, default=QUIET_WAIT_S,
                   help="seconds to wait for other processes to leave the cores before each "
                        f"measurement (default {QUIET_WAIT_S:g}); a measurement they disturbed "
                        f"(> {FOREIGN_LIMIT_CORES} cores) is repeated up to {ATTEMPTS} times")
    b.add_argument("--no-calibrate", action="store_true",
                   help="plan with the measured profile as it is (default: calibrate it through "
                        "TorchServe first, as packrat serve does)")
    b.set_defaults(func=cmd_bench)
    return b


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _terminable(run):
    """run(), with SIGTERM raising KeyboardInterrupt: the same clean stop as Ctrl-C."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, on_term)
    try:
        return run()
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def cmd_bench(args) -> int:
    from packrat.bench.plots import plot_bench
    from packrat.bench.report import render_text
    from packrat.bench.runner import BenchOptions, run_bench, write_results
    from packrat.model.zoo import get_zoo_model

    names = tuple(dict.fromkeys(n.strip() for n in args.zoo.split(",") if n.strip()))
    for name in names:
        get_zoo_model(name)  # unknown names fail before anything starts
    if args.trace is not None:
        return cmd_trace(args, names)
    if not args.batch:
        raise PackratError("give --batch B[,B2,...] (closed-loop batch sizes) or --trace "
                           "SHAPE|FILE (an open-loop trace)")
    given = [flag for flag, v in (("--duration", args.duration), ("--slo-ms", args.slo_ms),
                                  ("--cores", args.cores)) if v is not None]
    if given or args.seed != 0:
        raise PackratError(f"{(given or ['--seed'])[0]} is for --trace; add --trace SHAPE|FILE")
    options = BenchOptions(
        models=names, batches=tuple(sorted(set(args.batch))), out=Path(args.out),
        rounds=args.rounds, seconds=args.seconds, max_batch=args.max_batch,
        max_batch_delay_ms=(MAX_BATCH_DELAY_MS if args.max_batch_delay is None
                            else args.max_batch_delay),
        quiet_wait_s=args.quiet_wait, calibrate=not args.no_calibrate,
    )
    if args.plot:
        from packrat.bench.plots import _pyplot

        _pyplot()  # no matplotlib: fail now, not after the benchmark
    rows = _terminable(lambda: run_bench(options, _say))
    path = write_results(rows, options.out)
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        print(render_text(rows), end="")
        print(f"results: {path}")
    if args.plot:
        print(f"plot: {plot_bench(rows, Path(args.plot))}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_trace(args, names: tuple[str, ...]) -> int:
    from packrat.bench.trace import MAX_BATCH, TraceOptions, load_trace, run_trace_bench
    from packrat.bench.trace import MAX_BATCH_DELAY_MS as DELAY
    from packrat.jsonfile import write_json

    if len(names) != 1:
        raise PackratError(f"--trace takes one model, --zoo names {len(names)}; run one "
                           "benchmark per model")
    if args.batch:
        raise PackratError("--batch does not go with --trace: the trace sets the load "
                           "(drop --batch, or --trace for the closed-loop benchmark)")
    options = TraceOptions(
        zoo=names[0], trace=args.trace, duration_s=args.duration, seed=args.seed,
        slo_ms=args.slo_ms, out=Path(args.out), cores=args.cores,
        max_batch=MAX_BATCH if args.max_batch is None else args.max_batch,
        max_batch_delay_ms=DELAY if args.max_batch_delay is None else args.max_batch_delay,
        quiet_wait_s=args.quiet_wait, calibrate=not args.no_calibrate)
    load_trace(options.trace, options.duration_s, options.seed)  # a bad trace fails now
    if args.plot:
        from packrat.bench.plots import _pyplot

        _pyplot()  # no matplotlib: fail now, not after the benchmark
    result = _terminable(lambda: run_trace_bench(options, _say))
    path = Path(args.out) / "trace.json"
    write_json(path, result.to_json())
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(render_trace(result), end="")
        print(f"results: {path}")
    if args.plot:
        from packrat.bench.trace_plot import plot_trace

        print(f"plot: {plot_trace(result, Path(args.plot))}",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def render_trace(result) -> str:
    """The trace benchmark's table: one row per configuration."""
    from packrat.bench.trace import reactions

    t = result.trace
    lines = [(f"{result.model}, trace {t.describe()}, seed {result.seed}; SLO "
              f"{result.slo_ms:.1f} ms ({result.slo_source})"),
             (f"{'configuration':<14}{'plan':<15}{'mean ms':>9}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'SLO met':>9}  {'failed/unanswered':<19}switches")]
    for name, c in result.configurations.items():
        j = c.to_json(result.slo_ms)
        lost = f"{j['failed']}/{j['unanswered']}" + (f" +{j['dropped']} dropped"
                                                      if j["dropped"] else "")
        sw = c.switches
        switches = (f"{len(sw)} (median {statistics.median(s.seconds for s in sw):.1f} s, "
                    f"{sum(s.warm for s in sw)} warm)" if sw else "0")
        if c.plan is None:  # automatic: how soon after each load change a new plan served
            after = [x.serving_after_s for x in reactions(t, sw)]
            served = [x for x in after if x is not None]
            switches += (f"; load change to new plan median {statistics.median(served):.1f} s"
                         if served else "") + f" ({len(served)} of {len(after)} changes)"
        plan = c.plan.config.describe() if c.plan else "auto"
        lines.append(f"{name:<14}{plan:<15}{_ms(j['mean_ms']):>9}{_ms(j['p50_ms']):>9}"
                     f"{_ms(j['p99_ms']):>9}{j['slo_attainment']:>9.1%}  {lost:<19}{switches}")
    memory = [f"{name} {_mb(c.standby.max_mb)} of {c.standby.budget_mb:,.0f} MB "
              f"({c.standby.samples} samples)" for name, c in result.configurations.items()
              if c.standby is not None]
    if memory:
        lines.append("standby memory at most (PSS, sampled while no switch ran): "
                     + "; ".join(memory))
    disturbed = [f"{name} ({c.foreign_cores:.2f} cores)" for name, c in
                 result.configurations.items() if c.foreign_cores > FOREIGN_LIMIT_CORES]
    if disturbed:
        lines.append(f"disturbed: other processes used the cores during {', '.join(disturbed)}")
    return "\n".join(lines) + "\n"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _mb(x) -> str:
    return "-" if x is None else f"{x:,.0f}"
