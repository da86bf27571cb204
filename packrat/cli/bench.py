"""`packrat bench`: its arguments and output."""

from __future__ import annotations

import argparse
import json
import signal
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
from packrat.measure.foreign import ATTEMPTS, FOREIGN_LIMIT_CORES


def add_parser(sub) -> argparse.ArgumentParser:
    """Add `bench` to the CLI's subparsers (it takes their parser class)."""
    from packrat.cli.args import int_list
    b = sub.add_parser("bench", help="measure Packrat's plans against the baseline, TorchServe's "
                                     "default and the best measured configuration")
    b.add_argument("--zoo", required=True,
                   help="zoo model(s): small-cnn, resnet50, bert-base, gpt2 (comma-separated)")
    b.add_argument("--batch", type=int_list, required=True,
                   help="batch sizes B (closed-loop clients), e.g. 1,2,4,8,16")
    b.add_argument("--json", action="store_true", help="print the rows as JSON")
    b.add_argument("--plot", help="write a PNG: latency vs B per configuration, predicted vs measured")
    b.add_argument("--out", default=str(DEFAULT_OUT),
                   help="archives, run directory and bench.json (default ./bench-out)")
    b.add_argument("--rounds", type=int, default=3,
                   help="rounds over all configurations; figures are medians (default 3)")
    b.add_argument("--seconds", type=float,
                   help=f"seconds of load per configuration and round (default: {MIN_BATCHES} "
                        f"batches, at least {MIN_SECONDS:g} s, at most {MAX_SECONDS:g} s)")
    b.add_argument("--max-batch", type=int,
                   help="largest batch to profile (default and minimum: the largest B)")
    b.add_argument("--max-batch-delay", type=int, default=MAX_BATCH_DELAY_MS,
                   help=f"TorchServe max_batch_delay in ms (default {MAX_BATCH_DELAY_MS})")
    b.add_argument("--quiet-wait", type=float, default=QUIET_WAIT_S,
                   help="seconds to wait for other processes to leave the cores before each "
                        f"measurement (default {QUIET_WAIT_S:g}); a measurement they disturbed "
                        f"(> {FOREIGN_LIMIT_CORES} cores) is repeated up to {ATTEMPTS} times")
    b.add_argument("--no-calibrate", action="store_true",
                   help="plan with the measured profile as it is (default: calibrate it through "
                        "TorchServe first, as packrat serve does)")
    b.set_defaults(func=cmd_bench)
    return b


def cmd_bench(args) -> int:
    from packrat.bench.plots import plot_bench
    from packrat.bench.report import render_text
    from packrat.bench.runner import BenchOptions, run_bench, write_results
    from packrat.model.zoo import get_zoo_model

    names = tuple(dict.fromkeys(n.strip() for n in args.zoo.split(",") if n.strip()))
    for name in names:
        get_zoo_model(name)  # unknown names fail before anything starts
    options = BenchOptions(
        models=names, batches=tuple(sorted(set(args.batch))), out=Path(args.out),
        rounds=args.rounds, seconds=args.seconds, max_batch=args.max_batch,
        max_batch_delay_ms=args.max_batch_delay, quiet_wait_s=args.quiet_wait,
        calibrate=not args.no_calibrate,
    )
    if args.plot:
        from packrat.bench.plots import _pyplot

        _pyplot()  # no matplotlib: fail now, not after the benchmark

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt  # the same clean stop as Ctrl-C

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, on_term)
    try:
        rows = run_bench(options, say)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    path = write_results(rows, options.out)
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        print(render_text(rows), end="")
        print(f"results: {path}")
    if args.plot:
        print(f"plot: {plot_bench(rows, Path(args.plot))}", file=sys.stderr if args.json else sys.stdout)
    return 0
