"""TorchServeClient: the inference, management and metrics APIs of one server, with its token."""

from __future__ import annotations

import logging
import re
import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests
from requests.auth import AuthBase

from packrat.errors import TorchServeError
from packrat.torchserve.auth import (
    Bearer,
    KeyRefused,
    Keys,
    NoKeys,
    is_token_refusal,
    response_message,
)
from packrat.torchserve.config import ServerSettings
from packrat.torchserve.endpoints import ApiAddress, Endpoints, PinnedAdapter
from packrat.torchserve.metrics import parse_metrics

logger = logging.getLogger(__name__)


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


class TorchServeClient:
    """Inference, management and metrics calls to one server; safe to share between threads.

    Made from the settings of a server Packrat started, or from the Endpoints of any server
    (one it attached to). Management calls send the management key, inference calls and /ping
    the inference key (from the key file, unless the server has token authorization off). A
    refused key is refreshed once (see the facts in packrat.torchserve). https APIs must
    present the pinned certificate (Endpoints.tls).
    """

    def __init__(self, target: ServerSettings | Endpoints, timeout_s: float = 30):
        # settings: those of a server Packrat started; None for one given by its endpoints
        self.settings: ServerSettings | None = None
        if isinstance(target, ServerSettings):
            self.settings = target.resolved()
            self.endpoints = self.settings.endpoints()
        else:
            self.endpoints = target
        self.timeout_s = timeout_s
        self.inference_url = self.endpoints.inference.connect_url
        self.management_url = self.endpoints.management.connect_url
        self.metrics_url = self.endpoints.metrics.connect_url
        self.key_file = self.endpoints.key_file  # None: no token authorization
        self._local = threading.local()
        self._auth: dict[str, AuthBase | None] = dict.fromkeys(("inference", "management"))
        if self.key_file is not None:
            self._keys = Keys(self.key_file, self.endpoints.server, self.management_url,
                              self._session, timeout_s)  # fmt: skip
            self._auth = {api: Bearer(self._keys, api) for api in ("inference", "management")}
        self._auth["metrics"] = None  # the metrics port takes no token

    # -- inference API

    def ping(self) -> bool:
        """True when TorchServe answers /ping Healthy; False when it is unhealthy or does not
        accept connections. A refused token raises TorchServeError."""
        try:
            r = self._request("inference", "GET", "/ping", timeout=self.timeout_s)
        except _Unreachable:
            return False
        except NoKeys:
            if not self._accepts_connections(self.endpoints.inference):
                return False  # stopped: that is why there is no key file
            raise
        if r.status_code != 200:
            return False
        try:
            return r.json().get("status") == "Healthy"
        except (ValueError, AttributeError):
            return False

    def predict(
        self, name: str, body: bytes, version: str | None = None, timeout_s: float = 60,
        content_type: str = "application/json", headers: dict[str, str] | None = None,
    ) -> requests.Response:
        """POST body to /predictions/NAME[/VERSION]; the response as it came, whatever its
        status (a bad request is 400, a full queue 503). headers: more request headers."""
        path = f"/predictions/{quote(name, safe='')}"
        if version is not None:
            path += f"/{quote(version, safe='')}"
        return self._checked(
            "inference",
            "POST",
            path,
            data=body,
            headers={"Content-Type": content_type, **(headers or {})},
            timeout=timeout_s,
            ok=None,
        )

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
        wait: bool = True,
    ) -> None:
        """Register a version from url (a .mar or directory name in the model store) and
        return once its initial workers are READY (synchronous=true), or with wait=False as
        soon as TorchServe has accepted it and starts them. TorchServe 0.12 answers a
        synchronous register on one of the request threads that also serve the inference
        API, blocked until the workers are up: every connection on that thread waits as
        long (measured: live requests held 1.5-2 s while a small model's standby version
        started). A caller that must not disturb serving passes wait=False and watches the
        workers itself."""
        params = {
            "url": url,
            "model_name": model_name,
            "batch_size": batch_size,
            "max_batch_delay": max_batch_delay_ms,
            "initial_workers": initial_workers,
            "synchronous": "true" if wait else "false",
            "response_timeout": response_timeout_s,
        }
        self._checked("management", "POST", "/models", params=params, timeout=timeout_s,
                      ok=(200,) if wait else (200, 202))
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
        counters are cumulative (see the facts in packrat.torchserve for the "default"
        version label)."""
        r = self._checked("metrics", "GET", "/metrics")
        try:
            return parse_metrics(r.text)
        except TorchServeError as e:
            raise TorchServeError(f"GET {r.url} -> {r.status_code}: {e}") from None

    # -- any call

    def request(
        self, api: str, method: str, path: str, *, params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> requests.Response:
        """One call to an API ("inference", "management" or "metrics") with its key (a
        refused key is refreshed once); the response whatever its status. Raises
        TorchServeError when nothing answers, KeyRefused when the key stays refused, NoKeys
        when the key file cannot be read."""
        return self._request(api, method, path, params=params, timeout=timeout_s)

    # -- plumbing

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.trust_env = False  # this host only: never through a proxy from the environment
            if self.endpoints.tls is not None:
                s.mount("https://", PinnedAdapter(self.endpoints.tls))
                s.verify = False  # the pin replaces CA and host name checks
        return s

    def _base(self, api: str) -> str:
        return {
            "inference": self.inference_url,
            "management": self.management_url,
            "metrics": self.metrics_url,
        }[api]

    def _accepts_connections(self, address: ApiAddress) -> bool:
        where = (address.connect_host, address.port)
        try:
            with socket.create_connection(where, timeout=self.timeout_s):
                return True
        except OSError:
            return False

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
        auth = self._auth[api]
        for attempt in range(2):
            try:
                r = self._session().request(
                    method, url, params=params, data=data, headers=headers, auth=auth,
                    timeout=timeout,
                )  # fmt: skip
            except requests.exceptions.SSLError as e:
                tls = self.endpoints.tls
                pinned = f" (Packrat pins the certificate of {tls.source})" if tls else ""
                raise TorchServeError(
                    f"{method} {_with_query(url, params)} -> TLS handshake failed: "
                    f"{_short(e)}{pinned}"
                ) from None
            except requests.ConnectionError as e:
                raise _Unreachable(
                    f"{method} {_with_query(url, params)} -> cannot connect ({_short(e)}); "
                    f"is {self.endpoints.server} running?"
                ) from None
            except requests.Timeout:
                raise TorchServeError(
                    f"{method} {_with_query(url, params)} -> no answer within {timeout} s"
                ) from None
            except requests.RequestException as e:
                raise TorchServeError(f"{method} {_with_query(url, params)} -> {e}") from None
            if auth is None or not is_token_refusal(r):
                return r
            if attempt == 0:
                self._keys.renew(api, refused=Bearer.sent_key(r))
        raise KeyRefused(
            f"{method} {r.url} -> {r.status_code}: {response_message(r)} (the {api} key from "
            f"{self.key_file} was refused again after a refresh: the token is invalid or "
            "expired; check that this is the key file of the server, or restart the "
            "server to get new keys)",
            response_message(r),
        )

    def _checked(
        self, api: str, method: str, path: str, *, ok: tuple[int, ...] | None = (200,), **kw: Any
    ) -> requests.Response:
        r = self._request(api, method, path, **kw)
        if ok is not None and r.status_code not in ok:
            raise TorchServeError(f"{method} {r.url} -> {r.status_code}: {response_message(r)}")
        return r

    @staticmethod
    def _json(r: requests.Response) -> Any:
        try:
            return r.json()
        except ValueError:
            raise TorchServeError(
                f"{r.request.method} {r.url} -> {r.status_code}: not JSON: {r.text[:300]}"
            ) from None


# ---------------------------------------------------------------------------------------
# Helpers


class _Unreachable(TorchServeError):
    """Nothing accepts connections on the address (the server is down or not up yet)."""


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
        ),
        pending_requests=int(pending) if pending is not None else None,
        url=str(d.get("modelUrl", "")),
    )
