"""A user's own config.properties (packrat serve --ts-config): parsed as Java parses it, turned
into ServerSettings that keep the user's settings and add Packrat's, with warnings; then a real
TorchServe started from it (http, and https with a PEM certificate and with a keystore)."""

import json
import random
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from packrat.errors import TorchServeError
from packrat.torchserve import (
    SERVER_FILE,
    Listener,
    Ports,
    Property,
    ServerSettings,
    TlsPin,
    TorchServeClient,
    find_java,
    load_settings,
    read_user_config,
    server_processes,
    settings_for,
    start_server,
    stop_server,
)
from packrat.torchserve.config import escape_key, escape_value
from packrat.torchserve.userconfig import parse_properties
from tests.conftest import TORCHSERVE, has_torchserve, require

needs_torchserve = require(has_torchserve(), TORCHSERVE)


def props(text: str) -> list[tuple[str, str, int]]:
    return [(p.key, p.value, p.line) for p in parse_properties(text)]


# -- parsing ----------------------------------------------------------------------------


def test_separators_comments_and_continuations():
    text = (
        "# a comment that ends with a backslash does not continue \\\n"
        "! so is this\n"
        "a=1\n"
        "b : 2\n"
        "c 3\n"
        "  d=x, \\\n"
        "      y, \\\n"
        "   z\n"
        "\n"
        "e\n"
        "f=  spaced value  \n"
        "g=\\\n"
        "# not a comment: the continuation of g\n"
        "h\\=i\\:j\\ k=v\\=w\r\n"
        "last=end\\"
    )
    assert props(text) == [
        ("a", "1", 3), ("b", "2", 4), ("c", "3", 5), ("d", "x, y, z", 6), ("e", "", 10),
        ("f", "spaced value  ", 11), ("g", "# not a comment: the continuation of g", 12),
        ("h=i:j k", "v=w", 14), ("last", "end", 15),
    ]  # fmt: skip


def test_escapes():
    text = "tab=a\\tb\nuni=\\u00e9t\\u00e9\nsmile=\\ud83d\\ude00\nkeep=C:\\\\dir\\\\f\nother=\\q\n"
    assert props(text) == [
        ("tab", "a\tb", 1), ("uni", "été", 2), ("smile", "\U0001f600", 3),
        ("keep", "C:\\dir\\f", 4), ("other", "q", 5),
    ]  # fmt: skip


def test_written_properties_read_back():
    # What render_config writes (escape_key/escape_value) is what Java reads back.
    rng = random.Random(7)
    alphabet = " =:#!\\\t\nabcé€\U0001f600"
    for _ in range(300):
        key = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        line = f"{escape_key(key)}={escape_value(value)}"
        assert line.isascii() and "\n" not in line
        assert props(line) == [(key, value, 1)]


def test_a_bad_file_and_a_missing_file(tmp_path):
    bad = tmp_path / "bad.properties"
    bad.write_text("a=1\n# fine\nb=\\u12g4\n")
    with pytest.raises(TorchServeError) as e:
        read_user_config(bad)
    assert str(e.value).startswith(f"{bad}:3: malformed \\uXXXX escape")
    assert "\n" not in str(e.value)
    binary = tmp_path / "binary.properties"
    binary.write_bytes(b"a=1\nb=\0\n")
    with pytest.raises(TorchServeError, match=f"{binary}:2: a NUL byte"):
        read_user_config(binary)
    missing = tmp_path / "missing.properties"
    with pytest.raises(TorchServeError, match=f"cannot read TorchServe config {missing}: No such file"):
        read_user_config(missing)
    with pytest.raises(TorchServeError, match="cannot read TorchServe config"):
        read_user_config(tmp_path)  # a directory


def test_read_user_config_keeps_order_and_the_last_repeat(tmp_path):
    path = tmp_path / "c.properties"
    path.write_bytes("service_envelope=kservev2\njob_queue_size=5\nname=caf\xe9\njob_queue_size=9\n"
                     .encode("latin-1"))  # Java reads ISO 8859-1  # fmt: skip
    config = read_user_config(path)
    assert config.service_envelope == "kservev2"
    assert config.get("job_queue_size") == "9"
    assert config.effective() == (
        Property("service_envelope", "kservev2", 1), Property("job_queue_size", "9", 4),
        Property("name", "café", 3),
    )  # fmt: skip
    path.write_text("job_queue_size=5\n")
    assert read_user_config(path).service_envelope is None


# -- settings from a user config ---------------------------------------------------------


def user_settings(tmp_path, text: str, cwd: Path | None = None):
    path = tmp_path / "theirs.properties"
    path.write_text(text)
    return settings_for(read_user_config(path), workdir=tmp_path / "work",
                        model_store=tmp_path / "store", cwd=cwd)  # fmt: skip


def test_settings_keep_the_users_and_warn_where_defaults_weaken(tmp_path):
    free = Ports.free()
    got = user_settings(tmp_path, (
        f"inference_address=http://0.0.0.0:{free.inference}\n"
        f"management_address=http://127.0.0.1:{free.management}\n"
        "disable_token_authorization=true\n"
        "enable_model_api=false\n"
        "metrics_mode=log\n"
        "model_store=/srv/models\n"
        "allowed_urls=https://models.example/.*\n"
        "job_queue_size=500\n"
        "load_models=all\n"
    ))  # fmt: skip
    s, where = got.settings, tmp_path / "theirs.properties"
    assert (s.ports.inference, s.ports.management) == (free.inference, free.management)
    assert s.listeners == (Listener("inference", "0.0.0.0"),)
    assert s.endpoints().inference.connect_url == f"http://127.0.0.1:{free.inference}"
    assert s.token_auth is False and s.endpoints().key_file is None
    assert s.allowed_urls == ("https://models.example/.*",)
    assert s.properties == (("job_queue_size", "500"),)
    assert s.model_store == tmp_path / "store"
    assert all("\n" not in w for w in got.warnings)
    assert got.warnings == (
        (f"inference_address=http://0.0.0.0:{free.inference} ({where}:1) listens on every "
        "interface: other machines can reach the inference API (Packrat binds 127.0.0.1 by "
        "default)"),
        (f"disable_token_authorization=true ({where}:3): the inference and management APIs take "
        "no token, so anyone who reaches them can register and delete models"),
        (f"enable_model_api=false ({where}:4) is overridden with enable_model_api=true: Packrat "
        "registers and switches model versions"),
        (f"metrics_mode=log ({where}:5) is overridden with metrics_mode=prometheus: Packrat's "
        "estimator reads the request counters"),
        (f"model_store=/srv/models ({where}:6) is replaced by Packrat's model store "
        f"{tmp_path / 'store'}"),
        f"load_models=all ({where}:9) is left out: Packrat registers the models it serves",
    )
    # Nothing to say about a config that keeps Packrat's defaults.
    assert user_settings(tmp_path, "enable_model_api=true\nmetrics_mode=prometheus\n").warnings == ()


@pytest.mark.parametrize("line, message", [
    ("inference_address=ftp://127.0.0.1:80", (r"inference_address in .*:1: 'ftp://127\.0\.0\.1:80' "
                                             r"is not an http:// or https:// address")),
    ("management_address=unix:/tmp/ts.sock", "unix sockets are not supported"),
    ("metrics_address=http://127.0.0.1:99999", "port 99999 .* is not in 1..65535"),
    ("grpc_inference_port=seven", "grpc_inference_port in .*:1: 'seven' is not a port"),
    ("inference_address=https://127.0.0.1:8443", "https but neither keystore nor private_key_file"),
    ("certificate_file=c.pem\nprivate_key_file=k.pem\ninference_address=https://127.0.0.1:8443",
     "certificate_file in .*:1: cannot read certificate .*c.pem"),
])  # fmt: skip
def test_settings_that_make_packrat_impossible(tmp_path, line, message):
    with pytest.raises(TorchServeError, match=message) as e:
        user_settings(tmp_path, line + "\n")
    assert "\n" not in str(e.value)


def test_two_apis_on_one_port_and_defaults_of_an_address_without_port(tmp_path):
    with pytest.raises(TorchServeError, match="inference and management both use port 9000"):
        user_settings(tmp_path, "inference_address=http://127.0.0.1:9000\n"
                                "management_address=http://127.0.0.1:9000\n")  # fmt: skip
    s = user_settings(tmp_path, "management_address=http://127.0.0.1\n").settings
    assert s.ports.management == 8081  # TorchServe's own default for the management API


def test_relative_paths_and_vmargs(tmp_path):
    s = user_settings(tmp_path, "workflow_store=wf\nvmargs=-Xmx1g\n", cwd=tmp_path / "here").settings
    assert dict(s.properties) == {"workflow_store": str(tmp_path / "here" / "wf"), "vmargs": "-Xmx1g"}


def test_server_json_round_trip(tmp_path):
    pin = TlsPin("ab" * 32, "cert.pem")
    settings = ServerSettings(
        workdir=tmp_path, model_store=tmp_path / "store", ports=Ports.free(),
        properties=(("job_queue_size", "7"),), tls=pin, allowed_urls=("file:///m/.*",),
        listeners=(Listener("inference", "0.0.0.0", "https"), Listener("grpc_management", "::1")),
    )  # fmt: skip
    assert ServerSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings
    # a server.json written before listeners, tls and allowed_urls existed
    old = {k: v for k, v in settings.to_json().items() if k not in ("listeners", "tls", "allowed_urls")}
    (tmp_path / SERVER_FILE).write_text(json.dumps(old))
    assert load_settings(tmp_path).endpoints().inference.url.startswith("http://127.0.0.1:")
    with pytest.raises(TorchServeError, match="properties may not set model_store"):
        ServerSettings(tmp_path, tmp_path, Ports.free(), properties=(("model_store", "/x"),))
    with pytest.raises(TorchServeError, match="inference API of .* is https: give the server's certificate"):
        ServerSettings(tmp_path, tmp_path, Ports.free(), listeners=(Listener("inference", "127.0.0.1", "https"),))


# -- a real TorchServe from a user config ------------------------------------------------


def started(settings: ServerSettings):
    """Start settings' server; return (process, client, the rendered config as a dict)."""
    proc = start_server(settings)
    rendered = {p.key: p.value for p in parse_properties(
        (settings.workdir / "config.properties").read_text())}  # fmt: skip
    return proc, TorchServeClient(settings), rendered


def stopped(proc, settings):
    stop_server(proc)
    assert server_processes(settings.resolved().workdir) == []


@pytest.mark.integration
@needs_torchserve
def test_a_server_from_a_user_config(tmp_path):
    free = Ports.free()
    (tmp_path / "store").mkdir()
    got = user_settings(tmp_path, (
        "# the user's own TorchServe settings\n"
        f"inference_address=http://127.0.0.1:{free.inference}\n"
        f"management_address: http://localhost:{free.management}\n"
        f"grpc_inference_port {free.grpc_inference}\n"
        "job_queue_size=7\n"
        "service_envelope=kservev2\n"
        "vmargs=-Xmx700m \\\n    -XX:+UseSerialGC\n"
        "metrics_mode=log\n"
    ))  # fmt: skip
    settings = got.settings
    assert [w.split(" (")[0] for w in got.warnings] == ["metrics_mode=log"]
    proc, client, rendered = started(settings)
    try:
        assert client.ping() is True
        assert client.management_url == f"http://localhost:{free.management}"
        assert rendered["inference_address"] == f"http://127.0.0.1:{free.inference}"
        assert rendered["management_address"] == f"http://localhost:{free.management}"
        assert rendered["grpc_inference_port"] == str(free.grpc_inference)
        assert rendered["job_queue_size"] == "7" and rendered["service_envelope"] == "kservev2"
        assert rendered["metrics_mode"] == "prometheus" and rendered["enable_model_api"] == "true"
        assert rendered["vmargs"] == (f"-Xmx700m -XX:+UseSerialGC -Dlog4j.configurationFile="
                                      f"file://{settings.workdir.resolve()}/log4j2.xml")  # fmt: skip
        # the launcher hands the user's vmargs to the JVM
        assert {"-Xmx700m", "-XX:+UseSerialGC"} <= set(psutil.Process(proc.frontend_pid).cmdline())
        assert client.models() == ()
        assert load_settings(settings.workdir) == settings.resolved()
    finally:
        stopped(proc, settings)


def openssl_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for CN=name (not this host's name) and its key (PKCS#8 PEM)."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return key, cert


@pytest.mark.integration
@needs_torchserve
@require(shutil.which("openssl"), "openssl (to make a test certificate)")
def test_https_with_a_certificate_for_another_name(tmp_path):
    _key, cert = openssl_certificate(tmp_path, "not-this-host.example")
    (tmp_path / "store").mkdir()
    free = Ports.free()
    settings = user_settings(tmp_path, (
        f"inference_address=https://127.0.0.1:{free.inference}\n"
        f"management_address=https://127.0.0.1:{free.management}\n"
        "private_key_file=key.pem\ncertificate_file=cert.pem\n"
    ), cwd=tmp_path).settings  # fmt: skip
    assert settings.tls == TlsPin.from_pem(cert) and settings.tls.source == str(cert)
    proc, client, _ = started(settings)
    try:
        assert client.inference_url.startswith("https://") and client.metrics_url.startswith("http://")
        assert client.ping() is True and client.models() == ()  # the pin replaces the name check
        assert client.metrics() == {}
        # a server that presents another certificate is refused before any key is sent
        wrong = TlsPin("00" * 32, "some other certificate")
        impostor = TorchServeClient(replace(client.endpoints, tls=wrong), timeout_s=5)
        with pytest.raises(TorchServeError, match=r"GET https://127\.0\.0\.1:\d+/models\?limit=100 "
                                                  r"-> TLS handshake failed: .*some other certificate"):
            impostor.models()
    finally:
        stopped(proc, settings)


def has_keytool() -> bool:
    try:
        return (Path(find_java().home) / "bin" / "keytool").is_file()
    except TorchServeError:
        return False


@pytest.mark.integration
@needs_torchserve
@require(has_keytool(), "keytool (a JDK) to make a test keystore")
def test_https_with_a_keystore(tmp_path):
    keytool = Path(find_java().home) / "bin" / "keytool"
    subprocess.run([keytool, "-genkeypair", "-keystore", tmp_path / "ks.p12", "-storetype", "PKCS12",
                    "-storepass", "s3cret", "-alias", "ts", "-keyalg", "RSA", "-keysize", "2048",
                    "-dname", "CN=elsewhere", "-validity", "2"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    (tmp_path / "store").mkdir()
    free = Ports.free()
    settings = user_settings(tmp_path, (
        f"management_address=https://127.0.0.1:{free.management}\n"
        "keystore=ks.p12\nkeystore_pass=s3cret\nkeystore_type=PKCS12\n"
    ), cwd=tmp_path).settings  # fmt: skip
    assert settings.tls is not None and "ks.p12" in settings.tls.source
    proc, client, _ = started(settings)
    try:
        assert client.management_url.startswith("https://") and client.models() == ()
    finally:
        stopped(proc, settings)
    with pytest.raises(TorchServeError, match="keytool cannot list .*ks.p12"):
        user_settings(tmp_path, f"metrics_address=https://127.0.0.1:{free.metrics}\n"
                                "keystore=ks.p12\nkeystore_pass=wrong\n", cwd=tmp_path)  # fmt: skip
