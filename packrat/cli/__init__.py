"""The `packrat` command line: the only package that prints or configures logging. Each
command imports what it needs when it runs, so `packrat plan`, `status` and `--help` never
load torch."""

from __future__ import annotations

import argparse
import logging
import sys

import packrat
from packrat.cli.args import MODELS_FORMAT, _Parser, int_list, model_specs, positive_ms
from packrat.cli.offline import cmd_archive, cmd_plan, cmd_profile
from packrat.cli.serving import (
    cmd_demo,
    cmd_load,
    cmd_reconfigure,
    cmd_serve,
    cmd_status,
    cmd_stop,
)
from packrat.errors import PackratError


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="packrat", description=packrat.__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    a = sub.add_parser("archive", help="build a .mar archive of a built-in model")
    a.add_argument("--zoo", required=True, help="small-cnn, resnet50, bert-base or gpt2")
    a.add_argument("--out", required=True, help="directory for NAME.mar and NAME.example.json")
    a.set_defaults(func=cmd_archive)

    pr = sub.add_parser("profile", help="measure latency per threads x batch (cached)")
    pr.add_argument("archive", help="a .mar file (or an unpacked archive directory)")
    pr.add_argument("--threads", type=int_list,
                    help="thread counts, e.g. 1,2,4 or 1-8 (default: 1..N, or powers of two and N "
                         "above 16 cores)")
    pr.add_argument("--max-batch", type=int, default=32, help="largest batch (default 32)")
    pr.add_argument("--out", help="also write the profile CSV (and FILE.meta.json) here")
    pr.add_argument("--force", action="store_true", help="measure again, ignoring the cache")
    pr.add_argument("--plot", help="write a PNG of the profile and predicted speedups")
    pr.add_argument("--reps", type=int, default=5, help="timed passes per point, at least (default 5)")
    pr.add_argument("--min-time", type=float, default=0.5,
                    help="seconds of timed passes per point, at least (default 0.5)")
    pr.add_argument("--no-prune", action="store_true",
                    help="measure every point, even those that cannot be in an optimal plan")
    pr.add_argument("--isolated", action="store_true",
                    help="measure each instance alone (default: with the other instances of its "
                         "plan running on the other cores)")
    pr.add_argument("--sample", metavar="FILE",
                    help="one request body as a client sends it (an image, a text, a JSON "
                         "file): the whole handler is timed on batches of it, as TorchServe "
                         "runs it; needed for archives Packrat did not build")
    pr.add_argument("--sample-content-type", metavar="TYPE",
                    help="the sample's Content-Type (default: from its extension, e.g. "
                         ".json application/json, .png image/png, .txt text/plain)")
    pr.add_argument("--envelope", metavar="NAME",
                    help="TorchServe's service_envelope the model is served with (e.g. json, "
                         "kserve, kservev2): the handler is wrapped in it")
    pr.set_defaults(func=cmd_profile)

    pl = sub.add_parser("plan", help="the best instances <threads, batch> for N cores and B, "
                                     "or the cores per model of several models on N cores")
    pl.add_argument("--profile", help="profile CSV (packrat or published format)")
    pl.add_argument("--cores", type=int,
                    help="cores N to plan for (default: the cores this process may use here)")
    pl.add_argument("--batch", type=int_list, help="batch size(s) B, e.g. 8,16")
    pl.add_argument("--slo-ms", type=positive_ms, metavar="X",
                    help="also report the fewest cores whose plan serves B within X ms (and "
                         "that plan)")
    pl.add_argument("--models", type=model_specs, metavar=MODELS_FORMAT + ",...",
                    help="instead of --profile/--batch: allocate the N cores among these "
                         "models (B = 0: idle, no dedicated cores; SLO_MS: a target on its "
                         "batch latency)")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.add_argument("--format", default="auto", choices=["auto", "packrat", "pytorch", "torchserve"],
                    help="profile format (default: detected from the header)")
    pl.add_argument("--benchmark", default="script",
                    help="published pytorch_*_latency.csv: rows whose benchmark contains this "
                         "(script = TorchScript, none = eager; default script)")
    pl.add_argument("--allocator", default="default",
                    help="published profiles: allocator rows to use (default or tcmalloc)")
    pl.set_defaults(func=cmd_plan)

    run_help = "run directory (default: $XDG_RUNTIME_DIR/packrat or ~/.local/state/packrat/run)"
    sv = sub.add_parser("serve", help="run TorchServe under Packrat, reconfiguring it as load changes")
    sv.add_argument("--models", required=True, help="NAME=FILE.mar[,NAME2=FILE2.mar]")
    sv.add_argument("--model-store", help="directory the .mar paths are relative to; with "
                    "--attach, that TorchServe's model store, where Packrat writes versions")
    sv.add_argument("--profiles", help="NAME=PROFILE.csv[,...]: use these profiles instead of measuring")
    sv.add_argument("--sample", help="NAME=FILE[,...]: one request body as a client sends it "
                    "(an image, a text, a JSON file), to profile and warm NAME with; needed for "
                    "an archive Packrat did not build")
    sv.add_argument("--sample-content-type", metavar="NAME=TYPE[,...]",
                    help="content type of NAME's sample (default: from the file's extension)")
    sv.add_argument("--cores", type=int, help="cores to use (default: all usable)")
    sv.add_argument("--inference-port", type=int)
    sv.add_argument("--management-port", type=int)
    sv.add_argument("--metrics-port", type=int)
    sv.add_argument("--ts-config", metavar="FILE",
                    help="start TorchServe from your config.properties: your ports, TLS, queues "
                         "and envelope are kept; Packrat adds its model store, the model API "
                         "and Prometheus metrics")
    sv.add_argument("--attach", action="store_true",
                    help="manage a TorchServe you started on this host (give --management, "
                         "--inference, --metrics and --model-store); it is never restarted, "
                         "and `packrat stop` leaves it serving the live plan")
    sv.add_argument("--envelope", metavar="NAME",
                    help="with --attach: the service_envelope that TorchServe runs with (e.g. "
                         "kservev2), so that profiles time requests through it (with "
                         "--ts-config it is read from the file)")
    sv.add_argument("--management", metavar="URL", help="with --attach: its management API")
    sv.add_argument("--inference", metavar="URL", help="with --attach: its inference API")
    sv.add_argument("--metrics", metavar="URL", help="with --attach: its metrics API")
    sv.add_argument("--key-file", metavar="FILE",
                    help="with --attach: the key_file.json it wrote (omit if it runs with "
                         "token authorization off)")
    sv.add_argument("--certificate", metavar="FILE",
                    help="with --attach and https URLs: the certificate it presents")
    sv.add_argument("--run-dir", help=run_help)
    sv.add_argument("--max-batch", type=int, default=32, help="largest batch to profile (default 32)")
    sv.add_argument("--initial-batch", type=int, default=1, help="B to plan for at start (default 1)")
    sv.add_argument("--no-calibrate", action="store_true",
                    help="plan with the measured profile as it is, without timing each thread "
                         "count through TorchServe first")
    sv.add_argument("--interval", type=float, default=1.0, help="seconds between control steps")
    sv.add_argument("--max-batch-delay", type=int, default=10,
                    help="TorchServe max_batch_delay in ms (default 10)")
    sv.add_argument("--standby-memory", type=float, metavar="MB",
                    help="keep old versions loaded and idle after a switch, within this much "
                         "memory (their workers' PSS) for all models, so that switching back "
                         "is instant (default: 25%% of RAM; 0: delete them)")
    sv.add_argument("--core-split", choices=("auto", "even", "overlap"), default="auto",
                    help="several models: `auto` gives busy models their own cores by the "
                         "allocator and live load, idle ones a 1-thread worker on a shared "
                         "core; `even` splits the cores evenly once; `overlap` plans each "
                         "model for all cores, as before (default auto)")
    sv.add_argument("--slo", action="append", metavar="NAME=MS[,...]",
                    help="a latency target for NAME's batch latency, for the allocator: it "
                         "gives cores to meet every SLO first")
    sv.set_defaults(func=cmd_serve)

    st = sub.add_parser("stop", help="stop `packrat serve` and its TorchServe")
    st.add_argument("--run-dir", help=run_help)
    st.set_defaults(func=cmd_stop)

    ss = sub.add_parser("status", help="what each model serves, as it really runs")
    ss.add_argument("--run-dir", help=run_help)
    ss.add_argument("--json", action="store_true")
    ss.set_defaults(func=cmd_status)

    rc = sub.add_parser("reconfigure", help="serve a manual plan, the plan for a B, or go back to auto")
    rc.add_argument("--run-dir", help=run_help)
    rc.add_argument("--model", required=True)
    rc.add_argument("--instances", type=int)
    rc.add_argument("--threads", type=int)
    rc.add_argument("--batch", type=int, help="TorchServe batch size of each instance")
    rc.add_argument("--for-batch", type=int, help="serve the optimizer's plan for this B")
    rc.add_argument("--auto", action="store_true", help="let the controller choose again")
    rc.add_argument("--timeout", type=float, default=600, help="seconds to wait for the switch")
    rc.set_defaults(func=cmd_reconfigure)

    ld = sub.add_parser("load", help="closed-loop test load on a served model (loopback)")
    ld.add_argument("--run-dir", help=run_help)
    ld.add_argument("--model", required=True)
    ld.add_argument("--body", required=True,
                    help="request body file, e.g. NAME.example.json or the --sample of serve")
    ld.add_argument("--content-type", help="of the body (default: from the file's extension)")
    ld.add_argument("--phases", default="1:10,8:20,1:10",
                    help="CLIENTS:SECONDS,... concurrent clients per phase (default 1:10,8:20,1:10)")
    ld.set_defaults(func=cmd_load)

    dm = sub.add_parser("demo", help="archive, serve, load with changing concurrency, compare, stop")
    dm.add_argument("--zoo", default="resnet50", help="zoo model (default resnet50)")
    dm.add_argument("--out", default="out/demo", help="archives and run directory (default out/demo)")
    dm.add_argument("--phases", default="1:20,8:40,1:30",
                    help="CLIENTS:SECONDS,... (default 1:20,8:40,1:30)")
    dm.add_argument("--baseline-seconds", type=float, default=15,
                    help="seconds of baseline serving after each phase (default 15)")
    dm.set_defaults(func=cmd_demo)
    from packrat.cli.bench import add_parser as add_bench_parser
    add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        # the library logs what the commands already print; -v shows it
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(message)s", stream=sys.stderr,
    )
    try:
        return args.func(args)
    except PackratError as e:
        print(f"packrat {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"packrat {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
