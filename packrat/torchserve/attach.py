"""Attaching to a TorchServe the user started (`torchserve --start --ts-config THEIRS
--model-store DIR`) on this host: `attached_server` describes it from its URLs, model store
and key file, `check_attached` checks in a few fast calls that Packrat can manage it, and
`AttachedServer.endpoints()` makes its TorchServeClient. Nothing here starts or stops it."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psutil
import requests

from packrat.errors import TorchServeError
from packrat.torchserve.auth import (
    KeyRefused,
    NoKeys,
    is_token_refusal,
    response_message,
)
from packrat.torchserve.client import TorchServeClient
from packrat.torchserve.endpoints import ApiAddress, Endpoints, TlsPin, is_loopback
from packrat.torchserve.process import FRONTEND_CLASS

# The counters Packrat's estimator reads (metrics_mode=prometheus; "log" serves none).
REQUEST_COUNTERS = ("ts_inference_requests_total", "ts_inference_latency_microseconds")
KEY_HINT = ("give the key_file.json that TorchServe wrote into the directory it was started "
            "from (--key-file)")  # fmt: skip


@dataclass(frozen=True)
class AttachedServer:
    """A TorchServe the user runs on this host."""

    inference: ApiAddress
    management: ApiAddress
    metrics: ApiAddress
    model_store: Path  # the --model-store it was started with; Packrat writes versions there
    key_file: Path | None  # its key_file.json; None: it runs with token authorization off
    tls: TlsPin | None = None  # the certificate its https APIs present

    def endpoints(self) -> Endpoints:
        return Endpoints(self.inference, self.management, self.metrics, self.key_file,
                         self.tls, server=f"the TorchServe at {self.management.url}")  # fmt: skip

    def client(self, timeout_s: float = 30) -> TorchServeClient:
        return TorchServeClient(self.endpoints(), timeout_s=timeout_s)

    def to_json(self) -> dict[str, Any]:
        return {
            **{api: self.endpoints().address(api).url for api in ("inference", "management",
                                                                   "metrics")},
            "model_store": str(self.model_store),
            "key_file": None if self.key_file is None else str(self.key_file),
            "tls": None if self.tls is None else self.tls.to_json(),
        }  # fmt: skip

    @staticmethod
    def from_json(data: dict[str, Any]) -> AttachedServer:
        return AttachedServer(
            **{api: ApiAddress.parse(str(data[api]), api, api)
               for api in ("inference", "management", "metrics")},
            model_store=Path(data["model_store"]),
            key_file=None if data.get("key_file") is None else Path(data["key_file"]),
            tls=TlsPin.from_json(data.get("tls")),
        )  # fmt: skip


@dataclass(frozen=True)
class AttachCheck:
    # The metrics API serves REQUEST_COUNTERS (metrics_mode=prometheus): without them the
    # controller cannot estimate the batch size.
    request_counters: bool
    models: tuple[str, ...]  # registered now


def attached_server(
    *,
    management: str,
    inference: str,
    metrics: str,
    model_store: Path,
    key_file: Path | None = None,
    certificate: Path | None = None,
) -> AttachedServer:
    """The description of a TorchServe from its three URLs (as given to --management,
    --inference, --metrics), its model store, its key file (None: token authorization off)
    and, for https URLs, the PEM certificate it serves (its certificate_file). Raises
    TorchServeError for a URL that is not http(s) or not on this host; checks nothing over
    the network (check_attached does)."""
    urls = {"inference": inference, "management": management, "metrics": metrics}
    addresses = {api: ApiAddress.parse(url, api, f"--{api} {url}") for api, url in urls.items()}
    for api, addr in addresses.items():
        if not _on_this_host(addr.host):
            raise TorchServeError(
                f"--{api} {urls[api]}: {addr.host} is not this host; Packrat manages a "
                "TorchServe on its own machine only (it writes its model store and watches "
                "its workers)"
            )
    https = [api for api, a in addresses.items() if a.scheme == "https"]
    if https and certificate is None:
        raise TorchServeError(
            f"--{https[0]} {urls[https[0]]} is https: give the certificate the server presents "
            "(the certificate_file of its config.properties) so that Packrat can verify it"
        )
    tls = TlsPin.from_pem(Path(certificate).expanduser().resolve()) if certificate else None
    return AttachedServer(
        model_store=Path(model_store).expanduser().resolve(),
        key_file=None if key_file is None else Path(key_file).expanduser().resolve(),
        tls=tls,
        **addresses,
    )


def check_attached(server: AttachedServer, timeout_s: float = 2) -> AttachCheck:
    """Check that Packrat can manage server: every URL answers as the API it is given as,
    the keys are accepted (expired ones are renewed, as the client does), the model API is
    enabled, and the model store is a writable directory (the server's, where that can be
    seen). Raises TorchServeError, one line saying what is wrong and what to do."""
    _check_store(server.model_store)
    for api in ("management", "inference", "metrics"):
        _check_listening(server.endpoints().address(api), api, timeout_s)
    client = server.client(timeout_s=timeout_s)
    r = _call(client, server, "management", "GET", "/models", params={"limit": 100})
    if r.status_code == 404:
        _wrong_api(server, "management", r)
    if r.status_code != 200:
        raise TorchServeError(f"GET {r.url} -> {r.status_code}: {response_message(r)}")
    try:
        models = tuple(str(m["modelName"]) for m in r.json().get("models", []))
    except (ValueError, AttributeError, KeyError, TypeError):
        _wrong_api(server, "management", r)
    r = _call(client, server, "inference", "GET", "/ping")
    if r.status_code == 404:
        _wrong_api(server, "inference", r)
    # Registering an archive that does not exist: 404 with the model API on, 405 with it off.
    probe = f"packrat-attach-probe-{uuid.uuid4().hex}.mar"
    r = _call(client, server, "management", "POST", "/models", params={"url": probe})
    if r.status_code == 405:
        raise TorchServeError(
            f"the management API at {server.management.url} does not register models "
            "(HTTP 405): restart TorchServe with enable_model_api=true in its config.properties "
            "(or --enable-model-api)"
        )
    r = _call(client, server, "metrics", "GET", "/metrics")
    if r.status_code != 200:
        _wrong_api(server, "metrics", r)
    _check_server_store(server)
    return AttachCheck(request_counters=_has_counters(r.text), models=models)


def _call(client: TorchServeClient, server: AttachedServer, api: str, method: str, path: str,
          **kw: Any) -> requests.Response:  # fmt: skip
    url = server.endpoints().address(api).url
    try:
        r = client.request(api, method, path, **kw)
    except KeyRefused as e:
        if api == "management" and _answers_as_inference(server):
            raise TorchServeError(
                f"{url} is TorchServe's inference API, not its management API: swap "
                "--management and --inference"
            ) from None
        raise TorchServeError(
            f"the {api} API at {url} refused the key from {server.key_file}: {e.reason}; "
            f"{KEY_HINT}"
        ) from None
    except NoKeys:
        raise TorchServeError(
            f"cannot read TorchServe's keys from {server.key_file}: {KEY_HINT}, or leave "
            "--key-file out if it runs with token authorization off"
        ) from None
    if server.key_file is None and api != "metrics" and is_token_refusal(r):
        raise TorchServeError(
            f"the {api} API at {url} wants a key ({response_message(r)}): {KEY_HINT}"
        )
    return r


def _wrong_api(server: AttachedServer, api: str, r: requests.Response) -> NoReturn:
    raise TorchServeError(
        f"{r.request.method} {r.url} -> {r.status_code}: {server.endpoints().address(api).url} "
        f"does not answer as TorchServe's {api} API; fix --{api}"
    )


def _answers_as_inference(server: AttachedServer) -> bool:
    """True if the management URL accepts the inference key on /ping (the URLs are swapped)."""
    endpoints = server.endpoints()
    swapped = Endpoints(endpoints.management, endpoints.inference, endpoints.metrics,
                        endpoints.key_file, endpoints.tls, endpoints.server)  # fmt: skip
    try:
        r = TorchServeClient(swapped, timeout_s=2).request("inference", "GET", "/ping")
    except TorchServeError:
        return False
    return r.status_code == 200


def _check_listening(address: ApiAddress, api: str, timeout_s: float) -> None:
    try:
        with socket.create_connection((address.connect_host, address.port), timeout=timeout_s):
            return
    except TimeoutError:
        problem = f"no answer within {timeout_s} s at {address.url}"
    except OSError as e:
        problem = f"nothing answers at {address.url} ({e.strerror or e})"
    raise TorchServeError(f"{problem}: start TorchServe first or fix --{api}")


def _check_store(store: Path) -> None:
    if not store.is_dir():
        what = "is not a directory" if store.exists() else "does not exist"
        raise TorchServeError(
            f"model store {store} {what}: give the --model-store TorchServe was started with"
        )
    try:  # a real write: os.access misses read-only mounts, and root passes every mode check
        fd, name = tempfile.mkstemp(prefix=".packrat-write-probe-", dir=store)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise TorchServeError(
            f"model store {store} is not writable by this user (uid {os.geteuid()}): "
            f"{e.strerror}; Packrat writes a directory there per model version, so run it as "
            "a user who may write there"
        ) from None


def _check_server_store(server: AttachedServer) -> None:
    """If this user can see the frontend that listens on the management port, its model
    store (-s, from --model-store or model_store) must be the one given."""
    theirs = _frontend_store(server.management.port)
    if theirs is not None and theirs != server.model_store:
        raise TorchServeError(
            f"the TorchServe at {server.management.url} serves model store {theirs}, not "
            f"{server.model_store}: pass --model-store {theirs}"
        )


def _frontend_store(port: int) -> Path | None:
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if FRONTEND_CLASS not in cmd or "-s" not in cmd[:-1]:
            continue
        try:
            listening = any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                            for c in p.net_connections(kind="inet"))  # fmt: skip
            if listening:
                return (Path(p.cwd()) / cmd[cmd.index("-s") + 1]).resolve()
        except psutil.Error:
            continue
    return None


def _has_counters(text: str) -> bool:
    """True if every REQUEST_COUNTERS name appears (a HELP/TYPE line or a sample): TorchServe
    declares them at start in Prometheus mode, before any request."""
    names = set(re.findall(r"^(?:# (?:HELP|TYPE) )?([A-Za-z_:][A-Za-z0-9_:]*)", text, re.MULTILINE))
    return all(name in names for name in REQUEST_COUNTERS)


def _on_this_host(host: str) -> bool:
    if is_loopback(host) or host in ("0.0.0.0", "::") or host == socket.gethostname():
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    local = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    for info in infos:
        ip = str(info[4][0]).split("%")[0]
        if ip in local or ipaddress.ip_address(ip).is_loopback:
            return True
    return False
