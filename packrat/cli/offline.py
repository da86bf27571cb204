"""`packrat archive`, `profile` and `plan`: the offline half, no server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from packrat.cli.args import ProgressBar
from packrat.errors import ArchiveError


def cmd_archive(args) -> int:
    from packrat.model.archive import build_zoo_archive

    result = build_zoo_archive(
        args.zoo, Path(args.out), progress=lambda msg: print(f"{args.zoo}: {msg}", file=sys.stderr)
    )
    print(f"archive: {result.mar_path}")
    print(f"example request: {result.example_path}")
    return 0


# -- profile ---------------------------------------------------------------------------------

def cmd_profile(args) -> int:
    from packrat.core.profile import write_profile
    from packrat.measure.cpus import usable_cores
    from packrat.measure.profiler import (
        ProfileSettings,
        default_threads,
        profile_archive,
    )
    from packrat.model.sample import Sample

    if args.sample_content_type and not args.sample:
        raise ArchiveError("--sample-content-type needs --sample FILE")
    sample = Sample.load(args.sample, args.sample_content_type) if args.sample else None
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
        elif ev.kind == "limit":
            text = (f"b>={ev.batch}: the handler fails ({ev.message}); the profile stops at "
                    f"b={ev.limit}")
        else:
            text = "cached"
        bar.update(ev.done, ev.total, text)

    try:
        run = profile_archive(Path(args.archive), settings, sample=sample,
                              envelope=args.envelope, force=args.force, progress=progress)
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
    if run.batch_limit is not None:
        print(f"batch limit: {run.batch_limit} (larger batches fail in the handler: "
              f"{run.batch_limit_reason}); no plan serves more per instance")
    print(f"profile: {run.path}")
    if args.out:
        write_profile(run.profile, Path(args.out))
        print(f"written: {args.out}")
    if args.plot:
        from packrat.bench.plots import plot_profile

        plot_profile(run.profile, len(cores), Path(args.plot), title=Path(args.archive).stem)
        print(f"plot: {args.plot}")
    return 0


# -- plan ------------------------------------------------------------------------------------

def cmd_plan(args) -> int:
    from packrat.errors import PlanError

    if args.models is not None:
        if args.profile is not None or args.batch is not None or args.slo_ms is not None:
            raise PlanError("--models takes the place of --profile, --batch and --slo-ms (give "
                            "each model's B and SLO in NAME=PROFILE:B[:SLO_MS]); use one or the "
                            "other")
        return _plan_models(args)
    if args.profile is None or args.batch is None:
        raise PlanError("give --profile FILE and --batch B, or --models "
                        "NAME=PROFILE:B[:SLO_MS],...")
    return _plan_profile(args)


def _cores(args) -> int:
    if args.cores is None:
        from packrat.measure.cpus import usable_cores

        return len(usable_cores())
    return args.cores


def _plan_profile(args) -> int:
    from packrat.core.allocate import cores_for_slo
    from packrat.core.curve import ServedCurve
    from packrat.core.optimizer import Optimizer
    from packrat.core.profile import read_profile

    profile = read_profile(Path(args.profile), args.format, args.benchmark, args.allocator)
    args.cores = _cores(args)
    opt = Optimizer(profile, args.cores)
    results = [opt.plan(b) for b in args.batch]
    costs = None
    if args.slo_ms is not None:
        curve = ServedCurve(opt)
        costs = [cores_for_slo(curve, b, args.slo_ms) for b in args.batch]
    if args.json:
        data = [r.to_json() for r in results]
        if costs is not None:
            for d, c in zip(data, costs):
                d["slo_cost"] = c.to_json()
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
    for c in costs or ():
        if c.met:
            print(f"SLO {c.slo_ms:g} ms at B={c.batch}: {c.cores} of {args.cores} cores, "
                  f"{c.plan.describe()} ({c.plan.latency_ms:.2f} ms)")
        else:
            print(f"SLO {c.slo_ms:g} ms at B={c.batch}: not met on {args.cores} cores; the best "
                  f"is {c.best_latency_ms:.2f} ms on {c.best_cores} cores "
                  f"({c.best_latency_ms / c.slo_ms:.2f}x the SLO)")
    return 0


def _plan_models(args) -> int:
    from packrat.core.allocate import ModelDemand, allocate
    from packrat.core.curve import ServedCurve
    from packrat.core.profile import read_profile

    cores = _cores(args)
    curves: dict[str, ServedCurve] = {}  # one per profile file, shared by models that use it
    demands = []
    for spec in args.models:
        if spec.profile not in curves:
            profile = read_profile(Path(spec.profile), args.format, args.benchmark,
                                   args.allocator)
            curves[spec.profile] = ServedCurve.of(profile, cores)
        demands.append(ModelDemand(spec.name, curves[spec.profile], spec.batch, spec.slo_ms))
    result = allocate(demands, cores)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    used = cores - result.spare_cores
    print(f"N = {cores} cores: {used} dedicated, {result.spare_cores} spare; idle models "
          f"answer from a shared core")
    width = max(len("model"), *(len(m.name) for m in result.models))
    print(f"{'model':<{width}}  {'B':>5}  {'cores':>6}  {'plan':<28}{'ms':>10}  {'SLO ms':>8}  "
          f"{'met':>4}")
    for m in result.models:
        plan = m.plan.describe() if m.plan else "-"
        ms = f"{m.plan.latency_ms:10.2f}" if m.plan else f"{'-':>10}"
        slo = f"{m.slo_ms:8g}" if m.slo_ms is not None else f"{'-':>8}"
        met = {True: "yes", False: "NO", None: "-"}[m.slo_met]
        n = "shared" if m.shared else str(m.cores)
        print(f"{m.name:<{width}}  {m.batch:>5}  {n:>6}  {plan:<28}{ms}  {slo}  {met:>4}")
    if result.weighted_latency_ms is not None:
        print(f"request-weighted mean batch latency: {result.weighted_latency_ms:.2f} ms")
    if result.worst_slo_ratio is not None:
        if result.slo_feasible:
            print(f"every SLO met (worst: {result.worst_slo_ratio:.2f}x its SLO)")
        else:
            print(f"SLOs cannot all be met on {cores} cores; this split keeps the worst miss "
                  f"as small as any can, {result.worst_slo_ratio:.2f}x its SLO:")
            for miss in result.missed:
                print(f"  missed: {miss.describe()}")
    return 0
