"""The profiling processes: one model load, then one forked subprocess per thread count.

Run by packrat.measure.profiler as `python -m packrat.measure.profile_worker JOB_JSON`. It loads the model once
through the archive's own handler (the code that serves it), without running it, then forks a
child per thread count t: the child pins itself to its t cores, sets t torch threads, and times
one batch call on batches of increasing size. The call is, with a sample request, the whole
handler as a TorchServe worker runs it (packrat.measure.handler_call); without one (Packrat's
own archives), `handler.inference` on the archive's synthetic example. Loading once matters:
importing torch and transformers and loading the weights takes seconds to tens of seconds,
once per t otherwise.

A batch size the handler fails on ends the row and, from then on, every row below it (an
event "limit"); failing on the first size is the sample's rejection. Each event is one JSON
line on stdout, which is this process's alone: whatever the model or handler prints goes to
stderr. A failure ends with an event "error" (its stage and a one-line message), the
traceback on stderr and a non-zero exit.
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
from collections.abc import Callable
from pathlib import Path

from packrat.measure.cpus import pin_process
from packrat.measure.handler_call import HandlerFailed, one_line

# A batch call factory: batch size -> a function that runs one batch of that size.
Runner = Callable[[int], Callable[[], object]]

# Events go here; fd 1 itself is pointed at stderr in main (see the module docstring).
_events = sys.stdout


class WorkerFailure(Exception):
    """A failure to report as an event "error": stage "load" (the model or handler did not
    load), "reject" (the first batch size failed) or "run"."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage, self.message = stage, message


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
    _events.write(json.dumps(event) + "\n")
    _events.flush()


def load_runner(job: dict) -> Runner:
    """Load the model once and return the batch call factory for the job's mode."""
    if job.get("sample") is None:
        from packrat.model.wire import synthetic_batch

        handler = load_handler(Path(job["model_dir"]))

        def synthetic(batch: int):
            inputs = synthetic_batch(handler.spec, batch, seed=batch)
            return lambda: handler.inference(inputs)

        return synthetic

    from packrat.measure.handler_call import (
        HandlerTarget,
        load_service,
        predict,
        wire_batch,
    )
    from packrat.model.sample import Sample

    spec = job["sample"]
    sample = Sample(Path(spec["path"]).read_bytes(), spec["content_type"], spec["source"])
    service = load_service(HandlerTarget(
        model_name=job["model_name"], model_dir=Path(job["model_dir"]), handler=job["handler"],
        batch_size=job["batches"][-1], envelope=job.get("envelope"),
    ))

    def whole_handler(batch: int):
        # The wire batch is built per call: a worker decodes every request, and a handler
        # may change the objects it is handed.
        return lambda: predict(service, wire_batch(sample, batch))

    return whole_handler


def main(job: dict) -> None:
    """Load the model once, then fork one child per thread count, largest first."""
    global _events
    _events = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # prints of the model or handler must not reach the event stream
    import torch

    # One thread and no parallel region here: each forked child starts its own OpenMP pool
    # with its own size and affinity (a pool that ran before fork would not survive it).
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    from packrat.measure.profiler import latency_bound

    t0 = time.perf_counter()
    try:
        runner = load_runner(job)
    except (Exception, SystemExit) as e:  # the handler's own error, whatever its type
        raise WorkerFailure("load", one_line(e)) from e
    emit(event="loaded", load_s=round(time.perf_counter() - t0, 3))

    points: list[tuple[int, int, float]] = []
    batches = list(job["batches"])  # shrinks to the sizes the handler takes
    for threads in job["threads"]:
        cap = latency_bound(points, job["plan_cores"], job["batches"][-1]) if job["prune"] else None
        emit(event="start", threads=threads, cap_ms=cap)
        shared, neighbors = _start_neighbors(runner, threads, job) if job["contended"] else (None, [])
        rejected = None
        read_fd, write_fd = os.pipe()

        def measure_in_child():  # runs at once, in the fork below
            os.close(read_fd)
            with os.fdopen(write_fd, "w") as out:
                measure_row(runner, threads, job["cores"][:threads], cap, batches, job, out,
                            shared)

        pid = _fork(measure_in_child)  # measures one row, reports on the pipe
        os.close(write_fd)
        with os.fdopen(read_fd) as rows:
            for line in rows:
                event = json.loads(line)
                if event["event"] == "point":
                    points.append((threads, event["batch"], event["latency_ms"]))
                elif event["event"] == "limit":
                    if event["batch"] <= batches[0]:
                        rejected = event["error"]
                    batches = [b for b in batches if b < event["batch"]]
                _events.write(line)
                _events.flush()
        _, status = os.waitpid(pid, 0)
        if shared is not None:
            shared.value = -1  # the neighbors stop after their current pass
        for n in neighbors:
            os.waitpid(n, 0)
        if rejected is not None:
            raise WorkerFailure("reject", rejected)
        if status != 0:
            raise RuntimeError(f"the {threads}-thread measurement failed (status {status})")


def _start_neighbors(runner: Runner, threads: int, job: dict):
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
        cores = job["cores"][k * threads:(k + 1) * threads]
        pids.append(_fork(lambda cores=cores: _run_neighbor(runner, threads, cores, shared)))
    return shared, pids


def _fork(work) -> int:
    """Run work() in a forked child, which never returns: it exits 0, or 1 with the
    traceback on stderr. The parent gets the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _run_neighbor(runner: Runner, threads: int, cores: list[int], shared) -> None:
    import torch

    pin_process(cores)
    torch.set_num_threads(threads)
    calls = {}
    failed = 0  # a size that failed here: the measured instance stops there too; wait
    while (batch := shared.value) >= 0:
        if batch in (0, failed):
            time.sleep(0.005)
            continue
        if batch not in calls:
            calls[batch] = runner(batch)
        try:
            calls[batch]()
        except Exception:  # noqa: BLE001 - the handler's error; the measured child reports it
            failed = batch


def measure_row(runner: Runner, threads: int, cores: list[int], cap, batches: list[int],
                job: dict, out, shared=None) -> None:
    """In a forked child: pin, size the pools, time each batch; stop above the cap, or at a
    size the handler fails on (event "limit"). With neighbors (shared), they run the same
    batch size meanwhile; warm-up lets them catch up."""
    import torch

    pin_process(cores)  # this child has one thread; the pools it starts inherit the mask
    torch.set_num_threads(threads)

    def emit_row(**event) -> None:
        out.write(json.dumps(event) + "\n")
        out.flush()

    for batch in batches:
        call = runner(batch)
        try:
            call()  # does the handler take this size? (also the first warm-up pass)
            if shared is not None:  # the neighbors run only sizes that work
                shared.value = batch
            times = sorted(measure(call, max(job["warmup"] - 1, 0), job["min_reps"],
                                   job["max_reps"], job["min_time_s"]))
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the handler's, whatever its type
            error = str(e) if isinstance(e, HandlerFailed) else one_line(e)
            emit_row(event="limit", threads=threads, batch=batch, error=error)
            break
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
        traceback.print_exc()
        if isinstance(e, WorkerFailure):
            emit(event="error", stage=e.stage, message=e.message)
        else:
            emit(event="error", stage="run", message=one_line(e))
        raise SystemExit(1)
