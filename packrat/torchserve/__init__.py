"""The one module of Packrat that knows TorchServe 0.12: its URLs, ports, token and timeouts.

Server lifecycle: `start_server(settings)` renders its templates into `settings.workdir`, launches
`torchserve --start --foreground --ncs` there and waits for `/ping`; `find_server(workdir)`
and `load_settings(workdir)` let another process reconnect; `stop_server` stops it and
verifies that nothing of it is left. `TorchServeClient` wraps the inference, management and
metrics APIs. Every failure is a `TorchServeError` naming the method, URL, status and
TorchServe's message.

Facts measured on TorchServe 0.12.0 (2-core VM, small-cnn archives, some with a busy-loop
model.py to make batches slow; tests/test_torchserve_client.py checks most of them)

Isolation and processes
- TMPDIR and TEMP point at `workdir/tmp`: the launcher's pid file
  (`tempfile.gettempdir()/.model_server.pid`), `java.io.tmpdir` and the workers' Unix sockets
  (`workdir/tmp/.ts.sock.9000`, 9001, ...) live there, so servers do not collide. A socket
  path holds at most 107 bytes, which bounds the length of `workdir`.
- Processes: the `torchserve` Python launcher (it waits for java), the java frontend
  (`org.pytorch.serve.ModelServer -f workdir/config.properties`, cwd `workdir`) and one
  Python worker per TorchServe worker (`model_service_worker.py --sock-name
  workdir/tmp/.ts.sock.N`, cwd = the model's directory). SIGTERM to the frontend stops its
  workers. Never `torchserve --stop`: it stops whichever server the pid file of the current
  TMPDIR names.
- Workers inherit the frontend's environment: `ServerSettings.env` (e.g. PACKRAT_RUN_DIR)
  is in every worker's /proc/PID/environ, so the handler sees it.
- Start to a Healthy /ping: about 1 s; registering a small-cnn version with
  synchronous=true: 1.5 s (1 worker) to 1.6 s (2 workers); a graceful stop (SIGTERM):
  0.5 s with 2 workers, 2.4 s with 4.

Token authorization (on unless ServerSettings.token_auth is False)
- The frontend writes `key_file.json` into its working directory (`workdir`):
  {"management": {"key", "expiration time"}, "inference": {...}, "API": {"key"}}. It does not
  delete it when stopped by a signal; `stop_server` does.
- Management calls need the management key; inference calls and /ping the inference key;
  the metrics port none. A missing, wrong or expired key is answered HTTP 400 (not 401)
  {"type": "InvalidKeyException", "message": "Token Authorization failed. ..."}.
- Keys expire `token_expiration_min` (default 60) minutes after they were made; an expired
  key stays in key_file.json. `POST /token?type=management|inference` on the management
  port with the API key (which does not expire) answers 200 with an empty body, writes a
  new key with a new expiry to key_file.json and invalidates the old key at once.
- The client therefore, on a refused key, re-reads key_file.json; if the file still holds
  the refused key (it expired), it gets a new one from /token with the API key; then it
  retries once (measured with token_expiration_min=1: calls after 65 s succeed).

Per-version directories and versions
- A directory in the model store (an unpacked .mar whose MAR-INF/MANIFEST.json
  "modelVersion" is rewritten) registers with `url=<dirname>` and is served in place (the
  worker's cwd is that directory; Python writes __pycache__ there). Files hard-linked from
  another directory (weights.pt, model.py, the handler) work: nothing writes to them. The
  manifest must be a new file, not written through a link. `make_version_dir` does this.
- Two versions of one name run side by side, each with its own batch_size, max_batch_delay
  and workers. The first registered version is the default; `/predictions/NAME` goes to
  the default, `/predictions/NAME/VERSION` to that version; `PUT
  /models/NAME/VERSION/set-default` redirects new requests at once, while requests already
  queued on the old version stay there and are served by its workers.
- `GET /models/NAME/all` lists every version without saying which is the default;
  `GET /models/NAME` describes the default only: `versions()` asks both.
- `synchronous=true` registration answers 200 once every initial worker is READY;
  `synchronous=false` answers 202 at once with the workers still "UNLOADING".
- Errors: an unknown url is 404 "Model not found at: URL"; a version registered twice 409;
  set-default to an unknown version 404; DELETE of the default version while others exist
  403 "Cannot remove default version for model NAME".
- Each version has its own queue of `job_queue_size` (default 100) requests; a request
  that finds it full is answered 503 at once. Bursts larger than that need
  ServerSettings.properties = (("job_queue_size", "..."),).

Pending requests and a safe DELETE
- `jobQueueStatus.pendingRequests` (in GET /models/NAME/VERSION and /all) counts the
  requests waiting in the version's queue. A batch that a worker has taken (still being
  collected for up to max_batch_delay, or running) has left the queue and is NOT counted,
  and the worker's status stays READY while it runs. Measured: 5 requests, batch_size 2,
  1 s per batch: pending 3, 1, then 0 at t = 2.07 s while the last request ran until
  t = 3.27 s.
- DELETE of a busy non-default version answers 200 in 30 ms and kills its workers: the
  running request got 500 "Worker died." and the 4 queued ones never got an answer (their
  clients timed out after 20 s). Hence: wait until the old version is drained.
- Metrics cannot tell: requests to /predictions/NAME are counted under
  model_version="default", whatever version serves them, and ts_inference_requests_total
  counts arrivals, not completions.
- Rule (RECOMMENDED_DRAIN_RULE): after set-default, poll versions() every 50-100 ms; the old
  version is drained once pending_requests has read 0 continuously for longer than
  max_batch_delay + 2 x (profiled latency of a full batch) + 0.2 s, and (same machine)
  `worker_cpu_seconds` of its workers has not grown for the last 2 x max_batch_delay +
  0.1 s. Measured under a closed-loop load of 6 clients (1 worker, batch 2, 0.3 s per
  batch, 50 ms delay): the queue emptied 0.3-0.45 s after the switch, the last old
  response came 0.3-0.45 s after pending first read 0 (the 0.3 s batch ran slower beside
  the new version), the rule fired 0.2 s after that, and DELETE then lost nothing (0
  errors in 196 requests over two runs).

Metrics (metrics_mode=prometheus, metrics port, no token)
- `ts_inference_requests_total`, `ts_inference_latency_microseconds` and
  `ts_queue_latency_microseconds` exist, typed counter, labels model_name, model_version,
  hostname; they are cumulative. requests_total grows when a request arrives (503s
  included); the latency counters grow when a response is sent successfully, by that
  request's time from arrival to response (queue included) and from arrival to being
  taken by a worker. So Δlatency_sum / Δt is the mean number of requests in TorchServe
  (Little's law), summed over every version label of a model, "default" included.
- A request to /predictions/NAME is counted under model_version="default"; one to
  /predictions/NAME/VERSION under VERSION. A series appears with its first request and
  stays after its version is deleted (until the server restarts).
- Host metrics (Requests2XX, QueueTime, ...) carry no model labels; `metrics()` leaves
  them out.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import requests

from packrat.errors import ArchiveError, TorchServeError
from packrat.model.archive import extract_archive
from packrat.model.spec import MANIFEST_FILE

logger = logging.getLogger(__name__)

# Package data: the config.properties and quiet log4j2 config every server starts from.
TEMPLATES = resources.files("packrat.torchserve") / "templates"
CONFIG_TEMPLATE = TEMPLATES / "config.properties.template"
LOG4J_TEMPLATE = TEMPLATES / "log4j2.xml"

CONFIG_FILE = "config.properties"
LOG4J_FILE = "log4j2.xml"
SERVER_FILE = "server.json"
KEY_FILE = "key_file.json"
LAUNCHER_LOG = "launcher.log"
FRONTEND_CLASS = "org.pytorch.serve.ModelServer"
WORKER_SCRIPT = "model_service_worker.py"
# sockaddr_un.sun_path holds 108 bytes with the trailing NUL.
MAX_SOCKET_PATH = 107

RECOMMENDED_DRAIN_RULE = (
    "after set-default, poll versions() every 50-100 ms; the old version is drained once "
    "pending_requests has read 0 continuously for longer than max_batch_delay + "
    "2 x (profiled latency of a full batch) + 0.2 s and worker_cpu_seconds of its workers "
    "has not grown for the last 2 x max_batch_delay + 0.1 s; then DELETE it"
)

# Launchers started by this process, by frontend pid, so that stop_server can reap them.
_LAUNCHERS: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class Ports:
    inference: int
    management: int
    metrics: int
    grpc_inference: int
    grpc_management: int

    def __post_init__(self) -> None:
        values = self.as_dict()
        for name, port in values.items():
            if not isinstance(port, int) or not 0 < port < 65536:
                raise TorchServeError(f"port {name}={port!r} must be an integer in 1..65535")
        if len(set(values.values())) != len(values):
            raise TorchServeError(f"ports must be distinct, got {values}")

    def as_dict(self) -> dict[str, int]:
        return {
            "inference": self.inference,
            "management": self.management,
            "metrics": self.metrics,
            "grpc_inference": self.grpc_inference,
            "grpc_management": self.grpc_management,
        }

    @staticmethod
    def free(host: str = "127.0.0.1") -> Ports:
        """Five distinct ports that are free on host now (held open together so they differ).

        Another process may take one before TorchServe binds it; start_server then fails
        with TorchServe's bind error, and a retry with fresh ports works.
        """
        socks: list[socket.socket] = []
        try:
            for _ in range(5):
                s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                s.bind((host, 0))
                socks.append(s)
            return Ports(*(s.getsockname()[1] for s in socks))
        finally:
            for s in socks:
                s.close()


@dataclass(frozen=True)
class ServerSettings:
    workdir: Path  # config.properties, log4j2.xml, logs/, tmp/, key_file.json, server.json
    model_store: Path
    ports: Ports
    host: str = "127.0.0.1"  # every listener binds here
    # Extra environment for the frontend and so for its workers (e.g. PACKRAT_RUN_DIR).
    env: tuple[tuple[str, str], ...] = ()
    token_auth: bool = True
    # Extra config.properties entries, set after the template (e.g. job_queue_size).
    properties: tuple[tuple[str, str], ...] = ()

    def resolved(self) -> ServerSettings:
        return replace(
            self,
            workdir=Path(self.workdir).expanduser().resolve(),
            model_store=Path(self.model_store).expanduser().resolve(),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "model_store": str(self.model_store),
            "ports": self.ports.as_dict(),
            "host": self.host,
            "env": [list(kv) for kv in self.env],
            "token_auth": self.token_auth,
            "properties": [list(kv) for kv in self.properties],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> ServerSettings:
        return ServerSettings(
            workdir=Path(data["workdir"]),
            model_store=Path(data["model_store"]),
            ports=Ports(**data["ports"]),
            host=str(data["host"]),
            env=tuple((str(k), str(v)) for k, v in data.get("env", ())),
            token_auth=bool(data["token_auth"]),
            properties=tuple((str(k), str(v)) for k, v in data.get("properties", ())),
        )


@dataclass(frozen=True)
class ServerProcess:
    frontend_pid: int  # the java ModelServer
    workdir: Path


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    pid: int | None
    status: str  # as TorchServe reports it: READY, or UNLOADING while starting or stopping


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    is_default: bool
    batch_size: int
    max_batch_delay_ms: int
    min_workers: int
    max_workers: int
    workers: tuple[WorkerInfo, ...]
    # Requests waiting in this version's queue (jobQueueStatus.pendingRequests); a batch
    # that a worker is running is not counted. None if TorchServe did not say.
    pending_requests: int | None
    url: str = ""  # what it was registered from (the directory name in the model store)


# ---------------------------------------------------------------------------------------
# Starting, finding and stopping a server


def torchserve_command() -> str | None:
    """The torchserve launcher of this interpreter's environment, else the one on PATH."""
    local = Path(sys.executable).parent / "torchserve"
    return str(local) if local.is_file() else shutil.which("torchserve")


def _java_command() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        java = Path(java_home) / "bin" / "java"
        return str(java) if java.is_file() else None
    return shutil.which("java")


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
    if _java_command() is None:
        raise TorchServeError("java not found; TorchServe 0.12 needs Java 17 on PATH or JAVA_HOME")
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
    config = _render_config(settings)
    _write_state(settings, frontend_pid=None)
    env = dict(os.environ)
    env.update(dict(settings.env))
    env.update(TMPDIR=str(tmp), TEMP=str(tmp))
    args = [
        command, "--start", "--foreground", "--ncs",
        "--ts-config", str(config), "--model-store", str(store),
    ]  # fmt: skip
    logger.info("starting TorchServe in %s on %s ports %s", workdir, settings.host, settings.ports)
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
        _write_state(settings, frontend_pid=frontend.pid)
    except BaseException:
        _kill_everything(workdir, launcher)
        raise
    _LAUNCHERS[frontend.pid] = launcher
    logger.info(
        "TorchServe up in %.1f s (frontend pid %d)", time.monotonic() - started, frontend.pid
    )
    return ServerProcess(frontend_pid=frontend.pid, workdir=workdir)


def _healthy(client: TorchServeClient) -> bool:
    if client.settings.token_auth and _read_key_file(client.settings.workdir / KEY_FILE) is None:
        return False  # not written yet (or caught half-written)
    try:
        return client.ping()
    except TorchServeError:
        return False


def load_settings(workdir: Path) -> ServerSettings:
    """The settings a server of workdir was started with (from workdir/server.json)."""
    data = _read_state(Path(workdir).expanduser().resolve())
    try:
        return ServerSettings.from_json(data)
    except (KeyError, TypeError, ValueError) as e:
        raise TorchServeError(
            f"{Path(workdir) / SERVER_FILE} is not a Packrat server state file ({e!r}); "
            "start the server again"
        ) from None


def find_server(workdir: Path) -> ServerProcess | None:
    """The live TorchServe frontend started for workdir, else None.

    A frontend counts only if it is alive, runs org.pytorch.serve.ModelServer with
    workdir/config.properties, and its working directory is workdir (so a reused pid or
    another server is never taken for this one).
    """
    workdir = Path(workdir).expanduser().resolve()
    try:
        pid = _read_state(workdir).get("frontend_pid")
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
    _write_state(settings, frontend_pid=None)


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
    return any(a == flag and predicate(b) for a, b in zip(cmdline, cmdline[1:]))


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


def _render_config(settings: ServerSettings) -> Path:
    workdir = settings.workdir
    log_dir = workdir / "logs"
    log4j = workdir / LOG4J_FILE
    try:
        log4j.write_text(LOG4J_TEMPLATE.read_text().format(log_dir=log_dir))
        text = CONFIG_TEMPLATE.read_text().format(
            inference_port=settings.ports.inference,
            management_port=settings.ports.management,
            metrics_port=settings.ports.metrics,
            grpc_inference_port=settings.ports.grpc_inference,
            grpc_management_port=settings.ports.grpc_management,
            model_store=settings.model_store,
            allowed_urls=_store_url_pattern(settings.model_store),
            log4j_config=log4j,
        )
    except (OSError, KeyError, IndexError, ValueError) as e:
        raise TorchServeError(
            f"cannot render the TorchServe config from {TEMPLATES}: {e!r}"
        ) from None
    overrides: dict[str, str] = {}
    if settings.host != "127.0.0.1":
        host = _url_host(settings.host)
        overrides["inference_address"] = f"http://{host}:{settings.ports.inference}"
        overrides["management_address"] = f"http://{host}:{settings.ports.management}"
        overrides["metrics_address"] = f"http://{host}:{settings.ports.metrics}"
        overrides["grpc_inference_address"] = settings.host
        overrides["grpc_management_address"] = settings.host
    if not settings.token_auth:
        overrides["disable_token_authorization"] = "true"
    overrides.update(dict(settings.properties))
    config = workdir / CONFIG_FILE
    config.write_text(_set_properties(text, overrides))
    return config


def _store_url_pattern(store: Path) -> str:
    """allowed_urls for file URLs inside the model store only, as a properties value: Java
    regex quoting \\Q..\\E (a backslash is doubled in a properties file); TorchServe splits
    the list on commas."""
    text = str(store)
    if "," in text or "\\" in text:
        raise TorchServeError(f"model store path {text!r} may not contain ',' or '\\'; use another")
    return f"file://\\\\Q{text}\\\\E/.*"


def _set_properties(text: str, overrides: dict[str, str]) -> str:
    """Replace `key=value` lines of a properties text; append the keys it lacks."""
    left = dict(overrides)
    lines = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and "=" in line and key in left:
            line = f"{key}={left.pop(key)}"
        lines.append(line)
    if left:
        lines.append("# Set by packrat.torchserve")
        lines += [f"{k}={v}" for k, v in left.items()]
    return "\n".join(lines) + "\n"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _write_state(settings: ServerSettings, frontend_pid: int | None) -> None:
    data = {**settings.to_json(), "frontend_pid": frontend_pid}
    path = settings.workdir / SERVER_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _read_state(workdir: Path) -> dict[str, Any]:
    path = workdir / SERVER_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TorchServeError(
            f"{path} not found: no Packrat TorchServe was started in {workdir}"
        ) from None
    except (OSError, ValueError) as e:
        raise TorchServeError(f"cannot read {path} ({e}); start the server again") from None
    if not isinstance(data, dict):
        raise TorchServeError(f"{path} is not a Packrat server state file; start the server again")
    return data


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


def worker_cpu_seconds(version: VersionInfo) -> float:
    """User plus system CPU seconds used so far by the live worker processes of a version.

    A worker running a batch of a CPU-bound model makes it grow; an idle one does not (see
    RECOMMENDED_DRAIN_RULE). Only meaningful on the machine that runs TorchServe.
    """
    total = 0.0
    for w in version.workers:
        if w.pid is None:
            continue
        try:
            t = psutil.Process(w.pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


# ---------------------------------------------------------------------------------------
# Per-version model directories


def make_version_dir(source: Path, model_store: Path, name: str, version: str) -> str:
    """Make model_store/NAME-vVERSION from a .mar or an unpacked archive directory, with
    MAR-INF/MANIFEST.json's modelVersion set to version; return the url to register.

    From a directory, files are hard-linked (copied where linking fails, e.g. across file
    systems) and the manifest is written anew, so the source's manifest is untouched.
    """
    model_store = Path(model_store)
    dirname = f"{name}-v{version}"
    dest = model_store / dirname
    if dest.exists():
        raise TorchServeError(
            f"{dest} already exists; unregister that version and remove the directory, "
            "or pick another version"
        )
    source = Path(source)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{dirname}-", dir=model_store))
        # mkdtemp's 0700 stays: only this user's TorchServe reads it
    except OSError as e:
        raise TorchServeError(f"cannot make {dest}: {e}; check the model store") from None
    try:
        if source.is_dir():
            extract_archive(source, staging)  # checks that it is an archive directory
            _link_tree(source, staging)
        else:
            extract_archive(source, staging)
        manifest_path = staging / MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text())
        manifest["model"]["modelVersion"] = str(version)
        manifest_path.unlink()  # may be a hard link to the source's manifest
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(staging, dest)
    except (ArchiveError, OSError, ValueError, KeyError, TypeError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise TorchServeError(f"cannot make {dest} from {source}: {e}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dirname


def _link_tree(source: Path, dest: Path) -> None:
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if "__pycache__" in rel.parts or path.suffix == ".pyc":
            continue
        target = dest / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


# ---------------------------------------------------------------------------------------
# Talking to a running server


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, str, str], float]:
    """(metric, model_name, model_version) -> value for every sample of a Prometheus text
    that has model_name and model_version labels; other samples are left out."""
    out: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        if "model_name" not in labels or "model_version" not in labels:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        key = (m.group(1), labels["model_name"], labels["model_version"])
        out[key] = out.get(key, 0.0) + value  # other labels (hostname) are summed over
    return out


def _read_key_file(path: Path) -> dict[str, str] | None:
    # {"management": {"key", "expiration time"}, "inference": {...}, "API": {"key"}}; the
    # frontend rewrites it in place, so a read can catch it empty or half-written.
    try:
        data = json.loads(path.read_text())
        return {
            "management": data["management"]["key"],
            "inference": data["inference"]["key"],
            "api": data["API"]["key"],
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_token_refusal(r: requests.Response) -> bool:
    if r.status_code == 401:
        return True
    if r.status_code != 400:
        return False
    text = r.text
    return "InvalidKeyException" in text or "Token Authori" in text or "Token Authenti" in text


def _message(r: requests.Response) -> str:
    try:
        data = r.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("message"):
        text = str(data["message"])
    else:
        text = r.text
    text = " ".join(text.split())
    return (text[:500] + "...") if len(text) > 500 else (text or r.reason or "no message")


class TorchServeClient:
    """Inference, management and metrics calls to one server; safe to share between threads.

    Management calls send the management key, inference calls and /ping the inference key
    (from workdir/key_file.json). A refused key is refreshed once (see the module docstring).
    """

    def __init__(self, settings: ServerSettings, timeout_s: float = 30):
        self.settings = settings.resolved()
        self.timeout_s = timeout_s
        host = _url_host(self.settings.host)
        ports = self.settings.ports
        self.inference_url = f"http://{host}:{ports.inference}"
        self.management_url = f"http://{host}:{ports.management}"
        self.metrics_url = f"http://{host}:{ports.metrics}"
        self.key_file = self.settings.workdir / KEY_FILE
        self._keys: dict[str, str] | None = None
        self._lock = threading.Lock()
        self._local = threading.local()

    # -- inference API

    def ping(self) -> bool:
        """True when TorchServe answers /ping Healthy; False when it is unhealthy or does not
        accept connections. A refused token raises TorchServeError."""
        try:
            r = self._request("inference", "GET", "/ping", timeout=self.timeout_s)
        except _Unreachable:
            return False
        except _NoKeys:
            if not self._accepts_connections(self.settings.ports.inference):
                return False  # stopped: that is why there is no key file
            raise
        if r.status_code != 200:
            return False
        try:
            return r.json().get("status") == "Healthy"
        except (ValueError, AttributeError):
            return False

    def predict(
        self, name: str, body: bytes, version: str | None = None, timeout_s: float = 60
    ) -> requests.Response:
        """POST body (JSON bytes) to /predictions/NAME[/VERSION]; the response as it came,
        whatever its status (a bad request is 400, a full queue 503)."""
        path = f"/predictions/{quote(name, safe='')}"
        if version is not None:
            path += f"/{quote(version, safe='')}"
        return self._checked(
            "inference",
            "POST",
            path,
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=timeout_s,
            ok=None,
        )

    def inference_key(self) -> str:
        """The inference key, for a client that sends its own requests (a load generator);
        it changes when a refused key is renewed, so such a client re-reads it on a 400."""
        return self._key("inference")

    # -- management API

    def register(
        self,
        url: str,
        *,
        model_name: str,
        batch_size: int,
        max_batch_delay_ms: int,
        initial_workers: int,
        response_timeout_s: int = 120,
        timeout_s: float = 300,
    ) -> None:
        """Register a version from url (a .mar or directory name in the model store) and
        return once its initial workers are READY (synchronous=true)."""
        params = {
            "url": url,
            "model_name": model_name,
            "batch_size": batch_size,
            "max_batch_delay": max_batch_delay_ms,
            "initial_workers": initial_workers,
            "synchronous": "true",
            "response_timeout": response_timeout_s,
        }
        self._checked("management", "POST", "/models", params=params, timeout=timeout_s)
        logger.info(
            "registered %s from %s: batch_size=%d max_batch_delay=%d ms workers=%d",
            model_name, url, batch_size, max_batch_delay_ms, initial_workers,
        )  # fmt: skip

    def set_default(self, name: str, version: str) -> None:
        path = f"/models/{quote(name, safe='')}/{quote(version, safe='')}/set-default"
        self._checked("management", "PUT", path)
        logger.info("default version of %s is now %s", name, version)

    def unregister(self, name: str, version: str) -> None:
        """DELETE a version; TorchServe refuses the default version while others exist."""
        path = f"/models/{quote(name, safe='')}/{quote(version, safe='')}"
        self._checked("management", "DELETE", path)
        logger.info("unregistered %s version %s", name, version)

    def versions(self, name: str) -> tuple[VersionInfo, ...]:
        """Every registered version of name with its workers and queue; () if none."""
        base = f"/models/{quote(name, safe='')}"
        r = self._checked("management", "GET", base, ok=(200, 404))
        if r.status_code == 404:
            return ()
        default = self._json(r)[0].get("modelVersion")
        r = self._checked("management", "GET", f"{base}/all", ok=(200, 404))
        if r.status_code == 404:
            return ()
        try:
            return tuple(_version_info(d, default) for d in self._json(r))
        except (KeyError, TypeError, ValueError) as e:
            raise TorchServeError(
                f"GET {r.url} -> unexpected answer ({e!r}): {r.text[:300]}"
            ) from None

    def models(self) -> tuple[str, ...]:
        """Names of every registered model (all pages of GET /models)."""
        names: list[str] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 100}
            if token:
                params["next_page_token"] = token
            data = self._json(self._checked("management", "GET", "/models", params=params))
            names += [m["modelName"] for m in data.get("models", [])]
            token = data.get("nextPageToken")
            if not token:
                return tuple(names)

    # -- metrics API

    def metrics(self) -> dict[tuple[str, str, str], float]:
        """(metric, model_name, model_version) -> value of every per-model metric; the
        counters are cumulative (see the module docstring for the "default" version label)."""
        r = self._checked("metrics", "GET", "/metrics")
        return parse_metrics(r.text)

    # -- plumbing

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.trust_env = False  # loopback only: never through a proxy from the environment
        return s

    def _base(self, api: str) -> str:
        return {
            "inference": self.inference_url,
            "management": self.management_url,
            "metrics": self.metrics_url,
        }[api]

    def _key(self, api: str) -> str:
        with self._lock:
            if self._keys is None:
                self._keys = self._load_keys()
            return self._keys[api]

    def _accepts_connections(self, port: int) -> bool:
        try:
            with socket.create_connection((self.settings.host, port), timeout=self.timeout_s):
                return True
        except OSError:
            return False

    def _load_keys(self) -> dict[str, str]:
        # The frontend may be rewriting the file: try a few times before giving up.
        for _ in range(10):
            keys = _read_key_file(self.key_file)
            if keys is not None:
                return keys
            if not self.key_file.exists():
                break
            time.sleep(0.05)
        raise _NoKeys(
            f"cannot read TorchServe's keys from {self.key_file}; is the server of "
            f"{self.settings.workdir} running? (start it, or set token_auth=False if it was "
            "started without token authorization)"
        )

    def _refresh_key(self, api: str, refused: str) -> None:
        """After `refused` was refused: take a newer key from key_file.json, else (the file
        holds the same key: it expired) have TorchServe make a new one with the API key."""
        with self._lock:
            keys = self._load_keys()
            if keys[api] == refused:
                logger.info("%s key refused, probably expired: asking for a new one", api)
                url = f"{self.management_url}/token"
                try:
                    r = self._session().post(
                        url,
                        params={"type": api},
                        headers={"Authorization": f"Bearer {keys['api']}"},
                        timeout=self.timeout_s,
                    )
                except requests.RequestException as e:
                    raise TorchServeError(f"POST {url}?type={api} -> failed: {e}") from None
                if r.status_code != 200:
                    raise TorchServeError(
                        f"POST {r.url} -> {r.status_code}: {_message(r)} (TorchServe refused "
                        f"the API key of {self.key_file} while renewing the {api} key; "
                        "restart the server)"
                    )
                keys = self._load_keys()
            else:
                logger.info("%s key refused: using the newer key in %s", api, self.key_file)
            self._keys = keys

    def _request(
        self,
        api: str,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> requests.Response:
        url = self._base(api) + path
        timeout = self.timeout_s if timeout is None else timeout
        use_token = self.settings.token_auth and api != "metrics"
        for attempt in range(2):
            h = dict(headers or {})
            key = self._key(api) if use_token else None
            if key is not None:
                h["Authorization"] = f"Bearer {key}"
            try:
                r = self._session().request(
                    method, url, params=params, data=data, headers=h, timeout=timeout
                )
            except requests.ConnectionError as e:
                raise _Unreachable(
                    f"{method} {_with_query(url, params)} -> cannot connect ({_short(e)}); "
                    f"is the TorchServe of {self.settings.workdir} running?"
                ) from None
            except requests.Timeout:
                raise TorchServeError(
                    f"{method} {_with_query(url, params)} -> no answer within {timeout} s"
                ) from None
            except requests.RequestException as e:
                raise TorchServeError(f"{method} {_with_query(url, params)} -> {e}") from None
            if not (use_token and _is_token_refusal(r)):
                return r
            if attempt == 0:
                self._refresh_key(api, key)
        raise TorchServeError(
            f"{method} {r.url} -> {r.status_code}: {_message(r)} (the {api} key from "
            f"{self.key_file} was refused again after a refresh: the token is invalid or "
            "expired; check that this is the server's working directory, or restart the "
            "server to get new keys)"
        )

    def _checked(
        self, api: str, method: str, path: str, *, ok: tuple[int, ...] | None = (200,), **kw: Any
    ) -> requests.Response:
        r = self._request(api, method, path, **kw)
        if ok is not None and r.status_code not in ok:
            raise TorchServeError(f"{method} {r.url} -> {r.status_code}: {_message(r)}")
        return r

    @staticmethod
    def _json(r: requests.Response) -> Any:
        try:
            return r.json()
        except ValueError:
            raise TorchServeError(
                f"{r.request.method} {r.url} -> {r.status_code}: not JSON: {r.text[:300]}"
            ) from None


class _Unreachable(TorchServeError):
    """Nothing accepts connections on the address (the server is down or not up yet)."""


class _NoKeys(TorchServeError):
    """key_file.json is missing or unreadable."""


def _with_query(url: str, params: dict[str, Any] | None) -> str:
    return requests.Request("GET", url, params=params).prepare().url or url


def _short(e: Exception) -> str:
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] [^')\"]+", text)
    return m.group(0) if m else text[:200]


def _version_info(d: dict[str, Any], default: str | None) -> VersionInfo:
    queue = d.get("jobQueueStatus") or {}
    pending = queue.get("pendingRequests")
    return VersionInfo(
        name=str(d["modelName"]),
        version=str(d["modelVersion"]),
        is_default=d["modelVersion"] == default,
        batch_size=int(d["batchSize"]),
        max_batch_delay_ms=int(d["maxBatchDelay"]),
        min_workers=int(d["minWorkers"]),
        max_workers=int(d["maxWorkers"]),
        workers=tuple(
            WorkerInfo(id=str(w["id"]), pid=(int(w["pid"]) if w.get("pid") else None),
                       status=str(w.get("status", "")))
            for w in d.get("workers") or ()
        ),  # fmt: skip
        pending_requests=int(pending) if pending is not None else None,
        url=str(d.get("modelUrl", "")),
    )
