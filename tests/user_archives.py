"""Archives written the way TorchServe users write them, not by Packrat: each is made with
`torch-model-archiver` around a handler of its own, and comes with one sample request body.

- cnn_png:  a BaseHandler subclass over a TorchScript CNN (`--serialized-file model.pt`, no
            model file), PNG bytes in, {"class": int, "score": float} out.
- func_json: a module-level `handle(data, context)` over an eager model (`--model-file` and a
            state dict), JSON {"features": [...]} in, {"scores": [...]} out.
- yaml_text: a BaseHandler subclass whose settings come from the archive's model-config.yaml
            (a scale, and the largest batch it accepts), text "1.0,2.0,..." in.
- Broken ones for the bad-input tests: a handler that fails in initialize, and an archive whose
  manifest names no handler.

TorchServe's own vision handlers need torchvision, which does not import beside this torch
build, so a user-style PIL handler stands in for them.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

IMAGE_SIZE = 32
FEATURES = 16
YAML_MAX_BATCH = 4  # the yaml_text handler refuses larger batches


@dataclass(frozen=True)
class UserArchive:
    name: str
    mar: Path
    sample: Path  # one request body exactly as a client sends it
    content_type: str


CNN_HANDLER = '''
import io

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

SIZE = {size}


class PngClassifier(BaseHandler):
    """A user's image classifier: PNG or JPEG bytes in, the top class and its score out."""

    def preprocess(self, data):
        images = []
        for row in data:
            body = row.get("data") or row.get("body")
            image = Image.open(io.BytesIO(body)).convert("RGB").resize((SIZE, SIZE))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            images.append(pixels.view(SIZE, SIZE, 3).permute(2, 0, 1).float() / 255.0)
        return torch.stack(images)

    def postprocess(self, data):
        scores, classes = torch.softmax(data, dim=1).max(dim=1)
        return [{{"class": int(c), "score": float(s)}} for c, s in zip(classes, scores)]
'''

MLP_MODEL = '''
import torch


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear({features}, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 8),
        )

    def forward(self, x):
        return self.layers(x)
'''

FUNC_HANDLER = '''
import json
import os

import torch

from mlp_model import Mlp

_model = None


def handle(data, context):
    """A user's function handler: TorchServe calls it once with data=None to initialize."""
    global _model
    if data is None:
        model_dir = context.system_properties["model_dir"]
        _model = Mlp()
        _model.load_state_dict(torch.load(os.path.join(model_dir, "mlp.pt"), weights_only=True))
        _model.eval()
        return None
    rows = []
    for row in data:
        body = row.get("data") or row.get("body")
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body)
        rows.append(body["features"])
    with torch.no_grad():
        out = _model(torch.tensor(rows, dtype=torch.float32))
    return [{"scores": [round(float(v), 6) for v in r]} for r in out]
'''

YAML_HANDLER = '''
import torch
from ts.torch_handler.base_handler import BaseHandler


class ScaledSum(BaseHandler):
    """Reads its settings from the archive's model-config.yaml (context.model_yaml_config)."""

    def initialize(self, context):
        settings = context.model_yaml_config["handler"]
        self.scale = float(settings["scale"])
        self.max_batch = int(settings["max_batch"])
        self.weights = torch.arange(1, 65, dtype=torch.float32)
        self.initialized = True

    def preprocess(self, data):
        if len(data) > self.max_batch:
            raise ValueError(f"batch of {len(data)} is above this handler's {self.max_batch}")
        rows = []
        for row in data:
            body = row.get("data") or row.get("body")
            if isinstance(body, (bytes, bytearray)):
                body = body.decode()
            rows.append([float(v) for v in body.split(",")])
        return torch.tensor(rows)

    def inference(self, data, *args, **kwargs):
        x = data.repeat(1, 64 // data.shape[1])
        y = x
        for _ in range(200):  # enough work to time
            y = torch.tanh(y * 0.5 + x * self.weights / 64)
        return (y.sum(dim=1) * self.scale * 10).round()

    def postprocess(self, data):
        return [int(v) for v in data]
'''

YAML_CONFIG = f"""\
minWorkers: 1
maxWorkers: 1
batchSize: 1
maxBatchDelay: 50
responseTimeout: 77
handler:
  scale: 2.0
  max_batch: {YAML_MAX_BATCH}
"""

KSERVE_HANDLER = '''
import torch

_weights = None


def handle(data, context):
    """A user's handler behind TorchServe's kservev2 envelope: data is the request's list of
    KServe v2 inputs ({"name", "shape", "datatype", "data"}); one output per input."""
    global _weights
    if data is None:
        _weights = torch.linspace(0.5, 2.0, 8)
        return None
    return [float((torch.tensor(inp["data"], dtype=torch.float32) * _weights).sum())
            for inp in data]
'''


def kserve_v2(seed: int = 0) -> bytes:
    return json.dumps({"id": f"req-{seed}", "inputs": [
        {"name": "x", "shape": [8], "datatype": "FP32", "data": [float(seed + i) for i in range(8)]},
    ]}).encode()


FAILING_HANDLER = '''
from ts.torch_handler.base_handler import BaseHandler


class Broken(BaseHandler):
    def initialize(self, context):
        raise RuntimeError("this handler cannot initialize: its weights are missing")
'''


def _archiver() -> str:
    local = Path(sys.executable).parent / "torch-model-archiver"
    return str(local) if local.is_file() else "torch-model-archiver"


def _archive(out_dir: Path, name: str, handler: str, *, serialized: Path | None = None,
             model_file: Path | None = None, config: Path | None = None,
             extra: list[Path] = ()) -> Path:
    cmd = [_archiver(), "--model-name", name, "--version", "1.0", "--handler", handler,
           "--export-path", str(out_dir), "--force"]
    if serialized is not None:
        cmd += ["--serialized-file", str(serialized)]
    if model_file is not None:
        cmd += ["--model-file", str(model_file)]
    if config is not None:
        cmd += ["--config-file", str(config)]
    if extra:
        cmd += ["--extra-files", ",".join(map(str, extra))]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return out_dir / f"{name}.mar"


def png_bytes(seed: int = 0, size: int = 48) -> bytes:
    """A deterministic PNG (not square to the model's input: the handler resizes)."""
    from PIL import Image

    pixels = bytes((seed * 31 + i * 7) % 256 for i in range(size * size * 3))
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(buf, format="PNG")
    return buf.getvalue()


def features_json(seed: int = 0) -> bytes:
    return json.dumps({"features": [((seed + i) % 7) / 7.0 for i in range(FEATURES)]}).encode()


def yaml_text(seed: int = 0) -> bytes:
    return ",".join(f"{((seed + i) % 5) / 5.0:.1f}" for i in range(8)).encode()


def build_cnn_png(out_dir: Path) -> UserArchive:
    import torch

    out_dir = Path(out_dir)
    src = out_dir / "cnn_png-src"
    src.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    ).eval()
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, still loaded
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(net, torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    traced.save(str(src / "model.pt"))
    (src / "png_handler.py").write_text(CNN_HANDLER.format(size=IMAGE_SIZE))
    mar = _archive(out_dir, "cnn_png", str(src / "png_handler.py"), serialized=src / "model.pt")
    sample = out_dir / "cnn_png-sample.png"
    sample.write_bytes(png_bytes())
    return UserArchive("cnn_png", mar, sample, "image/png")


def build_func_json(out_dir: Path) -> UserArchive:
    out_dir = Path(out_dir)
    src = out_dir / "func_json-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "mlp_model.py").write_text(MLP_MODEL.format(features=FEATURES))
    (src / "func_handler.py").write_text(FUNC_HANDLER)
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from mlp_model import Mlp; "
            "torch.manual_seed(1); torch.save(Mlp().state_dict(), sys.argv[1] + '/mlp.pt')")
    subprocess.run([sys.executable, "-c", code, str(src)], check=True, timeout=120)
    mar = _archive(out_dir, "func_json", f"{src / 'func_handler'}:handle",
                   serialized=src / "mlp.pt", model_file=src / "mlp_model.py")
    sample = out_dir / "func_json-sample.json"
    sample.write_bytes(features_json())
    return UserArchive("func_json", mar, sample, "application/json")


def _handler_only(out_dir: Path, name: str, handler_text: str, sample: bytes, suffix: str,
                  content_type: str, *, function: str | None = None,
                  config_text: str | None = None) -> UserArchive:
    """An archive of one handler file (and a model-config.yaml) that builds its model itself;
    the archiver still wants a serialized file, so it gets an empty one."""
    out_dir = Path(out_dir)
    src = out_dir / f"{name}-src"
    src.mkdir(parents=True, exist_ok=True)
    handler = src / f"{name}_handler.py"
    handler.write_text(handler_text)
    (src / "unused.pt").write_bytes(b"")
    config = None
    if config_text is not None:
        config = src / "model-config.yaml"
        config.write_text(config_text)
    entry = f"{handler.with_suffix('')}:{function}" if function else str(handler)
    mar = _archive(out_dir, name, entry, serialized=src / "unused.pt", config=config)
    sample_path = out_dir / f"{name}-sample{suffix}"
    sample_path.write_bytes(sample)
    return UserArchive(name, mar, sample_path, content_type)


def build_yaml_text(out_dir: Path) -> UserArchive:
    return _handler_only(out_dir, "yaml_text", YAML_HANDLER, yaml_text(), ".txt", "text/plain",
                         config_text=YAML_CONFIG)


def build_kserve(out_dir: Path) -> UserArchive:
    """For a TorchServe with service_envelope=kservev2: the sample is a KServe v2 request."""
    return _handler_only(out_dir, "kserve", KSERVE_HANDLER, kserve_v2(), ".json",
                         "application/json", function="handle")


def build_failing_init(out_dir: Path) -> UserArchive:
    return _handler_only(out_dir, "broken", FAILING_HANDLER, b"1.0", ".txt", "text/plain")


def build_no_handler(out_dir: Path) -> UserArchive:
    """A .mar whose manifest names no handler (torch-model-archiver always writes one, so it
    is zipped here by hand, as an old or hand-made archive may be)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mar = out_dir / "nohandler.mar"
    manifest = {"createdOn": "01/01/2026 00:00:00", "runtime": "python",
                "model": {"modelName": "nohandler", "modelVersion": "1.0"},
                "archiverVersion": "0.12.0"}
    with zipfile.ZipFile(mar, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        z.writestr("weights.pt", b"")
    sample = out_dir / "nohandler-sample.txt"
    sample.write_bytes(b"1.0")
    return UserArchive("nohandler", mar, sample, "text/plain")


BUILDERS = {"cnn_png": build_cnn_png, "func_json": build_func_json,
            "yaml_text": build_yaml_text}


def build(kind: str, out_dir: Path) -> UserArchive:
    return BUILDERS[kind](Path(out_dir))


def copy_tree_digest(path: Path) -> str:
    """A digest of a file's bytes, to show that Packrat left the user's archive untouched."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


if __name__ == "__main__":  # python tests/user_archives.py OUT_DIR: build all three
    out = Path(sys.argv[1])
    shutil.rmtree(out, ignore_errors=True)
    for kind in BUILDERS:
        a = build(kind, out)
        print(textwrap.shorten(f"{a.name}: {a.mar} sample {a.sample} ({a.content_type})", 200))
