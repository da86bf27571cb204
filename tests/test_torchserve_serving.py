"""A real TorchServe 0.12 serving a small-cnn archive through Packrat's handler.

One server for the module (a start costs ~3 s); the last test stops it and checks that
nothing of it is left, so the tests run in file order.
"""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from packrat.archive import build_zoo_archive
from tests.ts_helpers import (
    processes_of,
    register_model,
    start_torchserve,
    stop_torchserve,
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
    workdir = tmp_path_factory.mktemp("ts")
    server = start_torchserve(workdir, store)
    try:
        register_model(server, archive.mar_path.name, batch_size=4, max_batch_delay_ms=50)
        yield server, json.loads(archive.example_path.read_text())
    finally:
        stop_torchserve(server)


def predict(server, body):
    """POST a JSON value, or raw bytes as application/json."""
    headers = {**server.inference_headers(), "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(
        f"{server.inference_url}/predictions/{MODEL}", data=data, headers=headers, timeout=30
    )


def test_token_auth_is_on(served):
    server, example = served
    r = requests.post(f"{server.inference_url}/predictions/{MODEL}", json=example, timeout=30)
    assert r.status_code in (400, 401) and "Token Authorization failed" in r.text
    r = requests.get(f"{server.management_url}/models", timeout=30)
    assert "Token Authorization failed" in r.text


def test_example_prediction(served):
    server, example = served
    r = predict(server, example)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    output = r.json()["output"]
    assert len(output) == 10 and all(isinstance(x, float) for x in output)


def test_invalid_body_is_400_and_worker_survives(served):
    server, example = served
    r = predict(server, {"pixel_values": [[1, 2]]})
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert "shape [1, 2]" in r.json()["error"]
    r = predict(server, b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = predict(server, example)
    assert r.status_code == 200 and len(r.json()["output"]) == 10


def test_concurrent_mixed_requests(served):
    # Sent together they share batches (batch_size 4, 50 ms delay): each bad request gets its
    # own 400 while the good ones in the same batch get 200.
    server, example = served
    bodies = [example, {"wrong": 1}, example, {"pixel_values": "x"}] * 3
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: predict(server, b), bodies))
    assert [r.status_code for r in responses] == [200, 400, 200, 400] * 3
    outputs = [r.json()["output"] for r in responses[::2]]
    assert all(o == pytest.approx(outputs[0], abs=1e-5) for o in outputs)


def test_stop_leaves_no_process(served):
    server, _ = served
    assert len(processes_of(server.workdir)) >= 2  # the frontend and the worker
    stop_torchserve(server)
    assert processes_of(server.workdir) == []
    assert server.launcher.poll() is not None
