"""Packrat's entry point around an archive's own handler, in every version Packrat pins.

TorchServe loads `packrat_entry:handle` (the manifest of each pinned version directory names
it; the file is package data copied there) and, as for any function handler, first calls
`handle(None, context)`. That call claims one slot of the version's plan, pins the process to
the slot's cores, sets t intra-op threads and one inter-op thread, and only then loads the
archive's handler exactly as TorchServe's model_loader does (a `module:function`, the one
class of a module, or a TorchServe default handler name) and initializes it. Every later call
is delegated untouched: bodies and outputs are the handler's. An envelope configured in
TorchServe wraps this entry point, so it wraps the handler just as without Packrat.

Everything comes from WORKER_FILE in the model directory, never from the frontend's
environment, so it works in any TorchServe and a worker restarted after Packrat stopped still
pins itself.

A background version (a plan loaded ahead of need, into standby) imports and initializes the
handler and answers Packrat's warm-up requests (WARM_UP_HEADER) on one thread of idle CPU
priority (SCHED_IDLE), so loading it takes only CPU the live plan leaves idle: on 2 cores,
ResNet-50's load at normal priority made the live plan's requests 5-11 times slower. Real
requests run on TorchServe's thread at normal priority. The worker's own start (Python, torch,
TorchServe's modules: ~1.5 s of CPU) comes before this code: where the process may raise a
priority back (an unprivileged one may not), the version's `sitecustomize.py`
(packrat.worker.idle_start) starts it at idle priority too, and the first real request
raises every thread to normal.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packrat.errors import PackratError
from packrat.measure.cpus import pin_process
from packrat.model.spec import WARM_UP_HEADER
from packrat.worker.slots import (
    WorkerConfig,
    claim_slot,
    read_worker_config,
    record_failure,
)

logger = logging.getLogger(__name__)

# Libraries that size their thread pools from the environment when they first start one.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
CLAIM_TRIES = 50  # x 0.1 s: a worker being replaced may still hold its slot for a moment


class _Worker:
    """This process's slot and the handler it serves."""

    def __init__(self, config: WorkerConfig, slot: int, lock_file) -> None:
        self.config = config
        self.slot = slot
        self.lock_file = lock_file  # open for the process's lifetime: it holds the slot
        self.entry_point = None
        self.idle: ThreadPoolExecutor | None = None  # background versions: idle-priority work
        # started at idle priority by idle_start (sitecustomize): raised on the first real request
        self.started_idle = False

    @property
    def cores(self) -> tuple[int, ...]:
        return tuple(self.config.plan.slots[self.slot])


_worker: _Worker | None = None


def handle(data, context):
    global _worker
    if _worker is None:
        if data is not None:
            raise PackratError("Packrat's entry point was called before it was initialized")
        _worker = _initialize(context)
        return None
    if _worker.idle is not None and _is_warm_up(context):
        return _worker.idle.submit(_worker.entry_point, data, context).result()
    if _worker.started_idle:
        _worker.started_idle = False
        _normal_priority()
    return _worker.entry_point(data, context)


def _is_warm_up(context) -> bool:
    try:
        headers = context.get_all_request_header(0)
    except (AttributeError, IndexError, TypeError):
        return False
    return any(k.lower() == WARM_UP_HEADER.lower() for k in headers)


def _initialize(context) -> _Worker:
    config = read_worker_config(Path(context.system_properties["model_dir"]))
    try:
        return _start(config, context)
    except Exception as e:
        record_failure(config.slot_dir, e)
        raise


def _start(config: WorkerConfig, context) -> _Worker:
    plan = config.plan
    for _ in range(CLAIM_TRIES):
        claim = claim_slot(config.slot_dir, len(plan.slots))
        if claim is not None:
            break
        time.sleep(0.1)
    else:
        raise PackratError(f"{plan.model} version {plan.version}: all {len(plan.slots)} slots "
                           "are taken; more workers than the plan has instances")
    worker = _Worker(config, *claim)
    worker.started_idle = hasattr(os, "SCHED_IDLE") and _policy(0) == os.SCHED_IDLE
    # Before the handler's module is imported: its top level may already start threads.
    for name in THREAD_ENV:
        os.environ[name] = str(plan.threads)
    _place(worker, first=True)
    logger.info("%s v%s: slot %d, cores %s, %d threads; handler %s", plan.model, plan.version,
                worker.slot, list(worker.cores), plan.threads, config.handler)
    if config.background:
        worker.idle = ThreadPoolExecutor(1, thread_name_prefix="packrat-idle",
                                         initializer=_idle_priority, initargs=(plan.threads,))
        worker.entry_point = worker.idle.submit(_load, config.handler, context).result()
    else:
        worker.entry_point = _load(config.handler, context)
    changed = _misplaced(worker)
    if changed:
        logger.warning("%s v%s: the handler's initialize changed %s; set back to the plan",
                       plan.model, plan.version, changed)
        _place(worker, first=False)
    return worker


def _load(handler: str, context):
    """Import the handler and initialize it; its entry point."""
    entry_point, initialize = load_entry_point(handler)
    initialize(context)
    return entry_point


def load_entry_point(handler: str):
    """(entry point, initialize function) of a handler, by TorchServe 0.12's own loader code
    (ts.model_loader.TsModelLoader.load, less the Service around it)."""
    from ts.model_loader import TsModelLoader

    loader = TsModelLoader()
    try:
        module, function_name = loader._load_handler_file(handler)
    except ImportError:
        module = loader._load_default_handler(handler)
    if module is None:
        raise ValueError(f"Unable to load module {handler}, make sure it is added to python path")
    function_name = function_name or "handle"
    if hasattr(module, function_name):
        return loader._get_function_entry_point(module, function_name)
    return loader._get_class_entry_point(module)


def _place(worker: _Worker, *, first: bool) -> None:
    import torch

    pin_process(worker.cores)  # every thread the process has now; later ones inherit it
    torch.set_num_threads(worker.config.plan.threads)
    if first:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError as e:  # torch allows it once, before any inter-op work
            logger.warning("could not set inter-op threads to 1: %s", e)


def _idle_priority(threads: int) -> None:
    """This thread (and the threads it starts, such as its OpenMP team) at idle priority."""
    import torch

    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread only
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 19)  # on Linux, also this thread only
        except OSError as e:
            logger.warning("could not lower the load's CPU priority: %s", e)
    torch.set_num_threads(threads)  # a new thread's OpenMP settings are not the main thread's


def _policy(tid: int) -> int | None:
    try:
        return os.sched_getscheduler(tid)
    except (AttributeError, OSError):
        return None


def _normal_priority() -> None:
    """Every thread of this process that is at idle priority back to normal: the version now
    serves real requests (its warm-up threads are idle from here on)."""
    for task in Path("/proc/self/task").iterdir():
        tid = int(task.name)
        if _policy(tid) == os.SCHED_IDLE:
            try:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            except (ProcessLookupError, PermissionError) as e:
                logger.warning("could not raise thread %d back to normal CPU priority: %s",
                               tid, e)


def _misplaced(worker: _Worker) -> str:
    """What differs from the plan now: torch's thread count, or threads off the slot's cores."""
    import torch

    wrong = []
    if torch.get_num_threads() != worker.config.plan.threads:
        wrong.append(f"torch threads to {torch.get_num_threads()}")
    cores = set(worker.cores)
    for task in Path("/proc/self/task").iterdir():
        try:
            if not os.sched_getaffinity(int(task.name)) <= cores:
                wrong.append(f"thread {task.name}'s cores")
                break
        except (ProcessLookupError, PermissionError):
            pass
    return ", ".join(wrong)
