"""The `packrat` command line. The only module that prints or configures logging."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import packrat
from packrat.errors import PackratError

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# More values than anyone plans or profiles at once; `1-100000000` is a typo, not a request.
MAX_LIST_VALUES = 10000


def int_list(text: str) -> list[int]:
    """`1,2,4` or `1-4` or a mix; every value an integer."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                lo, hi = int(lo), int(hi)
                if hi < lo:
                    raise argparse.ArgumentTypeError(f"{part!r} is an empty range; write LOW-HIGH")
                if hi - lo >= MAX_LIST_VALUES:
                    raise argparse.ArgumentTypeError(
                        f"{part!r} has more than {MAX_LIST_VALUES} values")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers like 1,2,4") from None
        if len(out) > MAX_LIST_VALUES:
            raise argparse.ArgumentTypeError(f"{text!r} has more than {MAX_LIST_VALUES} values")
    return out


class ProgressBar:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str, stream=sys.stderr, width: int = 30) -> None:
        self.label, self.stream, self.width = label, stream, width
        self.tty = stream.isatty()
        self._open = False

    def update(self, done: int, total: int, text: str) -> None:
        if self.tty:
            filled = int(self.width * done / max(total, 1))
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {text}\x1b[K")
            self._open = True
        else:
            self.stream.write(f"{self.label} {done}/{total} {text}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


# -- archive ---------------------------------------------------------------------------------

def cmd_archive(args) -> int:
    from packrat.archive import build_zoo_archive

    result = build_zoo_archive(
        args.zoo, Path(args.out), progress=lambda msg: print(f"{args.zoo}: {msg}", file=sys.stderr)
    )
    print(f"archive: {result.mar_path}")
    print(f"example request: {result.example_path}")
    return 0


# -- profile ---------------------------------------------------------------------------------

def cmd_profile(args) -> int:
    from packrat.cpus import usable_cores
    from packrat.profile import write_profile
    from packrat.profiler import ProfileSettings, default_threads, profile_archive

    cores = usable_cores()
    settings = ProfileSettings(
        threads=tuple(args.threads) if args.threads else default_threads(len(cores)),
        max_batch=args.max_batch,
        min_reps=args.reps,
        max_reps=max(args.reps, 50),
        min_time_s=args.min_time,
        prune=not args.no_prune,
        contended=not args.isolated,
    )
    bar = ProgressBar("profiling")

    def progress(ev) -> None:
        if ev.kind == "point":
            text = f"t={ev.threads} b={ev.batch}: {ev.latency_ms:.1f} ms ({ev.elapsed_s:.0f} s)"
        elif ev.kind == "load":
            text = "loading the model"
        elif ev.kind == "start":
            text = f"t={ev.threads}: warming up ({ev.elapsed_s:.0f} s)"
        elif ev.kind == "skip":
            text = f"t={ev.threads}: b>={ev.batch} skipped, slower than any optimal plan"
        else:
            text = "cached"
        bar.update(ev.done, ev.total, text)

    try:
        run = profile_archive(Path(args.archive), settings, force=args.force, progress=progress)
    finally:
        bar.close()
    meta = run.profile.meta
    if run.cached:
        print(f"cached profile ({meta.measured_points} points measured on {meta.created}); "
              f"--force measures again")
    else:
        print(f"measured {meta.measured_points} points in {meta.duration_s:.1f} s "
              f"({meta.skipped_points} of {meta.measured_points + meta.skipped_points} skipped "
              f"as unable to matter), cores {','.join(map(str, meta.cores))}")
    print(f"profile: {run.path}")
    if args.out:
        write_profile(run.profile, Path(args.out))
        print(f"written: {args.out}")
    if args.plot:
        from packrat.plot import plot_profile

        plot_profile(run.profile, len(cores), Path(args.plot), title=Path(args.archive).stem)
        print(f"plot: {args.plot}")
    return 0


# -- plan ------------------------------------------------------------------------------------

def cmd_plan(args) -> int:
    from packrat.optimizer import Optimizer
    from packrat.profile import read_profile

    profile = read_profile(Path(args.profile), args.format, args.benchmark, args.allocator)
    if args.cores is None:
        from packrat.cpus import usable_cores

        args.cores = len(usable_cores())
    opt = Optimizer(profile, args.cores)
    results = [opt.plan(b) for b in args.batch]
    if args.json:
        data = [r.to_json() for r in results]
        print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
        return 0
    print(f"profile {args.profile}, N = {args.cores} cores; baseline = one "
          f"{opt.threads[-1]}-thread instance serving the whole batch")
    header = f"{'B':>6}  {'optimal plan':<28}{'ms':>10}  {'served plan':<28}{'ms':>10}  {'baseline ms':>11}  {'speedup':>7}"
    print(header)
    for r in results:
        served = r.served.describe() if r.served else "-"
        served_ms = f"{r.served.latency_ms:10.2f}" if r.served else f"{'-':>10}"
        base = f"{r.baseline_latency_ms:11.2f}" if r.baseline_latency_ms else f"{'-':>11}"
        speed = f"{r.speedup:6.2f}x" if r.speedup else f"{'-':>7}"
        print(f"{r.batch:>6}  {r.optimal.describe():<28}{r.optimal.latency_ms:10.2f}  "
              f"{served:<28}{served_ms}  {base}  {speed}")
    return 0


# -- serving ---------------------------------------------------------------------------------

def _run_dir(args) -> Path:
    from packrat.rundir import default_run_dir

    return Path(args.run_dir) if args.run_dir else default_run_dir()


def _model_sources(args):
    """--models and --profiles, checked before anything is started or written."""
    from packrat.archive import check_archive
    from packrat.profile import read_profile
    from packrat.rundir import check_model_name
    from packrat.service import ModelSource

    profiles = dict(_pairs(args.profiles, "--profiles")) if args.profiles else {}
    sources = []
    for name, file in _pairs(args.models, "--models"):
        check_model_name(name)
        if any(s.name == name for s in sources):
            raise PackratError(f"--models names {name!r} twice; give each model once")
        path = Path(file)
        if not path.is_absolute() and args.model_store and not path.exists():
            path = Path(args.model_store) / file
        if not path.exists():
            raise PackratError(f"model {name}: archive {path} does not exist")
        check_archive(path)
        profile = Path(profiles.pop(name)) if name in profiles else None
        if profile is not None:
            if not profile.is_file():
                raise PackratError(f"model {name}: profile {profile} does not exist")
            read_profile(profile)  # ProfileError for a bad file
        sources.append(ModelSource(name, path, profile))
    if not sources:
        raise PackratError("--models names no model; give NAME=FILE.mar")
    if profiles:
        raise PackratError(f"--profiles names models not in --models: {', '.join(profiles)}")
    return tuple(sources)


def _at_least(value, low, flag: str):
    """value (None: not given) must be >= low."""
    if value is not None and value < low:
        raise PackratError(f"{flag} must be >= {low}, got {value}")


def _pairs(text: str, flag: str):
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name or not value:
            raise PackratError(f"{flag}: {part!r} is not NAME=FILE")
        out.append((name, value))
    return out


def cmd_serve(args) -> int:
    from packrat.controller import ControllerParams
    from packrat.cpus import usable_cores
    from packrat.rundir import RunDir
    from packrat.service import ServeOptions, controller_pid, serve
    from packrat.torchserve import Ports

    run_dir = _run_dir(args)
    pid = controller_pid(RunDir(run_dir))
    if pid is not None:  # first: whatever else is asked, this run directory is taken
        raise PackratError(
            f"another packrat controller (pid {pid}) runs on {run_dir}; stop it with "
            f"`packrat stop --run-dir {run_dir}` or use another --run-dir"
        )
    _at_least(args.cores, 1, "--cores")
    if args.cores is not None and args.cores > len(usable_cores()):
        raise PackratError(f"--cores {args.cores}: this process may use 1..{len(usable_cores())} cores")
    _at_least(args.max_batch, 1, "--max-batch")
    _at_least(args.initial_batch, 1, "--initial-batch")
    _at_least(args.max_batch_delay, 0, "--max-batch-delay")
    if not args.interval > 0:  # also refuses nan
        raise PackratError(f"--interval must be > 0 seconds, got {args.interval}")
    for flag in ("inference_port", "management_port", "metrics_port"):
        port = getattr(args, flag)
        if port is not None and not 1 <= port <= 65535:
            raise PackratError(f"--{flag.replace('_', '-')} {port} is not a TCP port (1..65535)")
    models = _model_sources(args)
    ports = None
    if args.inference_port or args.management_port or args.metrics_port:
        free = Ports.free()
        ports = Ports(args.inference_port or free.inference, args.management_port or free.management,
                      args.metrics_port or free.metrics, free.grpc_inference, free.grpc_management)
    options = ServeOptions(
        run_dir=run_dir, models=models, cores=args.cores, ports=ports,
        max_batch=args.max_batch, initial_batch=args.initial_batch, calibrate=not args.no_calibrate,
        controller=ControllerParams(interval_s=args.interval, max_batch_delay_ms=args.max_batch_delay),
    )
    print(f"run directory: {options.run_dir}", file=sys.stderr)
    serve(options, say=lambda msg: print(msg, file=sys.stderr, flush=True))
    return 0


def cmd_stop(args) -> int:
    from packrat.service import stop

    print(stop(_run_dir(args)))
    return 0


def cmd_status(args) -> int:
    from packrat.service import status

    report = status(_run_dir(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not report["controller_pid"]:
        print("no packrat controller runs on this run directory; its last state:")
    print(f"controller pid {report['controller_pid'] or '-'}, TorchServe pid {report['torchserve_pid'] or '-'}"
          + (f", restarted {report['torchserve_restarts']} times" if report["torchserve_restarts"] else ""))
    if report["torchserve_event"]:
        print(f"  {report['torchserve_event']}")
    for name, m in report["models"].items():
        last = m["last_reconfiguration_s"]
        print(f"{name}: version {m['version']}, estimated B = {m['estimated_batch']}, "
              f"{'auto' if m['auto'] else 'manual'}, {m['reconfigurations']} reconfigurations"
              + (f", last {last:.0f} s ago" if last is not None else ""))
        plan = m["plan"]
        if plan["latency_ms"] is not None:
            print(f"  predicted batch latency {plan['latency_ms']:.1f} ms"
                  + (f" (profile calibrated: {m['calibration']})" if m.get("calibration") else ""))
        for i in plan["instances"]:
            print(f"  worker pid {i['pid'] or '-':>7}: {i['threads']} threads, batch {i['batch']}, "
                  f"cores {','.join(map(str, i['cores'])) or '-'}")
        if m.get("last_error"):
            print(f"  last error: {m['last_error']}")
    return 0


def cmd_reconfigure(args) -> int:
    from packrat.rundir import check_model_name
    from packrat.service import reconfigure

    check_model_name(args.model)
    for flag in ("instances", "threads", "batch", "for_batch"):
        _at_least(getattr(args, flag), 1, f"--{flag.replace('_', '-')}")
    if args.auto:
        request = {"model": args.model, "auto": True}
    elif args.for_batch is not None:
        request = {"model": args.model, "for_batch": args.for_batch}
    elif None not in (args.instances, args.threads, args.batch):
        request = {"model": args.model, "instances": args.instances, "threads": args.threads,
                   "batch": args.batch}
    else:
        raise PackratError("give --instances, --threads and --batch together, or --for-batch B, or --auto")
    answer = reconfigure(_run_dir(args), request, timeout_s=args.timeout)
    if not answer.get("ok"):
        raise PackratError(answer.get("message", "the switch failed"))
    print(f"{answer['message']} ({answer.get('seconds', 0):.1f} s)")
    return 0


def _phases(text: str) -> list[tuple[int, float]]:
    """`1:10,8:20`: concurrent clients and seconds per phase."""
    phases = []
    for part in text.split(","):
        c, _, secs = part.partition(":")
        try:
            phases.append((int(c), float(secs)))
        except ValueError:
            raise PackratError(f"--phases: {part!r} is not CLIENTS:SECONDS") from None
        if phases[-1][0] < 0 or not 0 < phases[-1][1] < math.inf:  # also refuses nan
            raise PackratError(f"--phases: {part!r} needs clients >= 0 and seconds > 0")
    return phases


def cmd_demo(args) -> int:
    from packrat.demo import run_demo, summary
    from packrat.zoo import get_zoo_model, require_dependencies

    require_dependencies(get_zoo_model(args.zoo))  # before anything is built or started
    phases = _phases(args.phases)
    if any(c < 1 for c, _ in phases):
        raise PackratError("--phases: every demo phase needs at least 1 client")
    result = run_demo(args.zoo, Path(args.out), phases, args.baseline_seconds,
                      say=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(summary(result))
    return 0 if result.failed == 0 else 1


def cmd_load(args) -> int:
    import statistics
    import time

    from packrat.loadgen import ClosedLoop
    from packrat.rundir import RunDir, check_model_name
    from packrat.torchserve import TorchServeClient, load_settings

    check_model_name(args.model)
    phases = _phases(args.phases)
    try:
        body = Path(args.body).read_bytes()
    except OSError as e:
        raise PackratError(f"--body {args.body}: {e.strerror or e}; give a request body file, "
                           "e.g. NAME.example.json from `packrat archive`") from None
    client = TorchServeClient(load_settings(RunDir(_run_dir(args)).torchserve))
    load = ClosedLoop(lambda: client.predict(args.model, body, timeout_s=60))
    done = 0
    try:
        for clients, seconds in phases:
            load.set_concurrency(clients)
            time.sleep(seconds)
            lat = load.result.latencies_ms[done:]
            done += len(lat)
            p50 = f"{statistics.median(lat):.1f} ms" if lat else "-"
            print(f"{clients:>3} clients, {seconds:.0f} s: {len(lat)} answered, median {p50}", flush=True)
    finally:
        result = load.stop()
    print(f"total: {result.answered} answered, {len(result.failures)} failed, "
          f"{len(result.unanswered)} unanswered")
    for line in (result.failures + result.unanswered)[:5]:
        print(f"  {line}")
    return 0 if not (result.failures or result.unanswered) else 1


# -- main ------------------------------------------------------------------------------------

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
    pr.set_defaults(func=cmd_profile)

    pl = sub.add_parser("plan", help="the best instances <threads, batch> for N cores and B")
    pl.add_argument("--profile", required=True, help="profile CSV (packrat or published format)")
    pl.add_argument("--cores", type=int,
                    help="cores N to plan for (default: the cores this process may use here)")
    pl.add_argument("--batch", type=int_list, required=True, help="batch size(s) B, e.g. 8,16")
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
    sv.add_argument("--model-store", help="directory the .mar paths are relative to")
    sv.add_argument("--profiles", help="NAME=PROFILE.csv[,...]: use these profiles instead of measuring")
    sv.add_argument("--cores", type=int, help="cores to use (default: all usable)")
    sv.add_argument("--inference-port", type=int)
    sv.add_argument("--management-port", type=int)
    sv.add_argument("--metrics-port", type=int)
    sv.add_argument("--run-dir", help=run_help)
    sv.add_argument("--max-batch", type=int, default=32, help="largest batch to profile (default 32)")
    sv.add_argument("--initial-batch", type=int, default=1, help="B to plan for at start (default 1)")
    sv.add_argument("--no-calibrate", action="store_true",
                    help="plan with the measured profile as it is, without timing each thread "
                         "count through TorchServe first")
    sv.add_argument("--interval", type=float, default=1.0, help="seconds between control steps")
    sv.add_argument("--max-batch-delay", type=int, default=10,
                    help="TorchServe max_batch_delay in ms (default 10)")
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
    ld.add_argument("--body", required=True, help="request body file, e.g. NAME.example.json")
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
    from packrat.bench import add_parser as add_bench_parser
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
