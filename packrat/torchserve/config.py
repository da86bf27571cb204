"""What a server is started with: its ports and settings, the config.properties and log4j2.xml
rendered from the package's templates, and the server.json state file that lets another
process find the settings of a working directory again. (A user's own config.properties
becomes ServerSettings in userconfig.py.)"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from packrat.errors import TorchServeError
from packrat.jsonfile import write_json
from packrat.torchserve.endpoints import APIS, ApiAddress, Endpoints, TlsPin, url_host

__all__ = ["ApiAddress", "Endpoints", "TlsPin", "url_host"]  # re-exported for the package

# Package data: the config.properties and quiet log4j2 config every server starts from.
TEMPLATES = resources.files("packrat.torchserve") / "templates"
CONFIG_TEMPLATE = TEMPLATES / "config.properties.template"
LOG4J_TEMPLATE = TEMPLATES / "log4j2.xml"

CONFIG_FILE = "config.properties"
LOG4J_FILE = "log4j2.xml"
SERVER_FILE = "server.json"
KEY_FILE = "key_file.json"
LAUNCHER_LOG = "launcher.log"
# sockaddr_un.sun_path holds 108 bytes with the trailing NUL.
MAX_SOCKET_PATH = 107


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


GRPC_APIS = ("grpc_inference", "grpc_management")
# config.properties keys that ServerSettings fields own: `properties` may not set them.
OWNED_KEYS = frozenset({
    *(f"{api}_address" for api in (*APIS, *GRPC_APIS)), *(f"{api}_port" for api in GRPC_APIS),
    "model_store", "allowed_urls", "disable_token_authorization",
})  # fmt: skip


@dataclass(frozen=True)
class Listener:
    """Where one API listens when not on http://ServerSettings.host (a user's config)."""

    api: str  # inference, management, metrics, grpc_inference or grpc_management
    host: str
    scheme: str = "http"  # https for an HTTP API with TLS; gRPC's TLS is enable_grpc_ssl

    def __post_init__(self) -> None:
        if self.api not in (*APIS, *GRPC_APIS):
            raise TorchServeError(f"listener api {self.api!r} must be one of {APIS + GRPC_APIS}")
        if self.scheme not in ("http", "https") or (self.api in GRPC_APIS and self.scheme != "http"):
            raise TorchServeError(f"listener {self.api}: scheme {self.scheme!r} is not http(s)")


@dataclass(frozen=True)
class ServerSettings:
    workdir: Path  # config.properties, log4j2.xml, logs/, tmp/, key_file.json, server.json
    model_store: Path
    ports: Ports
    host: str = "127.0.0.1"  # every listener binds here unless `listeners` says otherwise
    # Extra environment for the frontend and so for its workers.
    env: tuple[tuple[str, str], ...] = ()
    token_auth: bool = True
    # Extra config.properties entries (values, escaped when written), set after the template
    # (e.g. job_queue_size); keys in OWNED_KEYS are set through the fields instead.
    properties: tuple[tuple[str, str], ...] = ()
    # Per-API host and scheme where they differ from http://{host} (from a user's config).
    listeners: tuple[Listener, ...] = ()
    # The certificate the https APIs present (their certificate_file or keystore).
    tls: TlsPin | None = None
    # Java regexes of registration URLs allowed besides the model store (a user's).
    allowed_urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        apis = [listener.api for listener in self.listeners]
        if len(set(apis)) != len(apis):
            raise TorchServeError(f"listeners name an API twice: {apis}")
        owned = sorted(OWNED_KEYS & {k for k, _ in self.properties})
        if owned:
            raise TorchServeError(
                f"ServerSettings.properties may not set {', '.join(owned)}: use the ports, "
                "host, listeners, model_store, allowed_urls and token_auth fields"
            )
        self.endpoints()  # an https API without a certificate fails here

    def address(self, api: str) -> ApiAddress:
        """Where an HTTP API (inference, management or metrics) listens."""
        listener = self.listener(api)
        return ApiAddress(listener.scheme, listener.host, self.ports.as_dict()[api])

    def listener(self, api: str) -> Listener:
        return next((x for x in self.listeners if x.api == api), Listener(api, self.host))

    def endpoints(self) -> Endpoints:
        """What a TorchServeClient of this server needs."""
        return Endpoints(
            inference=self.address("inference"),
            management=self.address("management"),
            metrics=self.address("metrics"),
            key_file=Path(self.workdir) / KEY_FILE if self.token_auth else None,
            tls=self.tls,
            server=f"the TorchServe of {self.workdir}",
        )

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
            "listeners": [[x.api, x.host, x.scheme] for x in self.listeners],
            "tls": self.tls.to_json() if self.tls else None,
            "allowed_urls": list(self.allowed_urls),
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> ServerSettings:
        # .get: server.json files written before listeners, tls and allowed_urls existed
        return ServerSettings(
            workdir=Path(data["workdir"]),
            model_store=Path(data["model_store"]),
            ports=Ports(**data["ports"]),
            host=str(data["host"]),
            env=tuple((str(k), str(v)) for k, v in data.get("env", ())),
            token_auth=bool(data["token_auth"]),
            properties=tuple((str(k), str(v)) for k, v in data.get("properties", ())),
            listeners=tuple(Listener(str(x[0]), str(x[1]), str(x[2])) for x in data.get("listeners", ())),
            tls=TlsPin.from_json(data.get("tls")),
            allowed_urls=tuple(str(u) for u in data.get("allowed_urls", ())),
        )


def load_settings(workdir: Path) -> ServerSettings:
    """The settings a server of workdir was started with (from workdir/server.json)."""
    data = read_state(Path(workdir).expanduser().resolve())
    try:
        return ServerSettings.from_json(data)
    except (KeyError, TypeError, ValueError) as e:
        raise TorchServeError(
            f"{Path(workdir) / SERVER_FILE} is not a Packrat server state file ({e!r}); "
            "start the server again"
        ) from None


def write_state(settings: ServerSettings, frontend_pid: int | None) -> None:
    """Write workdir/server.json: the settings and the frontend's pid (None: not running)."""
    data = {**settings.to_json(), "frontend_pid": frontend_pid}
    write_json(settings.workdir / SERVER_FILE, data)


def read_state(workdir: Path) -> dict[str, Any]:
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


def render_config(settings: ServerSettings) -> Path:
    """Write workdir/log4j2.xml and workdir/config.properties for settings; return the latter.

    The template's entries come first; then the addresses, token authorization and
    allowed_urls of the fields; then `properties`. A `vmargs` of the properties gets Packrat's
    quiet log4j config appended unless it names a log4j.configurationFile itself.
    """
    workdir = settings.workdir
    log_dir = workdir / "logs"
    log4j = workdir / LOG4J_FILE
    log4j_option = f"-Dlog4j.configurationFile=file://{log4j}"
    allowed = ",".join((_store_url_pattern(settings.model_store), *settings.allowed_urls))
    try:
        log4j.write_text(LOG4J_TEMPLATE.read_text().format(log_dir=log_dir))
        text = CONFIG_TEMPLATE.read_text().format(
            inference_port=settings.ports.inference,
            management_port=settings.ports.management,
            metrics_port=settings.ports.metrics,
            grpc_inference_port=settings.ports.grpc_inference,
            grpc_management_port=settings.ports.grpc_management,
            model_store=escape_value(str(settings.model_store)),
            allowed_urls=escape_value(allowed),
            log4j_config=log4j,
        )
    except (OSError, KeyError, IndexError, ValueError) as e:
        raise TorchServeError(
            f"cannot render the TorchServe config from {TEMPLATES}: {e!r}"
        ) from None
    overrides: dict[str, str] = {f"{api}_address": settings.address(api).url for api in APIS}
    for api in GRPC_APIS:
        overrides[f"{api}_address"] = settings.listener(api).host
    if not settings.token_auth:
        overrides["disable_token_authorization"] = "true"
    overrides.update(dict(settings.properties))
    vmargs = overrides.get("vmargs")
    if vmargs is not None and "-Dlog4j.configurationFile=" not in vmargs:
        overrides["vmargs"] = f"{vmargs} {log4j_option}".strip()
    config = workdir / CONFIG_FILE
    config.write_text(_set_properties(text, overrides), encoding="ascii")
    return config


def _store_url_pattern(store: Path) -> str:
    """allowed_urls entry for file URLs inside the model store only: a Java regex quoted with
    \\Q..\\E (TorchServe splits the list on commas)."""
    text = str(store)
    if "," in text or "\\" in text:
        raise TorchServeError(f"model store path {text!r} may not contain ',' or '\\'; use another")
    return f"file://\\Q{text}\\E/.*"


def escape_key(key: str) -> str:
    """key as java.util.Properties.load reads it back (separators and comment marks escaped)."""
    return _escape(key, " =:#!")


def escape_value(value: str) -> str:
    """value as java.util.Properties.load reads it back from an ISO 8859-1 file: backslashes
    doubled, control and non-ASCII characters as \\uXXXX, a leading space kept."""
    text = _escape(value, "")
    return "\\" + text if text.startswith(" ") else text


def _escape(text: str, also: str) -> str:
    special = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}
    out = []
    for c in text:
        if c in special:
            out.append(special[c])
        elif c in also:
            out.append("\\" + c)
        elif " " <= c <= "~":
            out.append(c)
        else:
            out += [f"\\u{unit:04x}" for unit in _utf16_units(c)]
    return "".join(out)


def _utf16_units(c: str) -> list[int]:
    data = c.encode("utf-16-be")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def _set_properties(text: str, overrides: dict[str, str]) -> str:
    """Replace `key=value` lines of the template text; append the keys it lacks. Values are
    escaped, except vmargs: TorchServe's Python launcher reads it from the raw line."""

    def line(key: str, value: str) -> str:
        if key == "vmargs":
            if any(c in value for c in "\r\n"):
                raise TorchServeError(f"vmargs {value!r} must be one line")
            return f"vmargs={value}"
        return f"{escape_key(key)}={escape_value(value)}"

    left = dict(overrides)
    lines = []
    for raw in text.splitlines():
        key = raw.split("=", 1)[0].strip()
        if not raw.lstrip().startswith("#") and "=" in raw and key in left:
            raw = line(key, left.pop(key))
        lines.append(raw)
    if left:
        lines.append("# Set by packrat.torchserve (ServerSettings.properties)")
        lines += [line(k, v) for k, v in left.items()]
    return "\n".join(lines) + "\n"
