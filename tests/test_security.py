"""Security defaults: token authorization on, loopback listeners only, registration only from
the model store, run-directory files the user's alone, no YAML loaded unsafely and no shell
command built from strings anywhere in Packrat. (Token expiry and refresh:
tests/test_torchserve_client.py.)"""

import ast
import ipaddress
import os
import stat
from pathlib import Path

import psutil
import pytest
import requests

from packrat.errors import TorchServeError
from packrat.serving.rundir import RunDir
from packrat.torchserve import TorchServeClient, load_settings
from tests.serving import status

ROOT = Path(__file__).resolve().parents[1]
# every module of every layer (packrat/*/…), the handler among them, and the scripts
SOURCES = sorted([*ROOT.glob("packrat/**/*.py"), *ROOT.glob("scripts/*.py")])


def test_the_scan_covers_every_layer():
    scanned = {p.relative_to(ROOT).parts[1] for p in SOURCES if p.parts[-2] != "scripts"}
    assert {"core", "model", "measure", "worker", "torchserve", "serving", "bench", "cli"} <= scanned
    assert ROOT / "packrat" / "worker" / "packrat_handler.py" in SOURCES


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_shell_strings_and_no_unsafe_yaml(path):
    tree = ast.parse(path.read_text(), str(path))
    for node, owner, name in _calls(tree):
        where = f"{path.name}:{node.lineno}"
        assert (owner, name) not in {("os", "system"), ("os", "popen")}, where
        for kw in node.keywords:
            if kw.arg == "shell":
                assert isinstance(kw.value, ast.Constant) and kw.value.value is False, where
        if owner == "yaml":
            assert name in {"safe_load", "safe_load_all", "safe_dump", "dump"}, where
        if owner == "pickle":
            assert name not in {"load", "loads"}, where


@pytest.mark.integration
def test_served_defaults_are_closed(served):
    proc, run, example = served
    rd = RunDir(run)
    settings = load_settings(rd.torchserve)
    client = TorchServeClient(settings)
    st = status(run)

    # every listening socket of the frontend and its workers is on loopback
    pids = [st["torchserve_pid"], *psutil.Process(st["torchserve_pid"]).children(recursive=True)]
    listening = []
    for p in pids:
        proc_ = p if isinstance(p, psutil.Process) else psutil.Process(p)
        for c in proc_.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                ip = ipaddress.ip_address(c.laddr.ip)  # Java: ::ffff:127.0.0.1, dual stack
                listening.append(str(getattr(ip, "ipv4_mapped", None) or ip))
    assert len(listening) >= 5  # inference, management, metrics, two gRPC
    assert set(listening) == {"127.0.0.1"}, listening

    # token authorization: no key or a wrong one is refused, on both APIs (TorchServe 0.12
    # answers 400 with an InvalidKeyException)
    body = example.read_bytes()
    for url, method in ((client.inference_url + "/predictions/small-cnn", "POST"),
                        (client.management_url + "/models", "GET")):
        for headers in ({}, {"Authorization": "Bearer not-the-key"}):
            r = requests.request(method, url, data=body, headers=headers, timeout=30)
            assert r.status_code in (400, 401) and "InvalidKeyException" in r.text, r.text
    assert client.predict("small-cnn", body).status_code == 200

    # registration only from the model store: no download, no file outside it
    for url in ("https://127.0.0.1:9/model.mar", "file:///etc/passwd",
                f"file://{run.parent / 'archives' / 'small-cnn.mar'}"):
        with pytest.raises(TorchServeError, match="allowed URL"):
            client.register(url, model_name="intruder", batch_size=1, max_batch_delay_ms=10,
                            initial_workers=1)
    assert "intruder" not in client.models()

    # files of the run directory (plans, state, key file, TorchServe's logs) are the user's
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
    seen = 0
    for path in run.rglob("*"):
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} has mode {oct(mode)}"
        seen += 1
    assert seen > 10
    assert (rd.torchserve / "key_file.json").is_file()
