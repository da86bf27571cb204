"""One batch through an archive's handler, as a TorchServe 0.12 worker runs it.

The profiler times any archive (not only those Packrat built) from one sample request, so it
must run the code a worker runs: the handler loaded by TorchServe's own loader (class `handle`,
`module:function` or a default handler name, envelope-wrapped if asked, initialized with a real
context and model-config.yaml), and per batch the steps of `ts.service.Service.predict`. Predict
itself turns every failure into a 503 reply; the profiler must see failures, so `predict` here
repeats its steps and raises instead.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from packrat.model.sample import Sample

# How long a handler's error may be in a one-line message.
MAX_ERROR_CHARS = 300


class HandlerFailed(Exception):
    """The handler raised, returned something a worker cannot reply with, or answered a
    request with an error status. The message is one line."""


@dataclass(frozen=True)
class HandlerTarget:
    """What a TorchServe worker is told when it loads a model."""

    model_name: str
    model_dir: Path
    handler: str  # the manifest's model.handler
    batch_size: int
    envelope: str | None = None


def one_line(error: BaseException) -> str:
    """`Type: message` on one line, cut to MAX_ERROR_CHARS: what a user is shown."""
    text = " ".join(str(error).split())
    line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS] + " ..."


def load_service(target: HandlerTarget) -> Any:
    """The handler as a worker loads it: a ts.service.Service, initialized.

    Like the worker, the model directory is the working directory and comes first on
    sys.path (TorchServe imports the handler module by name from it).
    """
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import TsModelLoader

    model_dir = str(target.model_dir)
    os.chdir(model_dir)
    sys.path.insert(0, model_dir)
    metrics_yaml = resources.files("ts") / "configs" / "metrics.yaml"
    metrics = MetricsCacheYamlImpl(config_file_path=str(metrics_yaml))
    metrics.initialize_cache()
    metrics.model_name = target.model_name
    return TsModelLoader().load(
        target.model_name, model_dir, handler=target.handler, gpu_id=None,
        batch_size=target.batch_size, envelope=target.envelope, limit_max_image_pixels=True,
        metrics_cache=metrics,
    )


def wire_batch(sample: Sample, size: int) -> list[dict[str, Any]]:
    """`size` copies of the sample in the form the worker hands to predict: the body decoded
    as the worker decodes it (JSON to an object, text to str), once per request as there."""
    ct = sample.content_type
    return [
        {
            "requestId": str(k).encode(),
            "parameters": [{"name": "body", "contentType": ct, "value": sample.decoded()}],
            "headers": [{"name": b"Content-Type", "value": ct.encode()}],
        }
        for k in range(size)
    ]


def predict(service: Any, batch: list[dict[str, Any]]) -> bytes:
    """Service.predict's steps (ts/service.py, 0.12), raising HandlerFailed where predict
    would reply with an error: the entry point raised, returned no list or a list of the wrong
    length, or set an error status (>= 400) on a request. Returns the encoded reply."""
    from ts.protocol.otf_message_handler import create_predict_response
    from ts.service import PREDICTION_METRIC, Service

    headers, input_batch, req_id_map = Service.retrieve_data_for_inference(batch)
    context = service.context
    context.request_ids = req_id_map
    context.request_processor = headers
    context.metrics.request_ids = req_id_map
    context.cl_socket = None  # only streaming handlers write to it; none here
    start = time.time()
    try:
        ret = service._entry_point(input_batch, context)
    except Exception as e:  # the handler's own error, whatever its type
        raise HandlerFailed(one_line(e)) from e
    if not isinstance(ret, list):
        raise HandlerFailed(f"the handler returned a {type(ret).__name__}, not a list of "
                            f"{len(input_batch)} responses")
    if len(ret) != len(input_batch):
        raise HandlerFailed(f"the handler returned {len(ret)} responses for a batch of "
                            f"{len(input_batch)}")
    context.metrics.add_time(PREDICTION_METRIC, round((time.time() - start) * 1000, 2))
    reply = create_predict_response(ret, req_id_map, "Prediction success", 200, context=context)
    for idx in req_id_map:
        code, phrase = context.get_response_status(idx)
        if code is not None and code >= 400:
            detail = " ".join(str(phrase or "").split())[:MAX_ERROR_CHARS]
            raise HandlerFailed(f"the handler answered {code}" + (f": {detail}" if detail else ""))
    return bytes(reply or b"")
