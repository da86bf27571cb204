"""Slots: worker K of a version claims lock file K of the version's slot directory and keeps it
while it lives; the plan says which cores slot K owns."""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from packrat.core.plan import ServedPlan
from packrat.errors import ArchiveError
from packrat.model.spec import WORKER_FILE


@dataclass(frozen=True)
class WorkerConfig:
    """What a version directory tells its workers (WORKER_FILE): the plan, where its slot
    locks are, the archive's own handler that Packrat's entry point wraps, and whether it is
    loaded ahead of need (background: its load and warm-up run at idle CPU priority)."""

    plan: ServedPlan
    slot_dir: Path
    handler: str
    background: bool = False

    def to_json(self) -> dict:
        return {"plan": self.plan.to_json(), "slot_dir": str(self.slot_dir),
                "handler": self.handler, "background": self.background}


def read_worker_config(model_dir: Path) -> WorkerConfig:
    """The worker config of the version in model_dir."""
    path = Path(model_dir) / WORKER_FILE
    try:
        data = json.loads(path.read_text())
        return WorkerConfig(ServedPlan.from_json(data["plan"]), Path(data["slot_dir"]),
                            str(data["handler"]), bool(data.get("background", False)))
    except FileNotFoundError:
        raise ArchiveError(f"{path} is missing: Packrat's entry point serves only version "
                           "directories Packrat made") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArchiveError(f"{path} is not a Packrat worker config ({e!r})") from None


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


# A worker that fails to start writes why here: Packrat registers versions without waiting
# (a synchronous register holds one of TorchServe's request threads until the workers are up,
# and every connection on that thread waits with it), so this is how it learns of a failure
# at once, where TorchServe itself would retry the worker with back-off.
FAILURE_FILE = "failed.txt"


def record_failure(slot_dir: Path, error: BaseException) -> None:
    """Note for Packrat why this worker could not start (best effort: the error itself still
    goes to TorchServe's log)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())[:500]
    try:
        d = Path(slot_dir)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{FAILURE_FILE}.{os.getpid()}"
        tmp.write_text(text)
        tmp.replace(d / FAILURE_FILE)
    except OSError:
        pass


def read_failure(slot_dir: Path) -> str | None:
    """Why a worker of the version failed to start, if one did."""
    try:
        return (Path(slot_dir) / FAILURE_FILE).read_text().strip() or "unknown error"
    except OSError:
        return None
