"""A user's own TorchServe config.properties: `read_user_config` parses it as Java does, and
`settings_for` turns it into the ServerSettings Packrat starts TorchServe with, keeping the
user's settings and adding or overriding only what Packrat needs (the model API, Prometheus
metrics, Packrat's model store), with a warning for each setting it overrides or that weakens
Packrat's defaults."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from packrat.errors import TorchServeError
from packrat.torchserve.config import GRPC_APIS, Listener, Ports, ServerSettings
from packrat.torchserve.endpoints import APIS, ApiAddress, TlsPin, is_loopback
from packrat.torchserve.java import find_java

# Values that are paths: TorchServe reads a relative one from its working directory, which is
# Packrat's, so they are made absolute against the directory the user runs Packrat from.
PATH_KEYS = ("private_key_file", "certificate_file", "keystore", "workflow_store", "plugins_path",
             "metrics_config")  # fmt: skip


@dataclass(frozen=True)
class Property:
    key: str
    value: str  # unescaped, as java.util.Properties holds it (trailing blanks kept)
    line: int  # where its logical line starts, from 1


@dataclass(frozen=True)
class UserConfig:
    path: Path
    properties: tuple[Property, ...]  # in file order; a repeated key: the last one counts

    def find(self, key: str) -> Property | None:
        return next((p for p in reversed(self.properties) if p.key == key), None)

    def get(self, key: str) -> str | None:
        prop = self.find(key)
        return None if prop is None else prop.value.strip()

    def where(self, prop: Property) -> str:
        return f"{self.path}:{prop.line}"

    def effective(self) -> tuple[Property, ...]:
        """Each key once, with the value that counts, in order of first appearance."""
        last = {p.key: p for p in self.properties}
        return tuple(last[k] for k in dict.fromkeys(p.key for p in self.properties))

    @property
    def service_envelope(self) -> str | None:
        """The request envelope TorchServe wraps handlers in (json, body, kserve, kservev2)."""
        return self.get("service_envelope") or None


@dataclass(frozen=True)
class UserSettings:
    settings: ServerSettings
    # One line each, for the caller to show: overridden settings and weakened defaults.
    warnings: tuple[str, ...] = field(default=())


def read_user_config(path: Path) -> UserConfig:
    """Parse a config.properties as java.util.Properties.load does (ISO 8859-1; `#`/`!`
    comments; `key=value`, `key: value` or `key value`; a trailing backslash continues a line;
    backslash escapes and \\uXXXX). Raises TorchServeError naming the file and line."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TorchServeError(
            f"cannot read TorchServe config {path}: {e.strerror}; give an existing "
            "config.properties to --ts-config"
        ) from None
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise TorchServeError(f"{path}:{line}: a NUL byte: this is not a config.properties file")
    return UserConfig(path.resolve(), parse_properties(data.decode("latin-1"), str(path)))


def parse_properties(text: str, source: str = "<text>") -> tuple[Property, ...]:
    """The properties of a text, as java.util.Properties.load reads them; `source` names it in
    errors."""
    props = []
    for line, logical in _logical_lines(text):
        key, value = _split(logical)
        where = f"{source}:{line}"
        props.append(Property(_unescape(key, where), _unescape(value, where), line))
    return tuple(props)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(line number where it starts, text) of each logical line: a port of JDK 17's
    Properties.LineReader.readLine (comments, blank lines, continuations)."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    line = start = 1
    skip_blank, appended, backslash, comment = True, False, False, False
    n = 0
    while n < len(text):
        c = text[n]
        n += 1
        eol = c in "\r\n"
        at_end = n == len(text)  # Java ends a line that ends the input, even an empty one
        if eol and c == "\r" and n < len(text) and text[n] == "\n":
            n += 1  # \r\n is one line end
        if comment:
            if eol:
                comment, skip_blank = False, True
                line += 1
            continue
        if skip_blank:
            if c in " \t\f" or (eol and not appended):
                line += eol
                continue
            skip_blank = appended = False
        if not buf and c in "#!":
            comment = True  # still on a new logical line: a comment
            continue
        if not eol:
            if not buf:
                start = line
            buf.append(c)
            backslash = not backslash if c == "\\" else False
            continue
        line += 1
        if not buf:
            skip_blank = True
        elif at_end:
            out.append((start, "".join(buf[:-1] if backslash else buf)))
            return out
        elif backslash:
            buf.pop()  # a backslash at the end of a line continues it
            skip_blank, appended, backslash = True, True, False
        else:
            out.append((start, "".join(buf)))
            buf = []
            skip_blank = True
    if buf:
        if backslash:
            buf.pop()
        out.append((start, "".join(buf)))
    return out


def _split(line: str) -> tuple[str, str]:
    """Key and raw value of a logical line (Java: the key ends at the first unescaped `=`, `:`
    or blank; blanks and one `=` or `:` separate it from the value)."""
    escaped, end, has_sep = False, len(line), False
    for n, c in enumerate(line):
        if not escaped and c in "=:":
            end, has_sep = n, True
            break
        if not escaped and c in " \t\f":
            end = n
            break
        escaped = c == "\\" and not escaped
    rest = line[end + 1 :] if end < len(line) else ""
    rest = rest.lstrip(" \t\f")
    if not has_sep and rest[:1] in ("=", ":") and rest:
        rest = rest[1:].lstrip(" \t\f")
    return line[:end], rest


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape(raw: str, where: str) -> str:
    out, n = [], 0
    while n < len(raw):
        c = raw[n]
        n += 1
        if c != "\\" or n >= len(raw):
            out.append(c)
            continue
        c = raw[n]
        n += 1
        if c == "u":
            digits = raw[n : n + 4]
            if not re.fullmatch(r"[0-9a-fA-F]{4}", digits):
                raise TorchServeError(
                    f"{where}: malformed \\uXXXX escape \\u{digits} (Java cannot read this "
                    "file); write four hex digits or a double backslash for a backslash"
                )
            out.append(chr(int(digits, 16)))
            n += 4
        else:
            out.append(_ESCAPES.get(c, c))
    # \uXXXX pairs of a character beyond the BMP become that character
    return "".join(out).encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def settings_for(
    config: UserConfig,
    *,
    workdir: Path,
    model_store: Path,
    env: tuple[tuple[str, str], ...] = (),
    cwd: Path | None = None,
) -> UserSettings:
    """The ServerSettings that start TorchServe from config with Packrat's model store and
    working directory. The user's addresses, ports, TLS, queues, envelopes and everything
    else are kept; ports and addresses they did not set get free loopback ones. Raises
    TorchServeError (one line, naming the file and line) for a setting Packrat cannot serve
    with."""
    cwd = Path.cwd() if cwd is None else cwd
    props = {p.key: p for p in config.effective()}
    warnings: list[str] = []

    def take(key: str) -> tuple[str, Property] | None:
        prop = props.pop(key, None)
        return None if prop is None else (prop.value.strip(), prop)

    listeners: list[Listener] = []
    ports: dict[str, int] = {}
    https: list[str] = []
    for api in APIS:
        if (got := take(f"{api}_address")) is None:
            continue
        value, prop = got
        where = f"{api}_address in {config.where(prop)}"
        addr = ApiAddress.parse(value, api, where)
        if ":" in addr.host:
            raise TorchServeError(f"{where}: TorchServe 0.12 takes no IPv6 address here ({value})")
        ports[api] = addr.port
        if (addr.scheme, addr.host) != ("http", "127.0.0.1"):
            listeners.append(Listener(api, addr.host, addr.scheme))
        if addr.scheme == "https":
            https.append(api)
        if not addr.is_loopback:
            warnings.append(_exposed(f"{api}_address={value}", config.where(prop), addr.host, api))
    for api in GRPC_APIS:
        if (got := take(f"{api}_address")) is not None:
            host, prop = got
            if host != "127.0.0.1":
                listeners.append(Listener(api, host))
            if not is_loopback(host):
                warnings.append(_exposed(f"{api}_address={host}", config.where(prop), host, api))
        if (got := take(f"{api}_port")) is not None:
            value, prop = got
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise TorchServeError(f"{api}_port in {config.where(prop)}: {value!r} is not a port")
            ports[api] = int(value)

    token_auth = True
    if (got := take("disable_token_authorization")) is not None:
        token_auth = got[0].lower() != "true"  # Java's Boolean.parseBoolean
        if not token_auth:
            warnings.append(
                f"disable_token_authorization=true ({config.where(got[1])}): the inference and "
                "management APIs take no token, so anyone who reaches them can register and "
                "delete models"
            )
    allowed_urls: tuple[str, ...] = ()
    if (got := take("allowed_urls")) is not None:
        allowed_urls = tuple(u for u in got[0].split(",") if u)
    overridden = {
        "enable_model_api": ("true", "Packrat registers and switches model versions"),
        "metrics_mode": ("prometheus", "Packrat's estimator reads the request counters"),
        "cpu_launcher_enable": ("false", "Packrat pins each worker to its own cores"),
    }
    for key, (wanted, why) in overridden.items():
        if (got := take(key)) is not None and got[0].lower() != wanted:
            warnings.append(f"{key}={got[0]} ({config.where(got[1])}) is overridden with "
                            f"{key}={wanted}: {why}")  # fmt: skip
    if (got := take("model_store")) is not None:
        warnings.append(f"model_store={got[0]} ({config.where(got[1])}) is replaced by Packrat's "
                        f"model store {model_store}")  # fmt: skip
    if (got := take("load_models")) is not None:
        warnings.append(f"load_models={got[0]} ({config.where(got[1])}) is left out: Packrat "
                        "registers the models it serves")  # fmt: skip
    for key in PATH_KEYS:
        if key in props and props[key].value.strip():
            prop = props[key]
            props[key] = Property(key, str(cwd / Path(prop.value.strip()).expanduser()), prop.line)
    tls = _tls_pin(config, props, https) if https else None
    settings = ServerSettings(
        workdir=workdir,
        model_store=model_store,
        ports=_ports(config, ports),
        env=env,
        token_auth=token_auth,
        properties=tuple((p.key, p.value) for p in props.values()),
        listeners=tuple(listeners),
        tls=tls,
        allowed_urls=allowed_urls,
    )
    return UserSettings(settings, tuple(warnings))


def _exposed(setting: str, where: str, host: str, api: str) -> str:
    place = "every interface" if host in ("0.0.0.0", "::") else host
    return (f"{setting} ({where}) listens on {place}: other machines can reach the {api} "
            "API (Packrat binds 127.0.0.1 by default)")  # fmt: skip


def _ports(config: UserConfig, chosen: dict[str, int]) -> Ports:
    """The user's ports, and free loopback ports for the others."""
    seen: dict[int, str] = {}
    for api, port in chosen.items():
        if port in seen:
            raise TorchServeError(
                f"{config.path}: {seen[port]} and {api} both use port {port}; TorchServe needs "
                "a port per API under Packrat"
            )
        seen[port] = api
    for _ in range(20):
        free = Ports.free().as_dict()
        merged = {**free, **chosen}
        if len(set(merged.values())) == len(merged):
            return Ports(**merged)
    raise TorchServeError("could not find free ports distinct from the configured ones")


def _tls_pin(config: UserConfig, props: dict[str, Property], https: list[str]) -> TlsPin:
    """The certificate the https APIs will present, as TorchServe picks it: the keystore if
    set, else certificate_file (with private_key_file)."""
    apis = " and ".join(https)
    if "keystore" in props:
        keystore = props["keystore"]
        password = props["keystore_pass"].value if "keystore_pass" in props else "changeit"
        kind = props["keystore_type"].value.strip() if "keystore_type" in props else "PKCS12"
        return _keystore_pin(Path(keystore.value), password, kind, config.where(keystore))
    if "certificate_file" in props and "private_key_file" in props:
        cert = props["certificate_file"]
        return TlsPin.from_pem(Path(cert.value), f"certificate_file in {config.where(cert)}")
    raise TorchServeError(
        f"{config.path}: the {apis} API is https but neither keystore nor private_key_file and "
        "certificate_file are set, so TorchServe would make a throwaway self-signed "
        "certificate Packrat cannot verify; set private_key_file and certificate_file"
    )


def _keystore_pin(keystore: Path, password: str, kind: str, where: str) -> TlsPin:
    """The first certificate of a Java keystore (TorchServe serves its first key entry)."""
    keytool = Path(find_java().home) / "bin" / "keytool"
    if not keytool.is_file():
        raise TorchServeError(
            f"keystore in {where}: reading it needs keytool, which {keytool.parent} lacks; "
            "set private_key_file and certificate_file instead (or install a JDK)"
        )
    try:
        out = subprocess.run(
            [str(keytool), "-list", "-rfc", "-keystore", str(keystore), "-storetype", kind,
             "-storepass:env", "PACKRAT_KEYSTORE_PASS"],
            env={"PACKRAT_KEYSTORE_PASS": password}, capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TorchServeError(f"keystore in {where}: keytool failed: {e}") from None
    # TorchServe serves the first key entry of the keystore's aliases, as keytool lists them.
    entries = [e for e in out.stdout.split("Alias name:") if "PrivateKeyEntry" in e]
    if out.returncode != 0 or not entries:
        message = " ".join((out.stdout + out.stderr).split())[:300] or "no key entry"
        raise TorchServeError(f"keystore in {where}: keytool cannot list {keystore}: {message}")
    try:
        return TlsPin.from_pem_text(entries[0], f"{keystore} (keystore in {where})")
    except ValueError as e:
        raise TorchServeError(f"keystore in {where}: no certificate in keytool's list ({e})") from None
