"""A real TorchServe 0.12 serving a small-cnn archive through Packrat's handler.

One server for the module (a start costs ~1 s), started and stopped with packrat.torchserve;
the last test stops it and checks that nothing of it is left, so the tests run in file order.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from packrat.model.archive import build_zoo_archive
from packrat.torchserve import (
    Ports,
    ServerSettings,
    TorchServeClient,
    find_server,
    server_processes,
    start_server,
    stop_server,
)
from tests.conftest import TORCHSERVE, has_torchserve, require

pytestmark = [pytest.mark.integration, require(has_torchserve(), TORCHSERVE)]

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


# TorchServe's own limit on a request (max_request_size, left at its default): a bigger body
# is answered 413 by the frontend and never reaches the worker.
TORCHSERVE_MAX_REQUEST = 6553500


@pytest.mark.parametrize(
    "body, status, words",
    [
        pytest.param(b"", 400, "request body is empty", id="empty"),
        pytest.param(b"{not json", 400, "not valid JSON", id="malformed"),
        pytest.param(b"[1, 2]", 400, "must be a JSON object", id="not-an-object"),
        pytest.param(b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply",
                     id="nested-too-deeply"),
        pytest.param({"pixel_values": [[1, 2]]}, 400, "shape [1, 2]", id="wrong-shape"),
        pytest.param({"wrong": 1}, 400, "missing input(s) ['pixel_values']", id="wrong-input"),
        # too large for the input (3x32x32) but within TorchServe's limit: refused by the handler
        pytest.param({"pixel_values": [0.0] * 1_000_000}, 400, "more values than expected",
                     id="too-many-values"),
        pytest.param({"pixel_values": {"dtype": "float32", "shape": [3, 32, 32],
                                       "b64": "A" * 4_000_000}}, 400, "decodes to 3000000 bytes",
                     id="b64-too-long"),
        # over TorchServe's limit: refused by its frontend
        pytest.param(b" " * (TORCHSERVE_MAX_REQUEST + 1), 413, None, id="over-request-limit"),
    ],
)
def test_bad_body_is_4xx_and_worker_survives(served, body, status, words):
    client, example = served
    workers = [w.pid for v in client.versions(MODEL) for w in v.workers]
    assert workers and None not in workers
    r = predict(client, body)
    assert r.status_code == status, r.text[:500]
    if words is not None:
        assert r.headers["Content-Type"].startswith("application/json")
        error = r.json()["error"]
        assert words in error and "\n" not in error and "Traceback" not in error
    # the same worker, still serving
    r = predict(client, example)
    assert r.status_code == 200 and len(r.json()["output"]) == 10
    assert [w.pid for v in client.versions(MODEL) for w in v.workers] == workers


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
