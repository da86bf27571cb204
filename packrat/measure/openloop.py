"""An open-loop load generator for loopback TorchServe: request k is sent at arrivals[k]
seconds after the start whether or not earlier ones were answered, so a slow server sees its
queue grow as real users would make it grow (a closed loop would slow down with it).

- Sent by a pool of at most `max_in_flight` worker threads, started as the load needs them.
- When all of them are busy at a request's time, that request is dropped and counted as
  `dropped` (a miss for the SLO): delaying it instead would quietly turn the run into a
  closed loop and hide the overload. Every request sent is timed from when a worker sent it;
  its `start_lag_s` (how late after its schedule) shows when the generator itself fell behind.
- Every request has a timeout: one not answered within timeout_s of being sent is
  `unanswered`, even if an answer comes later. `send` should carry the same timeout (e.g.
  `client.predict(..., timeout_s=...)`) so that its worker is freed; until then it counts as
  in flight. The run ends at the last arrival plus at most timeout_s.
- Every outcome is counted: answered (HTTP 200), failed (another status, with the reason),
  unanswered (timeout, refused or dropped connection), dropped (by the generator).

`clock` and `sleep` may be replaced (tests); the default sleep is interrupted by stop().
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import requests

from packrat.core.stats import percentile
from packrat.errors import PackratError


class _Response(Protocol):
    status_code: int
    text: str


class Outcome(Enum):
    ANSWERED = "answered"
    FAILED = "failed"
    UNANSWERED = "unanswered"
    DROPPED = "dropped"


@dataclass(frozen=True)
class RequestRecord:
    index: int
    scheduled_s: float                # arrival time, seconds after the start
    outcome: Outcome
    start_lag_s: float | None = None  # sent this late after scheduled_s; None if never sent
    latency_ms: float | None = None   # to the response (answered or failed), else None
    detail: str = ""                  # why it failed, went unanswered or was dropped


@dataclass(frozen=True)
class Window:
    start_s: float
    count: int           # requests scheduled in [start_s, start_s + window_s)
    answered: int
    p50_ms: float | None  # of those answered; None if none was
    p99_ms: float | None


@dataclass(frozen=True)
class OpenLoopResult:
    records: tuple[RequestRecord, ...]  # one per request due before the end, by index
    elapsed_s: float
    timeout_s: float
    max_in_flight: int

    def _n(self, outcome: Outcome) -> int:
        return sum(r.outcome is outcome for r in self.records)

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def answered(self) -> int:
        return self._n(Outcome.ANSWERED)

    @property
    def failed(self) -> int:
        return self._n(Outcome.FAILED)

    @property
    def unanswered(self) -> int:
        return self._n(Outcome.UNANSWERED)

    @property
    def dropped(self) -> int:
        return self._n(Outcome.DROPPED)

    def latencies_ms(self) -> list[float]:
        """Latencies of the answered requests, in index order."""
        return [r.latency_ms for r in self.records
                if r.outcome is Outcome.ANSWERED and r.latency_ms is not None]

    def mean_ms(self) -> float | None:
        lat = self.latencies_ms()
        return sum(lat) / len(lat) if lat else None

    def p50_ms(self) -> float | None:
        lat = self.latencies_ms()
        return percentile(lat, 50) if lat else None

    def p99_ms(self) -> float | None:
        lat = self.latencies_ms()
        return percentile(lat, 99) if lat else None

    def max_start_lag_s(self) -> float:
        return max((r.start_lag_s for r in self.records if r.start_lag_s is not None),
                   default=0.0)

    def slo_attainment(self, slo_ms: float) -> float:
        """The fraction of all requests answered within slo_ms; failed, unanswered and dropped
        ones are misses. 1.0 for a run with no requests."""
        if not self.records:
            return 1.0
        ok = sum(1 for r in self.records if r.outcome is Outcome.ANSWERED
                 and r.latency_ms is not None and r.latency_ms <= slo_ms)
        return ok / len(self.records)

    def series(self, window_s: float, until_s: float | None = None) -> tuple[Window, ...]:
        """Per-window counts and answered p50/p99 by scheduled time, from 0 to until_s (default:
        the last arrival), empty windows included so that a plot's x axis is even."""
        if not window_s > 0:
            raise ValueError(f"window_s {window_s} must be > 0")
        end = until_s if until_s is not None else max(
            (r.scheduled_s for r in self.records), default=0.0) + 1e-9
        n = max(1, math.ceil(end / window_s))
        buckets: list[list[RequestRecord]] = [[] for _ in range(n)]
        for r in self.records:
            i = int(r.scheduled_s // window_s)
            if 0 <= i < n:
                buckets[i].append(r)
        out = []
        for i, b in enumerate(buckets):
            lat = [r.latency_ms for r in b
                   if r.outcome is Outcome.ANSWERED and r.latency_ms is not None]
            out.append(Window(i * window_s, len(b), len(lat),
                              percentile(lat, 50) if lat else None,
                              percentile(lat, 99) if lat else None))
        return tuple(out)

    def summary(self) -> str:
        """One line, e.g. "120 requests: 118 answered (p50 64 ms, p99 210 ms), 0 failed,
        1 unanswered, 1 dropped; max start lag 3 ms"."""
        p50, p99 = self.p50_ms(), self.p99_ms()
        lat = f" (p50 {p50:.0f} ms, p99 {p99:.0f} ms)" if p50 is not None and p99 is not None \
            else ""
        return (f"{self.count} requests: {self.answered} answered{lat}, {self.failed} failed, "
                f"{self.unanswered} unanswered, {self.dropped} dropped; "
                f"max start lag {self.max_start_lag_s() * 1000:.0f} ms")


class OpenLoop:
    """Sends send() on the schedule `arrivals` (seconds from the start, non-decreasing)."""

    def __init__(self, send: Callable[[], _Response], arrivals: Sequence[float], *,
                 timeout_s: float, max_in_flight: int,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], object] | None = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s {timeout_s} must be > 0")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight {max_in_flight} must be >= 1")
        if any(not 0 <= a <= b for a, b in zip(arrivals, list(arrivals[1:]) + [math.inf])):
            raise ValueError("arrivals must be >= 0 and non-decreasing (seconds from the start)")
        self.send, self.arrivals = send, tuple(arrivals)
        self.timeout_s, self.max_in_flight = timeout_s, max_in_flight
        self.clock = clock
        self._stop = threading.Event()
        self.sleep = sleep if sleep is not None else self._stop.wait
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._jobs: queue.SimpleQueue[tuple[int, float] | None] = queue.SimpleQueue()
        self._records: dict[int, RequestRecord] = {}
        self._deadlines: dict[int, float] = {}  # in flight: clock() by which it must answer
        self._lags: dict[int, float] = {}       # start lag of each request a worker sent
        self._workers = 0
        self._error: BaseException | None = None
        self._start = 0.0

    def stop(self) -> None:
        """Send no more requests (from another thread); run() then waits for those in flight."""
        self._stop.set()

    def run(self) -> OpenLoopResult:
        self._start = start = self.clock()
        try:
            for k, at in enumerate(self.arrivals):
                while (wait := at - (self.clock() - start)) > 0 and not self._stop.is_set():
                    self.sleep(wait)  # again if woken early
                if self._stop.is_set():
                    break
                self._dispatch(k, at)
            self._wait_in_flight()
        finally:
            for _ in range(self._workers):
                self._jobs.put(None)  # idle workers end; busy ones after their request
        with self._lock:
            records = tuple(self._records[k] for k in sorted(self._records))
        if self._error is not None:
            raise self._error  # a bug in send(), not the server's doing
        return OpenLoopResult(records, self.clock() - start, self.timeout_s, self.max_in_flight)

    def _dispatch(self, k: int, at: float) -> None:
        with self._lock:
            if len(self._deadlines) >= self.max_in_flight:
                self._records[k] = RequestRecord(
                    k, at, Outcome.DROPPED,
                    detail=f"all {self.max_in_flight} senders busy (raise max_in_flight?)")
                return
            self._deadlines[k] = self.clock() + self.timeout_s
            if self._workers < len(self._deadlines):
                self._workers += 1
                threading.Thread(target=self._worker, daemon=True,
                                 name=f"openloop-{self._workers}").start()
        self._jobs.put((k, at))

    def _wait_in_flight(self) -> None:
        """Until every request sent is settled or past its deadline (those are unanswered)."""
        with self._lock:
            while self._deadlines:
                left = max(self._deadlines.values()) - self.clock()
                if left <= 0:
                    break
                self._settled.wait(left)
            for k in self._deadlines:
                self._records.setdefault(k, RequestRecord(
                    k, self.arrivals[k], Outcome.UNANSWERED, self._lags.get(k),
                    detail=f"no answer within the {self.timeout_s:g} s timeout"))

    def _worker(self) -> None:
        while (job := self._jobs.get()) is not None:
            k, at = job
            t0 = self.clock()
            lag = t0 - self._start - at
            with self._lock:
                self._deadlines[k] = t0 + self.timeout_s
                self._lags[k] = lag
            record = self._send(k, at, lag, t0)
            with self._lock:
                self._records.setdefault(k, record)  # unless already counted unanswered
                self._deadlines.pop(k, None)
                self._settled.notify_all()

    def _send(self, k: int, at: float, lag: float, t0: float) -> RequestRecord:
        try:
            r = self.send()
        except (requests.RequestException, PackratError, OSError) as e:
            return RequestRecord(k, at, Outcome.UNANSWERED, lag,
                                 detail=f"{type(e).__name__}: {str(e)[:200]}")
        except Exception as e:  # noqa: BLE001 - re-raised by run()
            with self._lock:
                self._error = self._error or e
            return RequestRecord(k, at, Outcome.UNANSWERED, lag,
                                 detail=f"{type(e).__name__}: {str(e)[:200]}")
        ms = (self.clock() - t0) * 1000.0
        if ms > self.timeout_s * 1000.0:
            return RequestRecord(k, at, Outcome.UNANSWERED, lag, detail=(
                f"answered after {ms / 1000:.2f} s, past the {self.timeout_s:g} s timeout"))
        if r.status_code == 200:
            return RequestRecord(k, at, Outcome.ANSWERED, lag, ms)
        return RequestRecord(k, at, Outcome.FAILED, lag, ms,
                             f"HTTP {r.status_code}: {r.text[:200]}")


def run_open_loop(send: Callable[[], _Response], arrivals: Sequence[float], *,
                  timeout_s: float, max_in_flight: int,
                  clock: Callable[[], float] = time.perf_counter,
                  sleep: Callable[[float], object] | None = None) -> OpenLoopResult:
    """Run the open loop to its end (see OpenLoop and the module's docstring)."""
    return OpenLoop(send, arrivals, timeout_s=timeout_s, max_in_flight=max_in_flight,
                    clock=clock, sleep=sleep).run()
