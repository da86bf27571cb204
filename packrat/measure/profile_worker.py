"""The profiling processes: one model load, then one forked subprocess per thread count.

Run by packrat.measure.profiler as `python -m packrat.measure.profile_worker JOB_JSON`. It loads the model once
through the archive's own handler (the code that serves it), without running it, then forks a
child per thread count t: the child pins itself to its t cores, sets t torch threads, and times
`handler.inference` on synthetic batches of increasing size. Loading once matters: importing
torch and transformers and loading the weights takes seconds to tens of seconds, once per t
otherwise. Each result is one JSON line on stdout; errors go to stderr with a non-zero exit.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

from packrat.measure.cpus import pin_process


def load_handler(model_dir: Path, batch_size: int = 1):
    """Instantiate and initialize the archive's handler with a TorchServe context."""
    from ts.context import Context

    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    handler_file = model_dir / manifest["model"]["handler"].split(":")[0]
    if handler_file.suffix != ".py":
        handler_file = handler_file.with_suffix(".py")
    sys.path.insert(0, str(model_dir))  # the handler and model.py import from their directory
    spec = importlib.util.spec_from_file_location("packrat_profiled_handler", handler_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [
        c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__
    ]
    if len(classes) != 1:
        raise RuntimeError(f"{handler_file} must define exactly one handler class")
    handler = classes[0]()
    name = manifest["model"].get("modelName", "model")
    context = Context(name, str(model_dir), manifest, batch_size, None, "0.12.0")
    handler.initialize(context)
    return handler


def measure(fn, warmup: int, min_reps: int, max_reps: int, min_time_s: float) -> list[float]:
    """Latencies in ms of repeated calls: at least min_reps and min_time_s, at most max_reps."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (
        len(times) < min_reps or time.perf_counter() - start < min_time_s
    ):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def _quantile(sorted_values: list[float], q: float) -> float:
    idx = q * (len(sorted_values) - 1)
    lo, hi = int(idx), min(int(idx) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (idx - lo)


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


def main(job: dict) -> None:
    """Load the model once, then fork one child per thread count, largest first."""
    import torch

    # One thread and no parallel region here: each forked child starts its own OpenMP pool
    # with its own size and affinity (a pool that ran before fork would not survive it).
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    from packrat.measure.profiler import latency_bound

    t0 = time.perf_counter()
    handler = load_handler(Path(job["model_dir"]))
    emit(event="loaded", load_s=round(time.perf_counter() - t0, 3))

    points: list[tuple[int, int, float]] = []
    for threads in job["threads"]:
        cap = latency_bound(points, job["plan_cores"], job["batches"][-1]) if job["prune"] else None
        emit(event="start", threads=threads, cap_ms=cap)
        shared, neighbors = _start_neighbors(handler, threads, job) if job["contended"] else (None, [])
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure one row, report on the pipe, never return
            os.close(read_fd)
            code = 1
            try:
                with os.fdopen(write_fd, "w") as out:
                    measure_row(handler, threads, job["cores"][:threads], cap, job, out, shared)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd) as rows:
            for line in rows:
                event = json.loads(line)
                if event["event"] == "point":
                    points.append((threads, event["batch"], event["latency_ms"]))
                print(line, end="", flush=True)
        _, status = os.waitpid(pid, 0)
        if shared is not None:
            shared.value = -1  # the neighbors stop after their current pass
        for n in neighbors:
            os.waitpid(n, 0)
        if status != 0:
            raise RuntimeError(f"the {threads}-thread measurement failed (status {status})")


def _start_neighbors(handler, threads: int, job: dict):
    """Fork the other instances of a t-thread plan, each pinned to its own t cores, running
    the batch size the measured instance is at (shared.value; -1 stops them). Served side by
    side, instances share memory bandwidth and caches: an isolated profile would miss that."""
    from multiprocessing.sharedctypes import RawValue

    count = len(job["cores"]) // threads - 1
    if count < 1:
        return None, []
    shared = RawValue("i", 0)  # shared memory, inherited by the forks
    pids = []
    for k in range(1, count + 1):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _run_neighbor(handler, threads, job["cores"][k * threads:(k + 1) * threads], shared)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    return shared, pids


def _run_neighbor(handler, threads: int, cores: list[int], shared) -> None:
    import torch

    from packrat.model.wire import synthetic_batch
    pin_process(cores)
    torch.set_num_threads(threads)
    inputs = {}
    while (batch := shared.value) >= 0:
        if batch == 0:
            time.sleep(0.005)
            continue
        if batch not in inputs:
            inputs[batch] = synthetic_batch(handler.spec, batch, seed=batch)
        handler.inference(inputs[batch])


def measure_row(handler, threads: int, cores: list[int], cap, job: dict, out, shared=None) -> None:
    """In a forked child: pin, size the pools, time each batch; stop above the cap. With
    neighbors (shared), they run the same batch size meanwhile; warm-up lets them catch up."""
    import torch

    from packrat.model.wire import synthetic_batch
    pin_process(cores)  # this child has one thread; the pools it starts inherit the mask
    torch.set_num_threads(threads)

    def emit_row(**event) -> None:
        out.write(json.dumps(event) + "\n")
        out.flush()

    for batch in job["batches"]:
        inputs = synthetic_batch(handler.spec, batch, seed=batch)
        if shared is not None:
            shared.value = batch
        times = sorted(
            measure(
                lambda: handler.inference(inputs),
                job["warmup"], job["min_reps"], job["max_reps"], job["min_time_s"],
            )
        )
        latency = statistics.median(times)
        emit_row(
            event="point", threads=threads, batch=batch, latency_ms=latency,
            p10_ms=_quantile(times, 0.1), p90_ms=_quantile(times, 0.9), reps=len(times),
        )
        if cap is not None and latency > cap:
            break
    # Reported so the parent can check that the measurement ran as asked.
    emit_row(event="done", threads=threads, torch_threads=torch.get_num_threads(),
             affinity=sorted(_all_threads_affinity()))


def _all_threads_affinity() -> set[int]:
    cpus: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            cpus |= os.sched_getaffinity(int(task.name))
        except ProcessLookupError:
            pass
    return cpus


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except (Exception, SystemExit) as e:  # model.py may call exit(); a failure all the same
        # The parent shows the last line to the user: the error on one line, not too long.
        traceback.print_exc()
        message = " ".join(str(e).split())
        if len(message) > 500:
            message = message[:500] + " ..."
        print(f"{type(e).__name__}: {message}", file=sys.stderr)
        raise SystemExit(1)
