"""What loading a plan ahead of need costs the live plan, at normal and at idle CPU priority.

A live 2-thread ResNet-50 (batch 1, about a third busy, as at a low request rate) is timed
while nothing else runs, and while one process per core loads a second ResNet-50 and warms it
up (two batches of 8), as a standby version's workers do: with the load at normal priority;
on a SCHED_IDLE thread after the imports at normal priority (what packrat.worker.wrapper
alone does for a background version); and with the whole process started at idle priority
(what a background version's sitecustomize.py, packrat.worker.idle_start, adds where the
worker may raise its priority back). Rounds rotate the order. Prints the live plan's latency
per case and how long the loads took.

    .venv/bin/python scripts/bench_prewarm_priority.py [--rounds 3] [--model resnet50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from packrat.model.zoo import build_model, get_zoo_model

LOADER = r'''
import os, sys, time
from concurrent.futures import ThreadPoolExecutor
import torch
idle, core, model = sys.argv[1] != "normal", int(sys.argv[2]), sys.argv[3]
os.sched_setaffinity(0, {core})

def load():
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
    torch.set_num_threads(1)
    from packrat.model.zoo import build_model, get_zoo_model
    entry = get_zoo_model(model)
    m = build_model(entry)
    inputs = {i.name: torch.randn(8, *i.shape) for i in entry.spec.inputs}
    with torch.inference_mode():
        for _ in range(2):
            m(**inputs)

start = time.time()
ThreadPoolExecutor(1).submit(load).result()
print(time.time() - start)
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="resnet50")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))[:2]
    torch.set_num_threads(len(cores))
    entry = get_zoo_model(args.model)
    model = build_model(entry)
    if any(i.dtype != "float32" for i in entry.spec.inputs):
        sys.exit(f"{args.model}: only models of float inputs (images), not token ids")
    inputs = {i.name: torch.randn(1, *i.shape) for i in entry.spec.inputs}
    modes = ("normal", "idle", "idle-start")
    live: dict[str, list[float]] = {"nothing": [], **{m: [] for m in modes}}
    loads: dict[str, list[float]] = {m: [] for m in modes}

    def idle_start() -> None:  # in the child, before Python starts: as idle_start does
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    def serve(done) -> list[float]:
        """Live requests, each followed by twice its time idle, until done()."""
        out = []
        while not done():
            t = time.time()
            model(**inputs)
            out.append((time.time() - t) * 1000)
            time.sleep(2 * out[-1] / 1000)
        return out

    with torch.inference_mode():
        for _ in range(5):
            model(**inputs)
        for r in range(args.rounds):
            end = time.time() + 6.0
            live["nothing"] += serve(lambda: time.time() >= end)
            for mode in modes[r % 3:] + modes[:r % 3]:
                procs = [subprocess.Popen([sys.executable, "-c", LOADER, mode, str(c), args.model],
                                          stdout=subprocess.PIPE, text=True,
                                          preexec_fn=idle_start if mode == "idle-start" else None)
                         for c in cores]
                live[mode] += serve(lambda: all(p.poll() is not None for p in procs))
                loads[mode] += [float(p.communicate()[0]) for p in procs]
    print(f"{args.model}: live plan 1x<t={len(cores)},b=1> on cores {cores}, "
          f"{args.rounds} rounds")
    for case, ms in live.items():
        ms.sort()
        what = {"nothing": "with nothing loading", "normal": "loading at normal priority",
                "idle": "loading at idle priority", "idle-start": "started at idle priority"}[case]
        print(f"  {what:<28}{len(ms):5d} requests, p50 {statistics.median(ms):6.1f} ms, "
              f"p90 {ms[int(0.9 * len(ms))]:6.1f} ms, mean {statistics.mean(ms):6.1f} ms")
    base = statistics.median(live["nothing"])
    for mode, seconds in loads.items():
        print(f"  load {mode}: median {statistics.median(seconds):.1f} s per "
              f"process; live p50 x{statistics.median(live[mode]) / base:.2f}")


if __name__ == "__main__":
    main()
