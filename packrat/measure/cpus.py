"""The CPU cores this process may use, in the order Packrat hands them out, and pinning.

Usable cores are the process's affinity set, cut down to the cgroup CPU quota (a container
limited to 2 CPUs may still see 64 in its affinity mask). Cores are handed out one logical CPU
per physical core first, so that t threads land on t physical cores before SMT siblings are used.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by the cgroup quota (v2 `cpu.max` or v1 cfs files), None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0:
            return max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        pass
    return None


def _physical_key(cpu: int) -> tuple[int, int, int]:
    """(package, core, cpu) from sysfs; missing topology files fall back to the cpu number."""
    base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        package = int((base / "physical_package_id").read_text())
        core = int((base / "core_id").read_text())
    except (OSError, ValueError):
        return (0, cpu, cpu)
    return (package, core, cpu)


def usable_cores() -> tuple[int, ...]:
    """The logical CPUs this process may run on, physical cores first, then SMT siblings."""
    allowed = sorted(os.sched_getaffinity(0))
    seen: set[tuple[int, int]] = set()
    first, siblings = [], []
    for cpu in sorted(allowed, key=_physical_key):
        package, core, _ = _physical_key(cpu)
        (siblings if (package, core) in seen else first).append(cpu)
        seen.add((package, core))
    ordered = first + siblings
    limit = _cgroup_cpu_limit()
    if limit is not None:
        ordered = ordered[:limit]
    return tuple(ordered)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pin_process(cores: tuple[int, ...] | list[int]) -> None:
    """Pin every thread of this process to `cores`.

    Threads started later inherit the mask; threads already running (a library's pool) are
    pinned one by one through /proc/self/task, since sched_setaffinity(0) moves only the caller.
    """
    cores = set(cores)
    os.sched_setaffinity(0, cores)
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except (ProcessLookupError, PermissionError):
            pass  # the thread ended meanwhile
