"""Other processes' CPU: what the profiler, the calibration and the benchmark watch so that a
measurement another process disturbed is repeated, not believed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import psutil

# Other processes on the machine (other users, tests, a demo) distort every figure: a
# measurement during which they used more than this many cores is repeated.
FOREIGN_LIMIT_CORES = 0.2
ATTEMPTS = 3

T = TypeVar("T")


class ForeignCpu:
    """CPU used on this machine by processes that are not ours, in cores, over an interval.

    Ours: this process (its threads: the load generator) and the children it has reaped (the
    profiler's workers), its live descendants (the TorchServe launcher, frontend and workers)
    and the processes `also_ours()` names (e.g. those of a TorchServe this process adopted:
    `lambda: packrat.torchserve.server_processes(workdir)`). Everything else that ran (another user's
    tests, a demo, the hypervisor's steal) is foreign: it competes for the cores the workers
    are pinned to, and a pinned multi-thread instance slows down far more than its share when
    one of its threads is descheduled (measured here: 2.4 s instead of 70 ms for ResNet-50).
    """

    def __init__(self, also_ours: Callable[[], Iterable[int]] = tuple) -> None:
        self.also_ours = also_ours
        self._t0 = self._busy0 = 0.0
        self._ours0: dict[int, float] = {}

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        guest = getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)  # inside user, nice
        return sum(t) - idle - guest

    def _ours(self) -> dict[int, float]:
        me = psutil.Process()
        t = me.cpu_times()
        out = {me.pid: t.user + t.system + t.children_user + t.children_system}
        procs = me.children(recursive=True)
        for pid in self.also_ours():
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        for p in procs:
            if p.pid in out:
                continue
            try:
                c = p.cpu_times()
                out[p.pid] = c.user + c.system
            except psutil.Error:
                pass
        return out

    def start(self) -> None:
        self._ours0 = self._ours()
        self._busy0 = self._busy()
        self._t0 = time.monotonic()

    def cores(self) -> float:
        """Foreign CPU since start(), in cores (0.5 = half a core on average)."""
        busy = self._busy() - self._busy0
        ours1 = self._ours()
        elapsed = time.monotonic() - self._t0
        ours = sum(max(0.0, v - self._ours0.get(pid, 0.0)) for pid, v in ours1.items())
        return max(0.0, busy - ours) / elapsed if elapsed > 0 else 0.0


def wait_quiet(watch: ForeignCpu, say, what: str, limit_s: float) -> float:
    """Wait (up to limit_s) until other processes use at most FOREIGN_LIMIT_CORES over a
    second; returns the last reading."""
    deadline = time.monotonic() + limit_s
    told = 0.0
    while True:
        watch.start()
        time.sleep(1.0)
        foreign = watch.cores()
        if foreign <= FOREIGN_LIMIT_CORES or time.monotonic() >= deadline:
            return foreign
        if time.monotonic() - told > 15:
            told = time.monotonic()
            waited = limit_s - (deadline - time.monotonic())
            say(f"waiting for a quiet machine before {what}: other processes use "
                f"{foreign:.2f} cores (waited {waited:.0f} s of at most {limit_s:.0f} s)")


def least_disturbed(attempt: Callable[[], T], foreign: Callable[[T], float], watch: ForeignCpu,
                    say, what: str, quiet_wait_s: float, attempts: int = ATTEMPTS) -> T:
    """attempt() once the machine is quiet (see wait_quiet), and again while other processes
    used more than FOREIGN_LIMIT_CORES during it (foreign(result), read by attempt() over its
    measurements), at most `attempts` times in all; returns the least disturbed result."""
    best = None
    for k in range(1, attempts + 1):
        wait_quiet(watch, say, what, quiet_wait_s)
        result = attempt()
        used = foreign(result)
        if best is None or used < foreign(best):
            best = result
        if used <= FOREIGN_LIMIT_CORES:
            break
        say(f"{what}: other processes used {used:.2f} cores meanwhile"
            + ("; measuring again" if k < attempts else "; keeping the least disturbed"))
    return best
