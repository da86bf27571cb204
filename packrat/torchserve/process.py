"""Starting, finding and stopping a TorchServe server, and the processes that make it up."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from packrat.errors import TorchServeError
from packrat.torchserve.auth import read_key_file
from packrat.torchserve.client import TorchServeClient
from packrat.torchserve.config import (
    CONFIG_FILE,
    KEY_FILE,
    LAUNCHER_LOG,
    MAX_SOCKET_PATH,
    ServerSettings,
    load_settings,
    read_state,
    render_config,
    write_state,
)
from packrat.torchserve.endpoints import ApiAddress
from packrat.torchserve.java import find_java

logger = logging.getLogger(__name__)

FRONTEND_CLASS = "org.pytorch.serve.ModelServer"
WORKER_SCRIPT = "model_service_worker.py"

# Launchers started by this process, by frontend pid, so that stop_server can reap them.
_LAUNCHERS: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class ServerProcess:
    frontend_pid: int  # the java ModelServer
    workdir: Path


def torchserve_command() -> str | None:
    """The torchserve launcher of this interpreter's environment, else the one on PATH."""
    local = Path(sys.executable).parent / "torchserve"
    return str(local) if local.is_file() else shutil.which("torchserve")


def start_server(settings: ServerSettings, timeout_s: float = 90) -> ServerProcess:
    """Start TorchServe for settings and return once /ping answers Healthy.

    On failure no process of it is left and TorchServeError carries the tail of its logs.
    """
    settings = settings.resolved()
    workdir, store = settings.workdir, settings.model_store
    running = find_server(workdir)
    if running is not None:
        raise TorchServeError(
            f"a TorchServe already runs for {workdir} (frontend pid {running.frontend_pid}); "
            "stop it first or use another working directory"
        )
    if not store.is_dir():
        raise TorchServeError(f"model store {store} is not a directory; create it first")
    command = torchserve_command()
    if command is None:
        raise TorchServeError("torchserve not found; pip install torchserve==0.12.0")
    java = find_java()  # raises, saying what to install, without Java 17+
    if importlib.util.find_spec("yaml") is None:
        # The workers import yaml, which torchserve does not declare: without it every
        # worker dies while /ping still answers Healthy.
        raise TorchServeError(
            "pyyaml is not installed; TorchServe's workers need it: pip install pyyaml"
        )
    tmp = workdir / "tmp"
    socket_path = tmp / ".ts.sock.65535"
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise TorchServeError(
            f"working directory {workdir} is too long: TorchServe's worker sockets "
            f"({socket_path}) must fit in {MAX_SOCKET_PATH} bytes; use a shorter path"
        )
    for d in (workdir, tmp, workdir / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    # Left by an earlier server of this workdir: an old key would be read before the new
    # one is written, and the launcher refuses to start if the pid file names a live server.
    (workdir / KEY_FILE).unlink(missing_ok=True)
    (tmp / ".model_server.pid").unlink(missing_ok=True)
    config = render_config(settings)
    write_state(settings, frontend_pid=None)
    env = dict(os.environ)
    env.update(dict(settings.env))
    env.update(TMPDIR=str(tmp), TEMP=str(tmp), JAVA_HOME=str(java.home))
    env.pop("TS_CONFIG_FILE", None)  # the launcher would read it instead of --ts-config
    args = [
        command, "--start", "--foreground", "--ncs",
        "--ts-config", str(config), "--model-store", str(store),
    ]  # fmt: skip
    logger.info(
        "starting TorchServe in %s: inference %s, management %s, metrics %s, with %s", workdir,
        *(settings.address(api).url for api in ("inference", "management", "metrics")), java,
    )  # fmt: skip
    with open(workdir / "logs" / LAUNCHER_LOG, "wb") as log:
        launcher = subprocess.Popen(
            args,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = time.monotonic()
    client = TorchServeClient(settings, timeout_s=2)
    frontend: psutil.Process | None = None
    try:
        while True:
            if launcher.poll() is not None:
                raise TorchServeError(
                    f"TorchServe exited with status {launcher.returncode} while starting in "
                    f"{workdir}:{_log_tail(workdir)}"
                )
            if time.monotonic() - started > timeout_s:
                raise TorchServeError(
                    f"TorchServe in {workdir} did not answer /ping within {timeout_s} s:"
                    f"{_log_tail(workdir)}"
                )
            if frontend is None:
                frontend = _frontend_child(launcher.pid, workdir)
            if frontend is not None and _healthy(client):
                break
            time.sleep(0.1)
        write_state(settings, frontend_pid=frontend.pid)
    except BaseException:
        _kill_everything(workdir, launcher)
        raise
    _LAUNCHERS[frontend.pid] = launcher
    logger.info(
        "TorchServe up in %.1f s (frontend pid %d)", time.monotonic() - started, frontend.pid
    )
    return ServerProcess(frontend_pid=frontend.pid, workdir=workdir)


def _healthy(client: TorchServeClient) -> bool:
    if client.key_file is not None and read_key_file(client.key_file) is None:
        return False  # not written yet (or caught half-written)
    try:
        if not client.ping():
            return False
    except TorchServeError:
        return False
    # The frontend binds inference first: /ping can answer before the management and metrics
    # listeners are up (0.5-1 s later with a keystore to load, measured).
    endpoints = client.endpoints
    return all(_listening(a) for a in (endpoints.management, endpoints.metrics))


def _listening(address: ApiAddress) -> bool:
    try:
        with socket.create_connection((address.connect_host, address.port), timeout=1):
            return True
    except OSError:
        return False


def find_server(workdir: Path) -> ServerProcess | None:
    """The live TorchServe frontend started for workdir, else None.

    A frontend counts only if it is alive, runs org.pytorch.serve.ModelServer with
    workdir/config.properties, and its working directory is workdir (so a reused pid or
    another server is never taken for this one).
    """
    workdir = Path(workdir).expanduser().resolve()
    try:
        pid = read_state(workdir).get("frontend_pid")
    except TorchServeError:
        pid = None
    if isinstance(pid, int):
        try:
            if _is_frontend_of(psutil.Process(pid), workdir):
                return ServerProcess(frontend_pid=pid, workdir=workdir)
        except psutil.Error:
            pass
    for p in psutil.process_iter():
        if _is_frontend_of(p, workdir):
            return ServerProcess(frontend_pid=p.pid, workdir=workdir)
    return None


def is_running(proc: ServerProcess) -> bool:
    """True while the frontend of proc is alive (a cheap check of one pid)."""
    try:
        return _is_frontend_of(psutil.Process(proc.frontend_pid), Path(proc.workdir))
    except psutil.Error:
        return False


def server_processes(workdir: Path) -> list[int]:
    """Pids of every live process of the server of workdir: the torchserve launcher, the
    java frontend and the Python workers (zombies are left out)."""
    workdir = Path(workdir).expanduser().resolve()
    return sorted(p.pid for p in _server_psprocesses(workdir))


def stop_server(proc: ServerProcess, timeout_s: float = 30) -> None:
    """Stop the server: SIGTERM the frontend (it stops its workers), wait up to timeout_s,
    SIGKILL whatever is left, workers included, and check that nothing of it remains.

    Safe to call twice; it never touches another server's processes.
    """
    workdir = Path(proc.workdir).expanduser().resolve()
    launcher = _LAUNCHERS.pop(proc.frontend_pid, None)
    procs = {p.pid: p for p in _server_psprocesses(workdir)}
    try:
        p = psutil.Process(proc.frontend_pid)
        if _is_frontend_of(p, workdir):
            procs.setdefault(p.pid, p)
            for child in p.children(recursive=True):
                procs.setdefault(child.pid, child)
    except psutil.Error:
        pass
    logger.info("stopping TorchServe in %s (pids %s)", workdir, sorted(procs))
    frontends = [p for p in procs.values() if _is_frontend_of(p, workdir)]
    for p in frontends or procs.values():
        _signal(p, signal.SIGTERM)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout_s)
    if alive:
        logger.warning("SIGKILL to %s: still running %s s after SIGTERM", alive, timeout_s)
    _kill_everything(workdir, launcher, already=alive)
    left = server_processes(workdir)
    if left:
        raise TorchServeError(
            f"processes {left} of the TorchServe in {workdir} survived SIGKILL; "
            "check them with ps and end them by pid"
        )
    (workdir / KEY_FILE).unlink(missing_ok=True)
    try:
        settings = load_settings(workdir)
    except TorchServeError:
        return
    write_state(settings, frontend_pid=None)


def _kill_everything(
    workdir: Path, launcher: subprocess.Popen | None, already: Iterable[psutil.Process] = ()
) -> None:
    """SIGKILL every process of the server of workdir until none is left (a worker may be
    restarted by a dying frontend), then reap our launcher."""
    deadline = time.monotonic() + 10
    targets = list(already)
    if launcher is not None and launcher.poll() is None:
        try:
            targets.append(psutil.Process(launcher.pid))
        except psutil.Error:
            pass
    while True:
        targets += _server_psprocesses(workdir)
        if not targets:
            break
        for p in targets:
            _signal(p, signal.SIGKILL)
        psutil.wait_procs(targets, timeout=2)
        targets = []
        if time.monotonic() > deadline:
            break
    if launcher is not None:
        try:
            launcher.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.warning("torchserve launcher pid %d did not exit", launcher.pid)


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def _frontend_child(launcher_pid: int, workdir: Path) -> psutil.Process | None:
    try:
        children = psutil.Process(launcher_pid).children()
    except psutil.Error:
        return None
    for p in children:
        if _is_frontend_of(p, workdir):
            return p
    return None


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        if p.status() == psutil.STATUS_ZOMBIE:
            return []
        return p.cmdline()
    except psutil.Error:
        return []


def _follows(cmdline: list[str], flag: str, predicate: Any) -> bool:
    return any(a == flag and predicate(b) for a, b in itertools.pairwise(cmdline))


def _is_frontend_of(p: psutil.Process, workdir: Path) -> bool:
    cmd = _cmdline(p)
    if FRONTEND_CLASS not in cmd:
        return False
    config = str(workdir / CONFIG_FILE)
    if not _follows(cmd, "-f", lambda a: a == config):
        return False
    try:
        return Path(p.cwd()) == workdir
    except psutil.Error:
        return False


def _server_psprocesses(workdir: Path) -> list[psutil.Process]:
    config = str(workdir / CONFIG_FILE)
    sockets = str(workdir / "tmp") + os.sep
    found = []
    for p in psutil.process_iter():
        cmd = _cmdline(p)
        if not cmd:
            continue
        if FRONTEND_CLASS in cmd:
            mine = _follows(cmd, "-f", lambda a: a == config)
        elif any(a.endswith(WORKER_SCRIPT) for a in cmd[:3]):
            mine = _follows(cmd, "--sock-name", lambda a: a.startswith(sockets))
        elif any(Path(a).name == "torchserve" for a in cmd[:2]):
            mine = _follows(cmd, "--ts-config", lambda a: a == config)
        else:
            mine = False
        if mine:
            found.append(p)
    return found


def _log_tail(workdir: Path, chars: int = 2000) -> str:
    """' <first error line>' and then the tail of each log, for a failed start."""
    text = first_error = ""
    for name in (f"logs/{LAUNCHER_LOG}", "logs/ts_log.log", "logs/model_log.log"):
        p = workdir / name
        if not p.is_file():
            continue
        content = p.read_text(errors="replace")
        if not first_error:
            first_error = next(
                (line.strip() for line in content.splitlines() if _ERROR_LINE.search(line)), ""
            )
        tail = content[-chars:].strip()
        if tail:
            text += f"\n--- {p}\n{tail}"
    return f" {first_error}{text}" if text else " (no log output)"


_ERROR_LINE = re.compile(r"(Exception|Error)\b.*:")
