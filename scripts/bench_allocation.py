#!/usr/bin/env python3
"""Several models on one core budget, by the numbers: the allocator against fixed splits.

With the published 16-core profiles (ResNet-50, Inception-v3, GPT-2, BERT; tests/data) and a
few load mixes, prints the allocator's predicted request-weighted batch latency against an even
split of the cores and a split proportional to load (B), and the cores each SLO needs on its
own (the cost view: `packrat plan --profile F --batch B --slo-ms X`). Predictions only: every
figure is a served plan's latency from the profiles, nothing is measured.

    python scripts/bench_allocation.py [--cores 16] [--data tests/data]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packrat.core.allocate import (  # noqa: E402
    Allocation,
    ModelDemand,
    allocate,
    cores_for_slo,
    evaluate_split,
    even_split,
    proportional_split,
)
from packrat.core.curve import ServedCurve  # noqa: E402
from packrat.core.profile import read_profile  # noqa: E402

MODELS = ("resnet", "inception", "gpt2", "bert")
SHORT = {"resnet": "R", "inception": "I", "gpt2": "G", "bert": "B"}

# (name, B per model in MODELS order (0: idle), SLO ms per model (None: none))
MIXES = [
    ("equal", (8, 8, 8, 8), (None,) * 4),
    ("skewed", (32, 8, 2, 2), (None,) * 4),
    ("two busy, two idle", (16, 0, 0, 8), (None,) * 4),
    ("equal, SLOs", (8, 8, 8, 8), (120.0, 90.0, 150.0, 100.0)),
    ("skewed, SLOs", (32, 8, 2, 2), (400.0, 110.0, 90.0, 60.0)),
    ("equal, SLOs out of reach", (8, 8, 8, 8), (50.0, 50.0, 50.0, 50.0)),
]


def cores_of(a: Allocation) -> str:
    return "/".join("-" if m.shared else str(m.cores) for m in a.models)


def slos_met(a: Allocation) -> str:
    judged = [m for m in a.busy if m.slo_ms is not None]
    if not judged:
        return "-"
    met = sum(1 for m in judged if m.slo_met)
    worst = "" if a.slo_feasible else f" (worst {a.worst_slo_ratio:.2f}x)"
    return f"{met}/{len(judged)}{worst}"


def slo_cores(demands: list[ModelDemand], cores: int) -> str:
    """The fewest cores each model's SLO needs alone, and their sum."""
    needs = []
    for d in demands:
        if not d.busy or d.slo_ms is None:
            needs.append("-")
            continue
        cost = cores_for_slo(d.curve, d.batch, d.slo_ms, cores)
        needs.append(str(cost.cores) if cost.met else f">{cores}")
    if all(n == "-" for n in needs):
        return "-"
    total = sum(int(n) for n in needs if n.isdigit())
    over = any(n.startswith(">") for n in needs)
    return "/".join(needs) + (f" (> {cores})" if over else f" = {total}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=16)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "tests" / "data"),
                    help="folder with the published pytorch_<model>_latency.csv profiles")
    args = ap.parse_args()

    curves = {m: ServedCurve.of(read_profile(Path(args.data) / f"pytorch_{m}_latency.csv"),
                                args.cores) for m in MODELS}
    print(f"N = {args.cores} cores; models {', '.join(f'{SHORT[m]} = {m}' for m in MODELS)}; "
          f"cores and SLOs listed R/I/G/B (- : idle, shared); ms = request-weighted mean batch "
          f"latency; x = that split's ms over the allocator's\n")
    print("| mix | B | SLO ms | cores the SLOs need alone | allocator: cores | ms | SLOs met "
          "| even: cores | ms | x | SLOs met | proportional: cores | ms | x | SLOs met |")
    print("| --- | --- | --- | --- | --- | ---: | --- | --- | ---: | ---: | --- | --- | ---: | ---: "
          "| --- |")
    for name, batches, slos in MIXES:
        demands = [ModelDemand(m, curves[m], b, s) for m, b, s in zip(MODELS, batches, slos)]
        best = allocate(demands, args.cores)
        row = [name, "/".join(map(str, batches)),
               "/".join("-" if s is None else f"{s:g}" for s in slos),
               slo_cores(demands, args.cores),
               cores_of(best), f"{best.weighted_latency_ms:.1f}", slos_met(best)]
        for split in (even_split(demands, args.cores), proportional_split(demands, args.cores)):
            other = evaluate_split(demands, split, args.cores)
            ratio = other.weighted_latency_ms / best.weighted_latency_ms
            row += [cores_of(other), f"{other.weighted_latency_ms:.1f}", f"{ratio:.2f}",
                    slos_met(other)]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
