"""Where a TorchServe's HTTP APIs answer and how to reach them: `ApiAddress` (scheme, host and
port, as in config.properties' *_address), `TlsPin` (the certificate an https server must
present) and `Endpoints` (the three APIs, the key file and the pin), from which a
TorchServeClient is made for a server Packrat started or one it attached to."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from requests.adapters import HTTPAdapter

from packrat.errors import TorchServeError

APIS = ("inference", "management", "metrics")
# TorchServe 0.12's ConfigManager.ADDRESS_PATTERN, plus a bracketed IPv6 host (TorchServe
# refuses one in config.properties, but a URL given to --attach may carry one).
_ADDRESS = re.compile(r"(https|http)://(\[[0-9a-fA-F:.]+\]|[^:^/\[\]]+)(?::([0-9]+))?/?")
# Connector.parse: the port of an address that names none, (http, https) by API.
_DEFAULT_PORTS = {"inference": (80, 443), "management": (8081, 8444), "metrics": (8082, 8445)}


def url_host(host: str) -> str:
    """host as it goes in a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True)
class ApiAddress:
    """Where one HTTP API listens: TorchServe's `http(s)://host:port`."""

    scheme: str  # http or https
    host: str  # as bound: a name or an address; 0.0.0.0 binds every interface
    port: int

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise TorchServeError(f"scheme {self.scheme!r} must be http or https")
        if not self.host:
            raise TorchServeError("an API address needs a host")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise TorchServeError(f"port {self.port!r} must be an integer in 1..65535")

    @staticmethod
    def parse(text: str, api: str, what: str) -> ApiAddress:
        """An address as TorchServe reads it (no port: TorchServe's default for api); `what`
        names where it came from in the error (e.g. "inference_address in FILE:LINE")."""
        m = _ADDRESS.fullmatch(text.strip())
        if m is None:
            hint = " (unix sockets are not supported)" if text.startswith("unix:") else ""
            raise TorchServeError(
                f"{what}: {text!r} is not an http:// or https:// address with a host and "
                f"optional port, such as http://127.0.0.1:8080{hint}"
            )
        scheme, host, port = m.group(1), m.group(2).strip("[]"), m.group(3)
        if port is None:
            number = _DEFAULT_PORTS[api][scheme == "https"]
        elif not 0 < int(port) < 65536:
            raise TorchServeError(f"{what}: port {port} of {text!r} is not in 1..65535")
        else:
            number = int(port)
        return ApiAddress(scheme, host, number)

    @property
    def url(self) -> str:
        """The address as bound (as config.properties writes it)."""
        return f"{self.scheme}://{url_host(self.host)}:{self.port}"

    @property
    def connect_host(self) -> str:
        """Where a client on this machine connects: loopback for a wildcard bind."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    @property
    def connect_url(self) -> str:
        return f"{self.scheme}://{url_host(self.connect_host)}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1); a name is not resolved."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TlsPin:
    """The certificate an https TorchServe must present: the SHA-256 of its DER encoding.

    Pinning the exact certificate (rather than checking a CA chain and a host name) is what
    makes a self-signed certificate for another name work on loopback, and nothing but the
    holder of its private key can present it.
    """

    sha256: str  # 64 lowercase hex digits
    source: str  # where it was read, for messages

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise TorchServeError(f"TLS pin {self.sha256!r} is not a SHA-256 hex digest")

    @staticmethod
    def from_pem(path: Path, what: str = "") -> TlsPin:
        """The first certificate of a PEM file (a server's certificate_file: its own
        certificate comes first, any chain after it)."""
        where = f"{what}: " if what else ""
        try:
            text = Path(path).read_text(encoding="ascii", errors="replace")
        except OSError as e:
            raise TorchServeError(f"{where}cannot read certificate {path}: {e.strerror}") from None
        try:
            return TlsPin.from_pem_text(text, str(path))
        except ValueError as e:
            raise TorchServeError(
                f"{where}{path} holds no readable PEM certificate ({e}); give the server's "
                "certificate_file (-----BEGIN CERTIFICATE-----)"
            ) from None

    @staticmethod
    def from_pem_text(text: str, source: str) -> TlsPin:
        """The first certificate of a PEM text; ValueError if it holds none."""
        m = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.DOTALL)
        if m is None:
            raise ValueError("no PEM certificate")
        return TlsPin(hashlib.sha256(ssl.PEM_cert_to_DER_cert(m.group(0))).hexdigest(), source)

    def to_json(self) -> dict[str, str]:
        return {"sha256": self.sha256, "source": self.source}

    @staticmethod
    def from_json(data: dict[str, Any] | None) -> TlsPin | None:
        return None if data is None else TlsPin(str(data["sha256"]), str(data["source"]))


class PinnedAdapter(HTTPAdapter):
    """https that accepts exactly one certificate (urllib3's assert_fingerprint, checked
    during the handshake, before a request or its token is sent). Use it on a session with
    verify=False: the pin replaces CA and host name checks."""

    def __init__(self, pin: TlsPin):
        self.pin = pin
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["assert_fingerprint"] = self.pin.sha256
        super().init_poolmanager(*args, **kwargs)


@dataclass(frozen=True)
class Endpoints:
    """What a client needs to talk to one TorchServe, wherever it came from."""

    inference: ApiAddress
    management: ApiAddress
    metrics: ApiAddress
    # TorchServe's key_file.json (it writes it into its working directory); None: the server
    # runs without token authorization.
    key_file: Path | None
    tls: TlsPin | None = None  # required when an API is https
    server: str = "TorchServe"  # how messages name it: "the TorchServe of DIR", "... at URL"

    def __post_init__(self) -> None:
        https = [api for api in APIS if self.address(api).scheme == "https"]
        if https and self.tls is None:
            raise TorchServeError(
                f"the {' and '.join(https)} API of {self.server} is https: give the server's "
                "certificate (its certificate_file) so that Packrat can verify it"
            )

    def address(self, api: str) -> ApiAddress:
        return {"inference": self.inference, "management": self.management,
                "metrics": self.metrics}[api]  # fmt: skip
