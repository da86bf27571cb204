"""Attaching to a TorchServe the user started (packrat serve --attach): a real `torchserve
--start --ts-config THEIRS --model-store DIR --ncs` in its own working directory, and
check_attached's one-line answers for a right key, a wrong key, nothing listening, swapped
URLs, a read-only model store and a server without request counters. Nothing here starts or
stops the attached server except the fixture that plays the user."""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from packrat.errors import TorchServeError
from packrat.model.archive import build_zoo_archive
from packrat.torchserve import (
    AttachedServer,
    Ports,
    attached_server,
    check_attached,
    find_java,
    torchserve_command,
)
from tests.conftest import TORCHSERVE, has_torchserve, require, require_now
from tests.serving import loopback_properties

needs_torchserve = require(has_torchserve(), TORCHSERVE)


@dataclass(frozen=True)
class UserServer:
    cwd: Path  # where the user ran torchserve: key_file.json is written here
    store: Path
    ports: Ports
    pid: int  # the java frontend

    def url(self, api: str) -> str:
        return f"http://127.0.0.1:{self.ports.as_dict()[api]}"

    def attached(self, **overrides) -> AttachedServer:
        args = {"management": self.url("management"), "inference": self.url("inference"),
                "metrics": self.url("metrics"), "model_store": self.store,
                "key_file": self.cwd / "key_file.json"}  # fmt: skip
        return attached_server(**{**args, **overrides})


def start_user_torchserve(root: Path, extra: str) -> UserServer:
    """What a user does: their own config.properties and `torchserve --start`, in a fresh
    directory (TMPDIR there too, so its pid file is its own and `--stop` stops only it)."""
    cwd, store = root / "cwd", root / "store"
    (cwd / "tmp").mkdir(parents=True)
    store.mkdir()
    ports = Ports.free()
    config = cwd / "theirs.properties"
    config.write_text(loopback_properties(ports, "enable_model_api=true\n" + extra))
    with open(root / "launcher.log", "w") as log:  # not a pipe: java inherits it
        subprocess.run([torchserve_command(), "--start", "--ts-config", config,
                        "--model-store", store, "--ncs"],
                       cwd=cwd, env=user_env(cwd), stdin=subprocess.DEVNULL, stdout=log,
                       stderr=subprocess.STDOUT, check=True, timeout=60)  # fmt: skip
    pid = int((cwd / "tmp" / ".model_server.pid").read_text())
    server = UserServer(cwd, store, ports, pid)
    ready = server.attached(key_file=None)  # wait for the listeners; keys checked later
    deadline = time.monotonic() + 60
    while True:
        assert psutil.pid_exists(pid), (root / "launcher.log").read_text()[-2000:]
        try:
            check_attached(ready)
            break  # token authorization off: it answers all
        except TorchServeError as e:
            if "wants a key" in str(e) and (cwd / "key_file.json").exists():
                break
            assert time.monotonic() < deadline, f"TorchServe did not come up: {e}"
            time.sleep(0.1)
    return server


def user_env(cwd: Path) -> dict[str, str]:
    tmp = str(cwd / "tmp")
    return {**os.environ, "JAVA_HOME": str(find_java().home), "TMPDIR": tmp, "TEMP": tmp}


def stop_user_torchserve(server: UserServer) -> None:
    assert psutil.pid_exists(server.pid), "the attached server was stopped by something else"
    subprocess.run([torchserve_command(), "--stop"], cwd=server.cwd, env=user_env(server.cwd),
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)  # fmt: skip
    try:
        proc = psutil.Process(server.pid)
        children = proc.children(recursive=True)
        _gone, alive = psutil.wait_procs([proc, *children], timeout=30)
        for p in alive:
            p.kill()
    except psutil.NoSuchProcess:
        pass
    assert not psutil.pid_exists(server.pid) or psutil.Process(server.pid).status() == "zombie"


@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    require_now(has_torchserve(), TORCHSERVE)
    server = start_user_torchserve(tmp_path_factory.mktemp("user"), "metrics_mode=prometheus\n")
    try:
        yield server
    finally:
        stop_user_torchserve(server)


def one_line_error(server: AttachedServer) -> str:
    with pytest.raises(TorchServeError) as e:
        check_attached(server)
    text = str(e.value)
    assert "\n" not in text
    return text


# -- without a server ---------------------------------------------------------------------


def test_describing_an_attached_server(tmp_path):
    server = attached_server(management="http://127.0.0.1:8081", inference="http://localhost:8080/",
                             metrics="http://127.0.0.1:8082", model_store=tmp_path)  # fmt: skip
    assert server.endpoints().key_file is None and server.model_store == tmp_path.resolve()
    assert server.client().inference_url == "http://localhost:8080"
    assert AttachedServer.from_json(json.loads(json.dumps(server.to_json()))) == server
    with pytest.raises(TorchServeError, match="192.0.2.1 is not this host"):
        attached_server(management="http://192.0.2.1:8081", inference="http://127.0.0.1:8080",
                        metrics="http://127.0.0.1:8082", model_store=tmp_path)  # fmt: skip
    with pytest.raises(TorchServeError, match="--inference https://127.0.0.1:8443 is https: give "
                                              "the certificate"):
        attached_server(management="http://127.0.0.1:8081", inference="https://127.0.0.1:8443",
                        metrics="http://127.0.0.1:8082", model_store=tmp_path)  # fmt: skip
    with pytest.raises(TorchServeError, match="--metrics 127.0.0.1:8082: '127.0.0.1:8082' is not an "
                                              "http:// or https:// address"):
        attached_server(management="http://127.0.0.1:8081", inference="http://127.0.0.1:8080",
                        metrics="127.0.0.1:8082", model_store=tmp_path)  # fmt: skip


def test_nothing_listens(tmp_path):
    free = Ports.free()
    server = attached_server(management=f"http://127.0.0.1:{free.management}",
                             inference=f"http://127.0.0.1:{free.inference}",
                             metrics=f"http://127.0.0.1:{free.metrics}", model_store=tmp_path)  # fmt: skip
    assert one_line_error(server) == (
        f"nothing answers at http://127.0.0.1:{free.management} (Connection refused): start "
        "TorchServe first or fix --management"
    )
    with pytest.raises(TorchServeError, match="model store .*nope does not exist"):
        check_attached(attached_server(management="http://127.0.0.1:1", inference="http://127.0.0.1:2",
                                       metrics="http://127.0.0.1:3", model_store=tmp_path / "nope"))  # fmt: skip


# -- with a TorchServe the user started ---------------------------------------------------


@pytest.mark.integration
@needs_torchserve
def test_check_passes_with_the_right_key(theirs):
    started = time.monotonic()
    check = check_attached(theirs.attached())
    assert time.monotonic() - started < 2
    assert check.request_counters is True and check.models == ()
    assert psutil.pid_exists(theirs.pid)


@pytest.mark.integration
@needs_torchserve
def test_the_attached_client_registers_and_predicts(theirs, tmp_path):
    archive = build_zoo_archive("small-cnn", tmp_path)
    shutil.copy(archive.mar_path, theirs.store / "small-cnn.mar")
    client = theirs.attached().client()
    client.register("small-cnn.mar", model_name="small-cnn", batch_size=1, max_batch_delay_ms=5,
                    initial_workers=1)  # fmt: skip
    try:
        r = client.predict("small-cnn", archive.example_path.read_bytes())
        assert r.status_code == 200 and len(r.json()["output"]) > 0, r.text
        assert check_attached(theirs.attached()).models == ("small-cnn",)
    finally:
        client.unregister("small-cnn", client.versions("small-cnn")[0].version)


@pytest.mark.integration
@needs_torchserve
def test_a_wrong_key_file(theirs, tmp_path):
    keys = json.loads((theirs.cwd / "key_file.json").read_text())
    wrong = tmp_path / "key_file.json"
    wrong.write_text(json.dumps({api: {**entry, "key": "not-the-key"} for api, entry in keys.items()}))
    error = one_line_error(theirs.attached(key_file=wrong))
    assert error.startswith(f"the management API at {theirs.url('management')} refused the key "
                            f"from {wrong}: Token Authentication failed.")  # fmt: skip
    assert error.endswith("give the key_file.json that TorchServe wrote into the directory it "
                          "was started from (--key-file)")  # fmt: skip
    assert one_line_error(theirs.attached(key_file=tmp_path / "none.json")).startswith(
        f"cannot read TorchServe's keys from {tmp_path / 'none.json'}")
    assert one_line_error(theirs.attached(key_file=None)).startswith(
        f"the management API at {theirs.url('management')} wants a key")
    assert check_attached(theirs.attached()).request_counters  # the right key still works


@pytest.mark.integration
@needs_torchserve
def test_swapped_urls_and_a_wrong_store(theirs, tmp_path):
    swapped = theirs.attached(management=theirs.url("inference"), inference=theirs.url("management"))
    assert one_line_error(swapped) == (
        f"{theirs.url('inference')} is TorchServe's inference API, not its management API: swap "
        "--management and --inference"
    )
    assert one_line_error(theirs.attached(model_store=tmp_path)) == (
        f"the TorchServe at {theirs.url('management')} serves model store {theirs.store}, not "
        f"{tmp_path}: pass --model-store {theirs.store}"
    )


CHECK_IN_A_CHILD = """
import json, sys
from packrat.errors import TorchServeError
from packrat.torchserve import AttachedServer, check_attached
try:
    check_attached(AttachedServer.from_json(json.loads(sys.argv[1])))
except TorchServeError as e:
    sys.exit(str(e))
"""


@pytest.mark.integration
@needs_torchserve
def test_a_read_only_model_store(theirs):
    command = [sys.executable, "-c", CHECK_IN_A_CHILD, json.dumps(theirs.attached().to_json())]
    if os.geteuid() == 0:  # root writes anywhere: check as root without CAP_DAC_OVERRIDE
        require_now(shutil.which("setpriv"), "setpriv (util-linux), to drop root's CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    mode = theirs.store.stat().st_mode
    theirs.store.chmod(0o555)
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    finally:
        theirs.store.chmod(mode)
    assert child.returncode == 1, child.stderr
    assert child.stderr.strip() == (
        f"model store {theirs.store} is not writable by this user (uid {os.geteuid()}): "
        "Permission denied; Packrat writes a directory there per model version, so run it as a "
        "user who may write there"
    )


@pytest.mark.integration
@needs_torchserve
def test_no_request_counters_in_log_mode(tmp_path):
    # metrics_mode=log (TorchServe's default): /metrics answers 200 with an empty body. Token
    # authorization off too: no key file to give.
    server = start_user_torchserve(tmp_path, "metrics_mode=log\ndisable_token_authorization=true\n")
    try:
        check = check_attached(server.attached(key_file=None))
        assert check.request_counters is False and check.models == ()
    finally:
        stop_user_torchserve(server)
