"""TorchServe handler for Packrat archives.

TorchServe's loader takes the one class defined in this file as the handler, so the module
defines exactly one class; everything else lives in the `packrat` package, which must be
installed in the worker's Python environment.

Each request body is a JSON object mapping input names to values (see packrat.model.spec).
A bad request is answered alone with HTTP 400 and `{"error": "..."}`; the rest of its batch
is served and the worker stays up.

Where Packrat pins a version, its entry point (packrat.worker.wrapper) has placed the worker
on its cores and set its threads before this handler loads, as for any other handler.
"""

import logging
import time

import torch
from ts.torch_handler.base_handler import BaseHandler

from packrat.errors import RequestError
from packrat.model.loader import load_model
from packrat.model.wire import decode_request

logger = logging.getLogger(__name__)

# An HTTP reason phrase must be one short line; the full message goes in the response body.
MAX_PHRASE_CHARS = 200


class PackratHandler(BaseHandler):
    def __init__(self):
        super().__init__()
        self.model = None
        self.spec = None
        self.device = torch.device("cpu")
        self.map_location = "cpu"
        # Per-call state between preprocess and postprocess (a worker handles one batch
        # at a time): the number of requests and the error of each bad one, by index.
        self._n_requests = 0
        self._errors = {}

    def initialize(self, context):
        self.context = context
        self.manifest = context.manifest
        model_dir = context.system_properties["model_dir"]
        self.model, self.spec = load_model(model_dir)
        self.initialized = True
        logger.info("Packrat handler ready: %s with threads=%d", model_dir, torch.get_num_threads())

    def preprocess(self, requests):
        """Decode every request; return the good ones stacked into one batch (may be empty)."""
        self._n_requests = len(requests)
        self._errors = {}
        decoded = []
        for idx, request in enumerate(requests):
            try:
                decoded.append(decode_request(self._body_of(request), self.spec))
            except RequestError as e:
                self._errors[idx] = str(e)
        if not decoded:
            return {}
        return {name: torch.stack([d[name] for d in decoded]) for name in self.spec.input_names}

    def inference(self, batch, *args, **kwargs):
        """Run the model on a batch dict of tensors; no side effects (the profiler calls it)."""
        with torch.inference_mode():
            return self.model(**batch)

    def postprocess(self, output):
        """One response per request, in order; bad requests get HTTP 400 and their error."""
        responses = []
        good = 0
        # A context without request processors is a bare one (tests, the profiler).
        context = self.context if getattr(self.context, "request_processor", None) else None
        for idx in range(self._n_requests):
            message = self._errors.get(idx)
            if message is None:
                responses.append({"output": output[good].tolist()})
                good += 1
            else:
                responses.append({"error": message})
                if context is not None:
                    context.set_response_status(400, _phrase(message), idx=idx)
            if context is not None:
                # TorchServe sends no Content-Type of its own for dict responses.
                context.set_response_content_type(idx, "application/json")
        return responses

    def handle(self, data, context):
        start = time.time()
        self.context = context
        batch = self.preprocess(data)
        # An all-bad batch never reaches the model.
        output = self.inference(batch) if batch else None
        responses = self.postprocess(output)
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return responses

    @staticmethod
    def _body_of(request):
        # TorchServe puts a JSON body under "body" (already parsed when the client sent
        # Content-Type: application/json, bytes otherwise); some clients use "data".
        if isinstance(request, dict):
            for key in ("body", "data"):
                if request.get(key) is not None:
                    return request[key]
        # A form-encoded POST (curl -d without a Content-Type) arrives as form fields instead.
        raise RequestError(
            "request has no body; POST a JSON object mapping input names to values, "
            "with Content-Type: application/json"
        )


def _phrase(message):
    line = " ".join(message.split())
    line = "".join(c if 32 <= ord(c) < 127 else "?" for c in line)
    return line[:MAX_PHRASE_CHARS]
