"""Slots: worker K of a version claims lock file K of the version's slot directory and keeps it
while it lives; the plan says which cores slot K owns."""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from packrat.core.plan import ServedPlan
from packrat.model.spec import WORKER_FILE


@dataclass(frozen=True)
class WorkerConfig:
    """What a version directory tells its workers (WORKER_FILE)."""

    plan: ServedPlan
    slot_dir: Path


def read_worker_config(model_dir: Path) -> WorkerConfig | None:
    """The plan and slot directory of the version in model_dir; None for an unpinned version."""
    try:
        data = json.loads((Path(model_dir) / WORKER_FILE).read_text())
    except FileNotFoundError:
        return None
    return WorkerConfig(ServedPlan.from_json(data["plan"]), Path(data["slot_dir"]))


def claim_slot(slot_dir: Path, slots: int):
    """Take the first free slot of a version: returns (index, open file) or None if all are
    taken. The flock is held as long as the file stays open, that is until the worker dies, so
    a restarted worker finds its predecessor's slot free."""
    d = Path(slot_dir)
    d.mkdir(parents=True, exist_ok=True)
    for k in range(slots):
        fh = open(d / f"{k}.lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        return k, fh
    return None
