"""The run directory: what the controller, the handlers and the other commands share.

    RUN/controller.lock            flock held by the running controller; holds its pid
    RUN/state.json                 per model: live version, estimate, auto/manual, counters
    RUN/packrat.log                the controller's log
    RUN/torchserve/                TorchServe's working directory (config, key_file.json, logs)
    RUN/model_store/NAME-vN/       one unpacked archive per served version, and in it
          .packrat-slots/K.lock    flock held by the worker that claimed slot K; holds its pid
    RUN/plans/NAME/N.json          the plan version N serves: threads, batch size, cores per slot
    RUN/requests/ID.json           `packrat reconfigure` asks; ID.result.json is the answer
    RUN/switches.jsonl             every switch: when, how long to the new default, warm or cold
    RUN/attached.json              with `serve --attach`: the user's TorchServe (its URLs, key
                                   file and model store, which then holds the version directories)

Everything is created readable by the user only. A worker finds its plan and slot directory in
its version directory (packrat-worker.json, written by packrat.serving.versions).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from pathlib import Path

from packrat.core.plan import ServedPlan
from packrat.errors import PackratError
from packrat.jsonfile import read_json, write_json
from packrat.torchserve import TorchServeClient, load_settings
from packrat.torchserve.attach import AttachedServer

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def default_run_dir() -> Path:
    """$XDG_RUNTIME_DIR/packrat, else ~/.local/state/packrat/run."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "packrat"
    return Path.home() / ".local" / "state" / "packrat" / "run"


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):  # fullmatch: no trailing newline
        raise PackratError(
            f"invalid model name {name!r}: use letters, digits, '_' and '-' (at most 64, no "
            "slashes or dots)"
        )
    return name


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path).absolute()
        # The user's TorchServe this run directory manages (`serve --attach`), else None: the
        # one Packrat starts in RUN/torchserve.
        self.attached: AttachedServer | None = None
        data = read_json(self.attach_file, None)
        if data is not None:
            try:
                self.attached = AttachedServer.from_json(data)
            except (KeyError, TypeError, ValueError, PackratError) as e:
                raise PackratError(f"{self.attach_file} is unreadable ({e}); remove it and "
                                   "serve again") from None

    # -- layout ----------------------------------------------------------------------------
    @property
    def torchserve(self) -> Path:
        return self.path / "torchserve"

    @property
    def model_store(self) -> Path:
        return self.attached.model_store if self.attached else self.path / "model_store"

    @property
    def attach_file(self) -> Path:
        return self.path / "attached.json"

    def set_attached(self, server: AttachedServer | None) -> None:
        """Manage the user's TorchServe from now on (None: one Packrat starts)."""
        self.attached = server
        if server is None:
            self.attach_file.unlink(missing_ok=True)
            self.model_store.mkdir(parents=True, exist_ok=True)
        else:
            write_json(self.attach_file, server.to_json())

    def client(self) -> TorchServeClient:
        """A client of the TorchServe this run directory manages."""
        if self.attached is not None:
            return self.attached.client()
        return TorchServeClient(load_settings(self.torchserve))

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def log_file(self) -> Path:
        return self.path / "packrat.log"

    @property
    def requests(self) -> Path:
        return self.path / "requests"

    @property
    def switch_log(self) -> Path:
        """One JSON line per finished switch (for benchmarks and post-mortems)."""
        return self.path / "switches.jsonl"

    def log_switch(self, record: dict) -> None:
        try:
            with open(self.switch_log, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk must not stop the controller
            logging.getLogger(__name__).warning("cannot write %s: %s", self.switch_log, e)

    def plan_file(self, model: str, version: str) -> Path:
        return self.path / "plans" / model / f"{version}.json"

    def slot_dir(self, model: str, version: str) -> Path:
        # in the version's directory: it lives and goes with the version, even after the
        # controller and its run directory (a TorchServe Packrat attached to keeps serving)
        return self.version_dir(model, version) / ".packrat-slots"

    def version_dir(self, model: str, version: str) -> Path:
        return self.model_store / f"{model}-v{version}"

    def create(self) -> "RunDir":
        old = os.umask(0o077)  # files of the run directory are the user's alone
        try:
            for d in (self.path, self.torchserve, self.requests):
                d.mkdir(parents=True, exist_ok=True)
            if self.attached is None:
                self.model_store.mkdir(exist_ok=True)
            os.chmod(self.path, 0o700)
        finally:
            os.umask(old)
        return self

    # -- plans -----------------------------------------------------------------------------
    def write_plan(self, plan: ServedPlan) -> None:
        write_json(self.plan_file(plan.model, plan.version), plan.to_json())

    def read_plan(self, model: str, version: str) -> ServedPlan | None:
        try:
            return ServedPlan.from_json(json.loads(self.plan_file(model, version).read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def slot_pids(self, model: str, version: str) -> dict[int, int]:
        """slot -> pid of the live worker that claimed it. Read without locking, so that a
        look never makes a starting worker miss a free slot."""
        out = {}
        for f in sorted(self.slot_dir(model, version).glob("*.lock")):
            try:
                pid = int(f.read_text().strip() or 0)
            except (OSError, ValueError):
                continue
            if pid and _is_alive(pid):
                out[int(f.stem)] = pid
        return out


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has no affinity left to report
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


class ControllerLock:
    """flock on RUN/controller.lock: one controller per run directory."""

    def __init__(self, run: RunDir) -> None:
        self.path = run.path / "controller.lock"
        self.fh = None

    def acquire(self) -> None:
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "?"
            fh.close()
            raise PackratError(
                f"another packrat controller (pid {pid}) runs on {self.path.parent}; stop it "
                f"with `packrat stop --run-dir {self.path.parent}` or use another --run-dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self.fh = fh

    def release(self) -> None:
        if self.fh:
            self.fh.close()
            self.fh = None


def controller_pid(run: RunDir) -> int | None:
    """pid of the controller holding the lock, None if none runs."""
    path = run.path / "controller.lock"
    if not path.is_file():
        return None
    with open(path, "r") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            text = fh.read().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fh, fcntl.LOCK_UN)
        return None
