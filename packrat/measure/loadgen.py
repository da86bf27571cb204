"""A closed-loop load generator for loopback TorchServe: C clients, each sending its next
request as soon as the last one is answered, so that batches of about C form.

Bounded in time and count; every request has a timeout, and every outcome is counted:
answered (HTTP 200), failed (any other status, with the reason) or unanswered (timeout or a
dropped connection).

`measure_closed_loop` is the one measurement the calibration and the benchmark make with it:
warm up, then time the requests sent in a window while watching other processes' CPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import requests

from packrat.errors import PackratError


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return len(self.latencies_ms)


class ClosedLoop:
    """Runs `concurrency` client threads until stop() (or max_requests per client)."""

    def __init__(self, send: Callable[[], requests.Response], timeout_s: float = 60,
                 max_requests: int = 1_000_000) -> None:
        # send() makes one request, e.g. TorchServeClient.predict (loopback, token handled)
        self.send, self.timeout_s = send, timeout_s
        self.max_requests = max_requests
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def set_concurrency(self, n: int) -> None:
        """Grow or shrink the number of clients; a removed client finishes its request first."""
        with self._lock:
            alive = [t for t in self._threads if t.is_alive() and not t.stop.is_set()]
            for t in alive[n:]:
                t.stop.set()
            for _ in range(n - len(alive)):
                t = threading.Thread(target=self._client, daemon=True)
                t.stop = threading.Event()
                self._threads.append(t)
                t.start()

    def _client(self) -> None:
        me = threading.current_thread()
        for _ in range(self.max_requests):
            if self._stop.is_set() or me.stop.is_set():
                break
            start = time.perf_counter()
            try:
                r = self.send()
            except (requests.RequestException, PackratError) as e:
                with self._lock:
                    self.result.unanswered.append(f"{type(e).__name__}: {e}")
                continue
            elapsed = (time.perf_counter() - start) * 1000.0
            with self._lock:
                if r.status_code == 200:
                    self.result.latencies_ms.append(elapsed)
                else:
                    self.result.failures.append(f"HTTP {r.status_code}: {r.text[:200]}")

    def stop(self) -> LoadResult:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)
        return self.result


@dataclass(frozen=True)
class Measurement:
    """One closed-loop measurement: (sent, answered) perf_counter times of every request
    answered with HTTP 200, the measurement window [start, end) after the warm-up, what failed
    or went unanswered over the whole run, and the cores other processes used in the window."""

    samples: tuple[tuple[float, float], ...]
    start: float
    end: float
    failures: tuple[str, ...]
    unanswered: tuple[str, ...]
    foreign_cores: float = 0.0  # 0.0 when not watched

    @property
    def lost(self) -> int:
        return len(self.failures) + len(self.unanswered)

    def latencies_ms(self) -> list[float]:
        """Latency of each request sent inside the window (answered by the end of the run)."""
        return [(b - a) * 1000.0 for a, b in self.samples if self.start <= a < self.end]


class _Watch(Protocol):
    def start(self) -> None: ...
    def cores(self) -> float: ...


def measure_closed_loop(send: Callable[[], requests.Response], clients: int, warmup_s: float,
                        seconds: float, timeout_s: float, watch: _Watch | None = None
                        ) -> Measurement:
    """Run `clients` closed-loop clients of send(), give them warmup_s to fall into step, then
    measure for `seconds`, reading `watch` (e.g. packrat.measure.foreign.ForeignCpu) over that
    window; stop every client (each finishes its request) and return what was measured."""
    samples: list[tuple[float, float]] = []
    lock = threading.Lock()

    def timed() -> requests.Response:
        a = time.perf_counter()
        r = send()
        b = time.perf_counter()
        if r.status_code == 200:
            with lock:
                samples.append((a, b))
        return r

    load = ClosedLoop(timed, timeout_s=timeout_s)
    try:
        load.set_concurrency(clients)
        time.sleep(warmup_s)
        if watch is not None:
            watch.start()
        start = time.perf_counter()
        time.sleep(seconds)
        end = time.perf_counter()
        foreign = watch.cores() if watch is not None else 0.0
    finally:
        result = load.stop()
    with lock:  # a client that outlived stop()'s wait may still append
        return Measurement(tuple(samples), start, end, tuple(result.failures),
                           tuple(result.unanswered), foreign)
