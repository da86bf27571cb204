#!/usr/bin/env python3
"""Several models on one core budget, measured (issue 12's evidence): two zoo models under
shifted loads (A busy & B idle, A idle & B busy, both busy), each configuration on its own
fresh server with the same arrivals: TorchServe's default, Packrat with overlapping plans, a
static even split, and the global allocator. See packrat/bench/multi.py for the design.

    python scripts/bench_models.py [--models a=small-cnn,b=resnet50] [--phase-s 60]
        [--slo a=MS,b=MS] [--configs torchserve-default,overlap,even,allocator]
        [--json] [--out DIR] [--plot FILE.png]

A table on stdout (or one JSON object with --json); always OUT/models.json; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packrat.bench.multi import run_multi_bench, write_result
from packrat.bench.multi_load import (
    BUSY_FRACTION,
    CONFIGURATIONS,
    DEFAULT_MODELS,
    DEFAULT_PHASE_S,
    IDLE_RPS,
    MAX_BATCH,
    MAX_BATCH_DELAY_MS,
    MultiOptions,
    parse_models,
    parse_profiles,
    parse_slos,
)
from packrat.bench.multi_results import render_table
from packrat.errors import PackratError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_models.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"two zoo models, NAME=ZOO or ZOO, comma-separated (default "
                        f"{DEFAULT_MODELS}); the first is A, the second B")
    p.add_argument("--phase-s", type=float, default=DEFAULT_PHASE_S,
                   help=f"seconds of each of the three phases (default {DEFAULT_PHASE_S:g})")
    p.add_argument("--busy-fraction", type=float, default=BUSY_FRACTION,
                   help="a busy model's rate, as a fraction of its best plan's throughput on "
                        f"all the cores (default {BUSY_FRACTION:g}: two busy models ask for "
                        "about the whole machine)")
    p.add_argument("--idle-rps", type=float, default=IDLE_RPS,
                   help=f"an idle model's rate in requests/s (default {IDLE_RPS:g}), at most "
                        "half the allocator's idle line for the model")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrivals (default 0)")
    p.add_argument("--slo", action="append", default=[], metavar="NAME=MS[,NAME=MS]",
                   help="a model's latency SLO in ms (default: 2x its p50 on a settled "
                        "single-model plan, measured in the overlap configuration)")
    p.add_argument("--configs", default=",".join(CONFIGURATIONS),
                   help=f"configurations to run, comma-separated (default all: "
                        f"{','.join(CONFIGURATIONS)})")
    p.add_argument("--profiles", metavar="NAME=CSV[,...]",
                   help="use these profiles instead of measuring (passed to packrat serve as "
                        "they are, uncalibrated)")
    p.add_argument("--cores", type=int, help="cores each server uses (default: all usable)")
    p.add_argument("--json", action="store_true", help="print one JSON object, not the table")
    p.add_argument("--out", default="bench-out",
                   help="archives, run directories and models.json (default ./bench-out)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="latency over time per configuration, one line per model")
    p.add_argument("--quiet-wait", type=float, default=120.0,
                   help="seconds to wait for other processes to leave the cores before each "
                        "configuration (default 120)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH,
                   help=f"largest batch to profile (default {MAX_BATCH}, as packrat serve)")
    p.add_argument("--max-batch-delay", type=int, default=MAX_BATCH_DELAY_MS,
                   help=f"TorchServe max_batch_delay in ms (default {MAX_BATCH_DELAY_MS}, as "
                        "packrat serve)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="plan and rate with the profiles as measured (default: calibrated "
                        "through TorchServe, as packrat serve does)")
    return p


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _on_term(signum, frame):
    raise KeyboardInterrupt  # the same clean stop as Ctrl-C: every server is stopped


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        models = parse_models(args.models)
        options = MultiOptions(
            models=models, phase_s=args.phase_s, busy_fraction=args.busy_fraction,
            idle_rps=args.idle_rps, seed=args.seed,
            slos=parse_slos(args.slo, [n for n, _ in models]),
            profiles=parse_profiles(args.profiles),
            configurations=tuple(c.strip() for c in args.configs.split(",") if c.strip()),
            out=Path(args.out), cores=args.cores, max_batch=args.max_batch,
            max_batch_delay_ms=args.max_batch_delay, calibrate=not args.no_calibrate,
            quiet_wait_s=args.quiet_wait)
        options.check()
        if args.plot:
            from packrat.bench.plots import _pyplot

            _pyplot()  # no matplotlib: fail now, not after the benchmark
        signal.signal(signal.SIGTERM, _on_term)
        result = run_multi_bench(options, _say)
    except PackratError as e:
        print(f"bench_models.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_models.py: interrupted; every server was stopped", file=sys.stderr)
        return 130
    path = write_result(result, options.out)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(render_table(result), end="")
        print(f"results: {path}")
    if args.plot:
        from packrat.bench.multi_plot import plot_models

        print(f"plot: {plot_models(result, Path(args.plot))}",
              file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
