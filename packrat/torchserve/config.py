"""What a server is started with: its ports and settings, the config.properties and log4j2.xml
rendered from the package's templates, and the server.json state file that lets another
process find the settings of a working directory again."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from packrat.errors import TorchServeError
from packrat.jsonfile import write_json

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


@dataclass(frozen=True)
class ServerSettings:
    workdir: Path  # config.properties, log4j2.xml, logs/, tmp/, key_file.json, server.json
    model_store: Path
    ports: Ports
    host: str = "127.0.0.1"  # every listener binds here
    # Extra environment for the frontend and so for its workers.
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
    """Write workdir/log4j2.xml and workdir/config.properties for settings; return the latter."""
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
        host = url_host(settings.host)
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


def url_host(host: str) -> str:
    """host as it goes in a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


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
