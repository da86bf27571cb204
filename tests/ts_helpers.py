"""Start and stop a real TorchServe 0.12 for tests, isolated from any other server.

Isolation: every listener (HTTP and gRPC) gets a free loopback port, and TMPDIR/TEMP point
at the server's own directory. TorchServe keeps its pid file (tempfile.gettempdir()), its
worker sockets and the unpacked archives (java.io.tmpdir, set from TEMP) there, so neither
`torchserve --start`'s "already running" check nor the worker socket /tmp/.ts.sock.9000
collides with another server. key_file.json lands in the frontend's working directory.

Stopping never uses `torchserve --stop` (it stops whichever server the pid file names):
SIGTERM to the frontend we started (it stops its workers), then SIGKILL by pid for anything
of ours that is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
CONFIG_TEMPLATE = REPO / "config" / "config.properties.template"
LOG4J_TEMPLATE = REPO / "config" / "log4j2.xml"


@dataclass(frozen=True)
class TorchServe:
    workdir: Path
    inference_url: str
    management_url: str
    metrics_url: str
    inference_key: str
    management_key: str
    launcher: subprocess.Popen

    def inference_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.inference_key}"}

    def management_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.management_key}"}


def torchserve_command() -> str | None:
    local = Path(sys.executable).parent / "torchserve"
    return str(local) if local.is_file() else shutil.which("torchserve")


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def render_config(workdir: Path, model_store: Path) -> tuple[Path, dict[str, int]]:
    """Write config.properties and log4j2.xml into workdir; return the config path and ports."""
    names = ["inference", "management", "metrics", "grpc_inference", "grpc_management"]
    ports = dict(zip(names, free_ports(len(names))))
    log_dir = workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log4j = workdir / "log4j2.xml"
    log4j.write_text(LOG4J_TEMPLATE.read_text().format(log_dir=log_dir))
    config = workdir / "config.properties"
    config.write_text(
        CONFIG_TEMPLATE.read_text().format(
            inference_port=ports["inference"],
            management_port=ports["management"],
            metrics_port=ports["metrics"],
            grpc_inference_port=ports["grpc_inference"],
            grpc_management_port=ports["grpc_management"],
            model_store=model_store,
            log4j_config=log4j,
        )
    )
    return config, ports


def start_torchserve(workdir: Path, model_store: Path, timeout: float = 60.0) -> TorchServe:
    """Start TorchServe with token auth on; return once /ping answers with the inference key."""
    command = torchserve_command()
    if command is None:
        raise RuntimeError("torchserve not found; pip install torchserve==0.12.0")
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    config, ports = render_config(workdir, model_store)
    env = dict(os.environ, TMPDIR=str(tmp), TEMP=str(tmp))
    log = open(workdir / "launcher.log", "wb")
    launcher = subprocess.Popen(
        [command, "--start", "--foreground", "--ncs",
         "--ts-config", str(config), "--model-store", str(model_store)],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    log.close()
    base = "http://127.0.0.1:{}"
    deadline = time.monotonic() + timeout
    key_file = workdir / "key_file.json"
    try:
        while True:
            if launcher.poll() is not None:
                raise RuntimeError(f"torchserve exited with {launcher.returncode}: {_tail(workdir)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"torchserve did not answer /ping in {timeout} s: {_tail(workdir)}")
            keys = _read_keys(key_file)
            if keys is not None:
                server = TorchServe(
                    workdir=workdir,
                    inference_url=base.format(ports["inference"]),
                    management_url=base.format(ports["management"]),
                    metrics_url=base.format(ports["metrics"]),
                    inference_key=keys[0],
                    management_key=keys[1],
                    launcher=launcher,
                )
                try:
                    r = requests.get(
                        f"{server.inference_url}/ping", headers=server.inference_headers(), timeout=2
                    )
                    if r.status_code == 200:
                        return server
                except requests.ConnectionError:
                    pass
            time.sleep(0.2)
    except BaseException:
        _stop(launcher, workdir)
        raise


def _read_keys(key_file: Path) -> tuple[str, str] | None:
    # Written by the frontend at startup: {"management": {"key", "expiration time"},
    # "inference": {...}, "API": {"key"}}; may be caught half-written.
    try:
        data = json.loads(key_file.read_text())
        return data["inference"]["key"], data["management"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tail(workdir: Path, chars: int = 2000) -> str:
    text = ""
    for name in ("launcher.log", "logs/ts_log.log", "logs/model_log.log"):
        p = workdir / name
        if p.is_file():
            text += f"\n--- {name}\n" + p.read_text(errors="replace")[-chars:]
    return text


def register_model(
    server: TorchServe,
    mar_name: str,
    *,
    batch_size: int = 4,
    max_batch_delay_ms: int = 50,
    workers: int = 1,
    timeout: float = 120.0,
) -> None:
    r = requests.post(
        f"{server.management_url}/models",
        params={
            "url": mar_name,
            "initial_workers": workers,
            "synchronous": "true",
            "batch_size": batch_size,
            "max_batch_delay": max_batch_delay_ms,
        },
        headers=server.management_headers(),
        timeout=timeout,
    )
    if r.status_code != 200:
        raise RuntimeError(
            f"POST {r.url} -> {r.status_code}: {r.text[:500]}{_tail(server.workdir)}"
        )


def stop_torchserve(server: TorchServe, timeout: float = 30.0) -> None:
    """Stop the server we started and every process of it; safe to call twice."""
    _stop(server.launcher, server.workdir, timeout)


def _stop(launcher: subprocess.Popen, workdir: Path, timeout: float = 30.0) -> None:
    procs: list[psutil.Process] = []
    try:
        root = psutil.Process(launcher.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    procs += [p for p in processes_of(workdir) if p.pid not in {q.pid for q in procs}]
    # The frontend stops its workers on SIGTERM; the launcher exits when the frontend does.
    frontends = [p for p in procs if _is_frontend(p)]
    for p in frontends or procs:
        _signal(p, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        _signal(p, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    try:
        launcher.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    # Workers restarted during shutdown are no longer children of the frontend.
    for p in processes_of(workdir):
        _signal(p, signal.SIGKILL)


def _is_frontend(p: psutil.Process) -> bool:
    try:
        return "org.pytorch.serve.ModelServer" in p.cmdline()
    except psutil.Error:
        return False


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def processes_of(workdir: Path) -> list[psutil.Process]:
    """Live processes whose command line names workdir: the frontend (its config file) and
    the workers (their socket under workdir/tmp)."""
    mark = str(workdir)
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(mark in arg for arg in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            continue
    return found
