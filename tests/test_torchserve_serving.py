"""A real TorchServe 0.12 serving a small-cnn archive through Packrat's handler.

One server for the module (a start costs ~1 s), started and stopped with packrat.torchserve;
the last test stops it and checks that nothing of it is left, so the tests run in file order.
"""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from packrat.archive import build_zoo_archive
from packrat.torchserve import (
    Ports,
    ServerSettings,
    TorchServeClient,
    find_server,
    server_processes,
    start_server,
    stop_server,
    torchserve_command,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("java") is None or torchserve_command() is None,
        reason="needs Java 17 and torchserve",
    ),
]

MODEL = "small-cnn"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    archive = build_zoo_archive(MODEL, store)
    settings = ServerSettings(
        workdir=tmp_path_factory.mktemp("ts"), model_store=store, ports=Ports.free()
    )
    proc = start_server(settings)
    try:
        client = TorchServeClient(settings)
        client.register(
            archive.mar_path.name, model_name=MODEL, batch_size=4, max_batch_delay_ms=50,
            initial_workers=1,
        )  # fmt: skip
        yield client, json.loads(archive.example_path.read_text())
    finally:
        stop_server(proc)
        assert server_processes(settings.workdir) == []


def predict(client, body):
    """POST a JSON value, or raw bytes as application/json."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.predict(MODEL, data, timeout_s=30)


def test_token_auth_is_on(served):
    client, example = served
    r = requests.post(f"{client.inference_url}/predictions/{MODEL}", json=example, timeout=30)
    assert r.status_code == 400 and "Token Authorization failed" in r.text
    r = requests.get(f"{client.management_url}/models", timeout=30)
    assert r.status_code == 400 and "Token Authorization failed" in r.text


def test_example_prediction(served):
    client, example = served
    r = predict(client, example)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    output = r.json()["output"]
    assert len(output) == 10 and all(isinstance(x, float) for x in output)


def test_invalid_body_is_400_and_worker_survives(served):
    client, example = served
    r = predict(client, {"pixel_values": [[1, 2]]})
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert "shape [1, 2]" in r.json()["error"]
    r = predict(client, b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = predict(client, example)
    assert r.status_code == 200 and len(r.json()["output"]) == 10


def test_concurrent_mixed_requests(served):
    # Sent together they share batches (batch_size 4, 50 ms delay): each bad request gets its
    # own 400 while the good ones in the same batch get 200.
    client, example = served
    bodies = [example, {"wrong": 1}, example, {"pixel_values": "x"}] * 3
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: predict(client, b), bodies))
    assert [r.status_code for r in responses] == [200, 400, 200, 400] * 3
    outputs = [r.json()["output"] for r in responses[::2]]
    assert all(o == pytest.approx(outputs[0], abs=1e-5) for o in outputs)


def test_stop_leaves_no_process(served):
    client, _ = served
    workdir = client.settings.workdir
    assert len(server_processes(workdir)) >= 3  # the launcher, the frontend and the worker
    stop_server(find_server(workdir))
    assert server_processes(workdir) == []
    assert find_server(workdir) is None and client.ping() is False
