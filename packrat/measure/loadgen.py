"""A closed-loop load generator for loopback TorchServe: C clients, each sending its next
request as soon as the last one is answered, so that batches of about C form.

Bounded in time and count; every request has a timeout, and every outcome is counted:
answered (HTTP 200), failed (any other status, with the reason) or unanswered (timeout or a
dropped connection).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

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
