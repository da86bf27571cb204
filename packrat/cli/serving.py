"""`packrat serve`, `stop`, `status`, `reconfigure`, `load` and `demo`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from packrat.errors import PackratError


def _run_dir(args) -> Path:
    from packrat.serving.rundir import default_run_dir

    return Path(args.run_dir) if args.run_dir else default_run_dir()


def _model_sources(args):
    """--models and --profiles, checked before anything is started or written."""
    from packrat.core.profile import read_profile
    from packrat.model.archive import check_archive
    from packrat.model.sample import Sample
    from packrat.serving.daemon import ModelSource
    from packrat.serving.rundir import check_model_name

    profiles = dict(_pairs(args.profiles, "--profiles")) if args.profiles else {}
    samples = dict(_pairs(args.sample, "--sample")) if args.sample else {}
    types = (dict(_pairs(args.sample_content_type, "--sample-content-type", "NAME=TYPE"))
             if args.sample_content_type else {})
    slos = {name: _slo_ms(name, ms) for name, ms in
            _pairs(",".join(args.slo or []), "--slo", "NAME=MS")}
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
        if name in types and name not in samples:
            raise PackratError(f"--sample-content-type {name}=...: give --sample {name}=FILE too")
        sample = (Sample.load(samples.pop(name), types.pop(name, None)) if name in samples
                  else None)
        sources.append(ModelSource(name, path, profile, sample, slos.pop(name, None)))
    if not sources:
        raise PackratError("--models names no model; give NAME=FILE.mar")
    for flag, left in (("--profiles", profiles), ("--sample", samples),
                       ("--sample-content-type", types), ("--slo", slos)):
        if left:
            raise PackratError(f"{flag} names models not in --models: {', '.join(left)}")
    return tuple(sources)


def _server_source(args):
    """(attached server, user config): the TorchServe to manage, from --attach and its URLs,
    or the config.properties to start one from (--ts-config); checked before anything runs."""
    from packrat.torchserve.attach import attached_server
    from packrat.torchserve.userconfig import read_user_config

    ports = [f"--{f.replace('_', '-')}" for f in ("inference_port", "management_port",
                                                  "metrics_port") if getattr(args, f)]
    urls = {"--management": args.management, "--inference": args.inference,
            "--metrics": args.metrics}
    if not args.attach:
        given = [flag for flag, value in {**urls, "--key-file": args.key_file,
                                          "--certificate": args.certificate,
                                          "--envelope": args.envelope}.items() if value]
        if given:
            raise PackratError(f"{given[0]} is for --attach; add --attach to manage a "
                               "TorchServe you started")
        if args.ts_config and ports:
            raise PackratError(f"{ports[0]}: with --ts-config the ports come from "
                               f"{args.ts_config}; set them there")
        return None, (read_user_config(Path(args.ts_config)) if args.ts_config else None)
    refused = ports + (["--ts-config"] if args.ts_config else [])
    if refused:
        raise PackratError(f"{refused[0]} does not go with --attach: the TorchServe you "
                           "started has its own ports and config")
    missing = [flag for flag, value in {**urls, "--model-store": args.model_store}.items()
               if not value]
    if missing:
        raise PackratError(f"--attach needs {', '.join(missing)}: the URLs of the TorchServe "
                           "you started and its model store")
    return attached_server(management=args.management, inference=args.inference,
                           metrics=args.metrics, model_store=Path(args.model_store),
                           key_file=Path(args.key_file) if args.key_file else None,
                           certificate=Path(args.certificate) if args.certificate else None), None


def _slo_ms(name: str, text: str) -> float:
    try:
        ms = float(text)
    except ValueError:
        ms = math.nan
    if not (math.isfinite(ms) and ms > 0):
        raise PackratError(f"--slo {name}={text}: the SLO must be a positive number of ms")
    return ms


def _at_least(value, low, flag: str):
    """value (None: not given) must be >= low."""
    if value is not None and value < low:
        raise PackratError(f"{flag} must be >= {low}, got {value}")


def _pairs(text: str, flag: str, form: str = "NAME=FILE"):
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name or not value:
            raise PackratError(f"{flag}: {part!r} is not {form}")
        out.append((name, value))
    return out


def cmd_serve(args) -> int:
    from packrat.measure.cpus import usable_cores
    from packrat.measure.memory import default_standby_memory_mb
    from packrat.serving.controller import ControllerParams
    from packrat.serving.runtime import CoreSplit
    from packrat.serving.daemon import ServeOptions, serve
    from packrat.serving.rundir import RunDir, controller_pid
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
    if args.standby_memory is not None and not 0 <= args.standby_memory < math.inf:
        raise PackratError(f"--standby-memory must be >= 0 MB, got {args.standby_memory}")
    if not args.interval > 0:  # also refuses nan
        raise PackratError(f"--interval must be > 0 seconds, got {args.interval}")
    for flag in ("inference_port", "management_port", "metrics_port"):
        port = getattr(args, flag)
        if port is not None and not 1 <= port <= 65535:
            raise PackratError(f"--{flag.replace('_', '-')} {port} is not a TCP port (1..65535)")
    attach, ts_config = _server_source(args)
    models = _model_sources(args)
    ports = None
    if args.inference_port or args.management_port or args.metrics_port:
        free = Ports.free()
        ports = Ports(args.inference_port or free.inference, args.management_port or free.management,
                      args.metrics_port or free.metrics, free.grpc_inference, free.grpc_management)
    options = ServeOptions(
        run_dir=run_dir, models=models, cores=args.cores, ports=ports,
        max_batch=args.max_batch, initial_batch=args.initial_batch, calibrate=not args.no_calibrate,
        controller=ControllerParams(
            interval_s=args.interval, max_batch_delay_ms=args.max_batch_delay,
            standby_memory_mb=(args.standby_memory if args.standby_memory is not None
                               else default_standby_memory_mb()),
            core_split=CoreSplit(args.core_split)),
        ts_config=ts_config, attach=attach, envelope=args.envelope,
    )
    print(f"run directory: {options.run_dir}", file=sys.stderr)
    serve(options, say=lambda msg: print(msg, file=sys.stderr, flush=True))
    return 0


def cmd_stop(args) -> int:
    from packrat.serving.ops import stop

    print(stop(_run_dir(args)))
    return 0


def cmd_status(args) -> int:
    from packrat.serving.ops import status

    report = status(_run_dir(args))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    if not report.controller_pid:
        print("no packrat controller runs on this run directory; its last state:")
    server = (f"TorchServe attached at {report.attached}" if report.attached
              else f"TorchServe pid {report.torchserve_pid or '-'}")
    print(f"controller pid {report.controller_pid or '-'}, {server}"
          + (f", restarted {report.torchserve_restarts} times" if report.torchserve_restarts else ""))
    if report.torchserve_event:
        print(f"  {report.torchserve_event}")
    if report.allocation:
        print(f"cores ({report.core_split}): {report.allocation.get('reason')}")
    for name, m in report.models.items():
        last = m.last_reconfiguration_s
        print(f"{name}: version {m.version}, estimated B = {m.estimated_batch}, "
              f"{'auto' if m.auto else 'manual'}, {m.reconfigurations} reconfigurations"
              + (f", last {last:.0f} s ago" if last is not None else ""))
        if report.core_split and report.core_split != "overlap":
            print("  cores: " + (f"shares core {m.cores[0] if m.cores else '-'} while idle"
                                 if m.shared else ",".join(map(str, m.cores)))
                  + ("" if m.slo_ms is None else f"; SLO {m.slo_ms:g} ms " + (
                      "met" if m.slo_met else "not met" if m.slo_met is False
                      else "(not weighed while idle)")))
        if m.latency_ms is not None:
            print(f"  predicted batch latency {m.latency_ms:.1f} ms"
                  + (f" (profile calibrated: {m.calibration})" if m.calibration else ""))
        for w in m.workers:
            print(f"  worker pid {w.pid or '-':>7}: {w.threads} threads, batch {w.batch}, "
                  f"cores {','.join(map(str, w.cores)) or '-'}")
        if m.switching:
            print(f"  switching {m.switching}")
        for st in m.standby:
            print(f"  standby: version {st['version']} {st['plan']} ({st['memory_mb']:.0f} MB)")
        if m.prewarming:
            print(f"  loading ahead of need (at idle priority): {m.prewarming}")
        if m.last_prewarm:
            print(f"  last plan loaded ahead of need: {m.last_prewarm}")
        if m.last_error:
            print(f"  last error: {m.last_error}")
    return 0


def cmd_reconfigure(args) -> int:
    from packrat.core.decide import Reconfigure
    from packrat.serving.ops import reconfigure
    from packrat.serving.rundir import check_model_name

    check_model_name(args.model)
    for flag in ("instances", "threads", "batch", "for_batch"):
        _at_least(getattr(args, flag), 1, f"--{flag.replace('_', '-')}")
    if args.auto:
        request = Reconfigure(args.model, auto=True)
    elif args.for_batch is not None:
        request = Reconfigure(args.model, for_batch=args.for_batch)
    elif None not in (args.instances, args.threads, args.batch):
        request = Reconfigure(args.model, instances=args.instances, threads=args.threads,
                              batch=args.batch)
    else:
        raise PackratError("give --instances, --threads and --batch together, or --for-batch B, or --auto")
    answer = reconfigure(_run_dir(args), request, timeout_s=args.timeout)
    if not answer.ok:
        raise PackratError(answer.message)
    print(f"{answer.message} ({answer.seconds:.1f} s)")
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
    from packrat.bench.demo import run_demo, summary
    from packrat.model.zoo import get_zoo_model, require_dependencies

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

    from packrat.measure.loadgen import ClosedLoop
    from packrat.model.sample import Sample
    from packrat.serving.rundir import RunDir, check_model_name

    check_model_name(args.model)
    phases = _phases(args.phases)
    try:
        body = Sample.load(args.body, args.content_type)
    except PackratError as e:
        raise PackratError(f"--body: {e}; e.g. NAME.example.json from `packrat archive`") from None
    client = RunDir(_run_dir(args)).client()
    load = ClosedLoop(lambda: client.predict(args.model, body.body, timeout_s=60,
                                             content_type=body.content_type))
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
