"""When an old version may be deleted: the drain rule, a pure function of what was observed.

After set-default new requests go to the new version, but requests already queued on the old
one stay there, and a batch a worker has taken is no longer counted as pending (measured on
TorchServe 0.12: pending read 0 while the last batch still ran for a second). Metrics cannot
tell either: requests to /predictions/NAME count under "default" whatever version served them.
So the old version is drained once both held for long enough:

- its queue read empty continuously for longer than the batching delay plus two full
  batches (the predicted latency of the old plan) plus 0.2 s, and
- its workers' CPU time stood still for two batching delays plus 0.1 s (a worker running a
  batch of a CPU-bound model uses CPU; an idle one does not).

Measured under 6 closed-loop clients (1 worker, batch 2, 0.3 s a batch, 50 ms delay): the
rule fired 0.2 s after the last old response, and DELETE then lost nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum

# The batch time assumed for an old plan the profile cannot tell (a manual plan on points the
# profiler skipped predicts inf): without it the queue's empty window never closed and the
# drain waited for its timeout. A longer batch still shows as CPU time growing.
UNKNOWN_BATCH_MS = 1000.0


class Drain(Enum):
    WAIT = "wait"
    DRAINED = "drained"
    TIMED_OUT = "timed out"


@dataclass(frozen=True)
class DrainWatch:
    empty_needed_s: float
    idle_needed_s: float
    deadline: float
    empty_since: float | None = None
    idle_since: float | None = None
    last_cpu_s: float | None = None


def start_drain(now: float, max_batch_delay_ms: float, batch_ms: float,
                timeout_s: float) -> DrainWatch:
    delay = max_batch_delay_ms / 1000.0
    if not math.isfinite(batch_ms):
        batch_ms = UNKNOWN_BATCH_MS
    return DrainWatch(empty_needed_s=delay + 2 * batch_ms / 1000.0 + 0.2,
                      idle_needed_s=2 * delay + 0.1, deadline=now + timeout_s)


def observe_drain(w: DrainWatch, now: float, pending: int | None,
                  cpu_s: float) -> tuple[DrainWatch, Drain]:
    """One observation of the old version: its pending requests (None: TorchServe did not
    say, counted as busy) and its workers' CPU seconds so far."""
    empty_since = (w.empty_since if w.empty_since is not None else now) if pending == 0 else None
    idle_since = ((w.idle_since if w.idle_since is not None else now)
                  if cpu_s == w.last_cpu_s else None)
    w = replace(w, empty_since=empty_since, idle_since=idle_since, last_cpu_s=cpu_s)
    if (empty_since is not None and now - empty_since >= w.empty_needed_s
            and idle_since is not None and now - idle_since >= w.idle_needed_s):
        return w, Drain.DRAINED
    if now >= w.deadline:
        return w, Drain.TIMED_OUT
    return w, Drain.WAIT
