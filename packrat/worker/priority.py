"""Whether a process may take a thread from idle CPU priority back to normal. Standard
library only: a background version's sitecustomize.py (idle_start) imports it before torch."""

from __future__ import annotations

import os
import threading


def may_raise_back() -> bool:
    """Root, CAP_SYS_NICE or a high enough RLIMIT_NICE allow it; tried on a throwaway thread
    (a thread's policy is its own), so the kernel's own rule answers."""
    allowed = []

    def trial() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            allowed.append(True)
        except (AttributeError, OSError):
            pass

    thread = threading.Thread(target=trial)
    thread.start()
    thread.join()
    return bool(allowed)
