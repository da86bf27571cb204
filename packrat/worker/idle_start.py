"""Copied as `sitecustomize.py` into the directory of a version Packrat loads ahead of need.

TorchServe starts a worker with its model directory on PYTHONPATH, so Python imports this
file at start-up, before TorchServe's worker code and torch: about 1.5 s of CPU per worker
that, at normal priority, slowed the live plan's requests on the same cores. It puts the main
thread at idle CPU priority (SCHED_IDLE; threads it starts inherit it), only where the process
may raise it back: packrat.worker.wrapper raises every thread to normal priority on the
version's first real request. Then it runs the sitecustomize this file shadows, if any (a
distribution's or an environment's own).
"""

import os

try:
    from packrat.worker.priority import may_raise_back

    if may_raise_back():
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
except (ImportError, AttributeError, OSError):
    pass  # the worker starts at normal priority, as without this file


def _run_shadowed() -> None:
    import importlib.machinery
    import importlib.util
    import sys

    here = os.path.dirname(os.path.realpath(__file__))
    rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_run_shadowed()
