"""The user's TorchServe: `packrat serve --ts-config THEIRS` starts TorchServe from the user's
config.properties (their ports, queue size and KServe v2 envelope kept), and `packrat serve
--attach` manages a TorchServe the user started with plain `torchserve --start`: it switches
under load losslessly, stops, and leaves that TorchServe serving one pinned version, whose
workers pin themselves again when TorchServe restarts them."""

import json
import os
import subprocess
import sys

import psutil
import pytest

from packrat.errors import PackratError
from packrat.measure.loadgen import ClosedLoop
from packrat.serving.rundir import RunDir
from packrat.torchserve import Ports
from tests import user_archives
from tests.conftest import TORCHSERVE, has_torchserve, require_now
from tests.serving import CORES, N_SERVE, assert_pinned, loopback_properties, packrat, start_serve, status, stop_serve, wait_answered, wait_for
from tests.test_attach_endpoints import start_user_torchserve, stop_user_torchserve

pytestmark = pytest.mark.integration


def _serve(tmp_path, run, *args, name):
    return start_serve(run, name, "--no-calibrate", "--max-batch", 4, "--interval", 0.5,
                       "--cores", N_SERVE, *args, log=tmp_path / "serve.log",
                       env={**os.environ, "PACKRAT_CACHE_DIR": str(tmp_path / "cache")})


def _pinned_like_its_plan(run, name):
    now = status(run)["models"][name]
    shape = now["plan"]["instances"]
    assert_pinned(now, len(shape), shape[0]["threads"])
    return now


def test_ts_config_kservev2(tmp_path):
    require_now(has_torchserve(), TORCHSERVE)
    require_now(len(CORES) >= N_SERVE, f"{N_SERVE} usable cores")
    archive = user_archives.build_kserve(tmp_path / "archives")
    ports = Ports.free()
    config = tmp_path / "theirs.properties"
    config.write_text(loopback_properties(
        ports, "job_queue_size=50\nservice_envelope=kservev2\n"))
    before = config.read_text()
    run = tmp_path / "run"
    proc = _serve(tmp_path, run, "--ts-config", config, "--models", f"kserve={archive.mar}",
                  "--sample", f"kserve={archive.sample}", name="kserve")
    try:
        client = RunDir(run).client()
        assert client.inference_url == f"http://127.0.0.1:{ports.inference}"  # their port
        rendered = (RunDir(run).torchserve / "config.properties").read_text()
        assert "job_queue_size=50" in rendered and "service_envelope=kservev2" in rendered
        now = _pinned_like_its_plan(run, "kserve")
        # the envelope answers the first request of a batch only: profiled through it, the
        # handler takes batches of 1, and no plan goes above
        assert all(i["batch"] == 1 for i in now["plan"]["instances"])
        r = client.predict("kserve", user_archives.kserve_v2(3))
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["id"] == "req-3" and answer["model_name"] == "kserve"
        expected = sum((3 + i) * (0.5 + 1.5 * i / 7) for i in range(8))
        assert abs(answer["outputs"][0]["data"][0] - expected) < 1e-3
    finally:
        stop_serve(proc, run)
    assert config.read_text() == before  # the user's file is untouched


@pytest.fixture
def theirs(tmp_path):
    require_now(has_torchserve(), TORCHSERVE)
    require_now(len(CORES) >= N_SERVE, f"{N_SERVE} usable cores")
    server = start_user_torchserve(tmp_path / "user", "metrics_mode=prometheus\n")
    try:
        yield server
    finally:
        stop_user_torchserve(server)


def _attach_args(server, archive):
    return ["--attach", "--management", server.url("management"), "--inference",
            server.url("inference"), "--metrics", server.url("metrics"), "--model-store",
            server.store, "--key-file", server.cwd / "key_file.json",
            "--models", f"m={archive.mar.name}", "--sample", f"m={archive.sample}"]


def test_attach_switch_stop_and_the_user_torchserve_serves_on(tmp_path, theirs):
    archive = user_archives.build("func_json", theirs.store)  # the archive in their store
    run = tmp_path / "run"
    proc = _serve(tmp_path, run, *_attach_args(theirs, archive), name="m")
    client = RunDir(run).client()
    assert status(run)["attached"] == theirs.url("management")
    assert status(run)["torchserve_pid"] is None
    _pinned_like_its_plan(run, "m")
    body = archive.sample.read_bytes()
    load = ClosedLoop(lambda: client.predict("m", body, timeout_s=60), timeout_s=60)
    load.set_concurrency(4)
    try:
        wait_answered(load, 20)
        for instances, threads, batch in [(2, 1, 2), (1, 2, 4)]:
            out = packrat("reconfigure", "--run-dir", run, "--model", "m", "--instances",
                          instances, "--threads", threads, "--batch", batch)
            assert out.returncode == 0, out.stderr
            assert_pinned(status(run)["models"]["m"], instances, threads)
            wait_answered(load, load.result.answered + 20)
        said = stop_serve(proc, run)
        assert "keeps serving" in said
        wait_answered(load, load.result.answered + 20)  # serving on, through the stop
    finally:
        result = load.stop()
        if proc.poll() is None:  # the test failed before its stop: leave nothing running
            proc.kill()
    assert result.failures == [] and result.unanswered == []
    assert psutil.pid_exists(theirs.pid)  # the user's TorchServe runs on
    live = status(run)["models"]["m"]  # status works the same after the stop
    assert status(run)["controller_pid"] is None
    versions = client.versions("m")
    assert [v.version for v in versions] == [live["version"]]  # one version, Packrat's last
    assert_pinned(live, 1, 2)

    # A worker that dies after Packrat stopped is restarted by TorchServe and pins itself.
    old_pid = live["plan"]["instances"][0]["pid"]
    psutil.Process(old_pid).kill()

    def repinned():
        now = status(run)["models"]["m"]
        pid = now["plan"]["instances"][0]["pid"]
        return now if pid and pid != old_pid else None

    assert_pinned(wait_for(repinned, timeout=120, what="a restarted worker"), 1, 2)
    r = client.predict("m", body)
    assert r.status_code == 200 and "scores" in r.json()


def test_attach_errors_are_one_line_and_start_nothing(tmp_path, theirs):
    archive = user_archives.build("func_json", theirs.store)
    args = _attach_args(theirs, archive)
    store_before = sorted(p.name for p in theirs.store.iterdir())
    cases = {
        "nothing listens": (["--management", f"http://127.0.0.1:{Ports.free().management}"],
                            "nothing answers"),
        "wrong key": (["--key-file", _wrong_key(tmp_path)], "refused"),
        "ports with attach": (["--inference-port", "8080"], "does not go with --attach"),
        "ts-config with attach": (["--ts-config", tmp_path / "x.properties"],
                                  "does not go with --attach"),
    }
    for what, (change, words) in cases.items():
        argv = list(args)
        for flag, value in zip(change[::2], change[1::2]):
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        run = tmp_path / f"run-{what.replace(' ', '-')}"
        out = subprocess.run([sys.executable, "-m", "packrat.cli", "serve", "--run-dir", run,
                              *map(str, argv)], capture_output=True, text=True, timeout=120)
        lines = out.stderr.strip().splitlines()
        assert out.returncode != 0 and lines, (what, out.stderr)
        assert lines[-1].startswith("packrat serve: error: ") and words in lines[-1], (what, out.stderr)
        assert "Traceback" not in out.stderr
    assert psutil.pid_exists(theirs.pid)
    assert sorted(p.name for p in theirs.store.iterdir()) == store_before  # nothing written


def _wrong_key(tmp_path):
    path = tmp_path / "wrong_key.json"
    path.write_text(json.dumps({"management": {"key": "wrong"}, "inference": {"key": "wrong"},
                                "API": {"key": "wrong"}}))
    return path


def test_rundir_of_attach_refuses_a_bad_attach_file(tmp_path):
    run = RunDir(tmp_path).create()
    run.attach_file.write_text("{}")
    with pytest.raises(PackratError, match="attached.json is unreadable"):
        RunDir(tmp_path)


def test_ts_config_errors_are_one_line_and_start_nothing(tmp_path):
    bad = tmp_path / "bad.properties"
    bad.write_text("inference_address=http://127.0.0.1:8080\nvmargs=\\u12\n")
    mar = user_archives.build("func_json", tmp_path / "archives").mar
    cases = [(["--ts-config", bad], ["bad.properties:2"]),
             (["--ts-config", tmp_path / "none.properties"], ["none.properties"]),
             (["--ts-config", bad, "--inference-port", "8080"], ["with --ts-config the ports"]),
             (["--key-file", bad], ["--key-file is for --attach"])]
    for args, words in cases:
        run = tmp_path / "run"
        code, out, err = run_cli_fresh(run, "--models", f"m={mar}", *args)
        assert code != 0 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("packrat serve: error: ") and all(w in last for w in words), err
        assert not run.exists()  # checked before anything is written
    assert bad.read_text().startswith("inference_address")


def run_cli_fresh(run, *args):
    out = subprocess.run([sys.executable, "-m", "packrat.cli", "serve", "--run-dir", str(run),
                          *map(str, args)], capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout, out.stderr
