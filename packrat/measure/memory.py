"""How much memory processes really cost: PSS from /proc/PID/smaps_rollup.

RSS counts the pages that TorchServe's workers share (the torch libraries, a forked model) once
per worker and so overstates what one more worker costs; PSS divides each shared page among the
processes that map it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def pss_mb(pids: Iterable[int]) -> float:
    """Summed PSS of the processes in MB (processes that are gone count 0)."""
    total_kb = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total_kb += int(line.split()[1])
                break
    return total_kb / 1024.0


def total_memory_mb() -> float:
    import psutil

    return psutil.virtual_memory().total / (1024.0 * 1024.0)


def default_standby_memory_mb() -> int:
    """`--standby-memory`'s default: a quarter of the machine's memory."""
    return round(0.25 * total_memory_mb())
