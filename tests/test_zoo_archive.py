import importlib.util
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from ts.context import Context, RequestProcessor
from ts.utils.util import list_classes_from_module

from packrat.model.archive import (
    handler_source,
    ArchiveResult,
    archive_digest,
    build_zoo_archive,
    extract_archive,
)
from packrat.errors import ArchiveError
from packrat.model.wire import decode_request, synthetic_batch
from packrat.model.loader import load_model
from packrat.model.zoo import ZOO, build_model, get_zoo_model
from tests.conftest import require

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory) -> ArchiveResult:
    return build_zoo_archive("small-cnn", tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def model_dir(small_cnn, tmp_path_factory) -> Path:
    return extract_archive(small_cnn.mar_path, tmp_path_factory.mktemp("unpacked") / "m")


def load_handler_module(model_dir: Path):
    """Import the handler the way TorchServe does: the copy inside the archive."""
    spec = importlib.util.spec_from_file_location(
        f"packrat_handler_{abs(hash(model_dir))}", model_dir / "packrat_handler.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_handler(model_dir: Path, n_requests: int):
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    context = Context("small-cnn", str(model_dir), manifest, 4, None, "0.12.0")
    handler = load_handler_module(model_dir).PackratHandler()
    handler.initialize(context)
    context.request_processor = [RequestProcessor({}) for _ in range(n_requests)]
    return handler, context


# ---- zoo


def test_zoo_names():
    assert set(ZOO) == {"small-cnn", "resnet50", "bert-base", "gpt2"}
    for name, entry in ZOO.items():
        assert entry.name == name and entry.spec.model_class == "Model"
        assert "class Model(nn.Module)" in entry.source


@pytest.mark.parametrize("call", [get_zoo_model, lambda n: build_zoo_archive(n, Path("/nonexistent"))])
def test_unknown_zoo_name_lists_known_names(call):
    with pytest.raises(ArchiveError, match="unknown zoo model 'resnet51'; known models: bert-base, gpt2, resnet50, small-cnn"):
        call("resnet51")


def test_zoo_import_does_not_need_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import packrat.model.zoo, packrat.model.archive, packrat.model.spec\n"
        "from packrat.errors import ArchiveError\n"
        "try:\n"
        "    packrat.model.zoo.build_model(packrat.model.zoo.ZOO['resnet50'])\n"
        "except ArchiveError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install -e '.[models]'" in out.stdout


def test_missing_transformers_is_an_archive_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ArchiveError, match=r"'gpt2' needs the transformers package: pip install -e '\.\[models\]'"):
        build_zoo_archive("gpt2", tmp_path)
    assert not any(tmp_path.iterdir())


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    entry = get_zoo_model("small-cnn")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(entry, seed=0)
    after = torch.rand(1)
    b = build_model(entry, seed=0)
    c = build_model(entry, seed=1)
    assert torch.equal(before, after)
    for (ka, va), (_, vb), (_, vc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(va, vb), ka
    assert not all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


# ---- archive


def test_archive_contents(small_cnn, model_dir):
    assert small_cnn.mar_path.name == "small-cnn.mar" and small_cnn.model_name == "small-cnn"
    names = set(zipfile.ZipFile(small_cnn.mar_path).namelist())
    assert {"MAR-INF/MANIFEST.json", "model.py", "weights.pt", "packrat.json", "packrat_handler.py"} <= names
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    assert manifest["model"]["modelName"] == "small-cnn"
    assert manifest["model"]["modelVersion"] == "1.0"
    assert manifest["model"]["serializedFile"] == "weights.pt"
    assert (model_dir / "packrat_handler.py").read_bytes() == handler_source()


def test_archive_model_loads_and_matches_example(small_cnn, model_dir):
    model, spec = load_model(model_dir)
    assert spec == get_zoo_model("small-cnn").spec
    example = decode_request(small_cnn.example_path.read_bytes(), spec)
    with torch.inference_mode():
        out = model(**{k: v.unsqueeze(0) for k, v in example.items()})
    assert out.shape == (1, 10)
    # The archived weights are the seeded ones.
    fresh = build_model(get_zoo_model("small-cnn"))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_handler_module_defines_exactly_one_class(model_dir):
    # TorchServe refuses a handler file that defines more than one class.
    assert [c.__name__ for c in list_classes_from_module(load_handler_module(model_dir))] == ["PackratHandler"]


def test_handler_mixed_batch(small_cnn, model_dir):
    example = small_cnn.example_path.read_bytes()
    requests = [
        {"body": example},  # bytes, as TorchServe forwards a non-JSON content type
        {"body": b"{not json"},
        {"body": json.loads(example)},  # already parsed (Content-Type: application/json)
        {"data": b'{"pixel_values": [[1, 2]]}'},
        {"other": 1},
        {"data": example},
    ]
    handler, context = make_handler(model_dir, len(requests))
    responses = handler.handle(requests, context)
    assert len(responses) == len(requests)
    statuses = [context.get_response_status(i)[0] for i in range(len(requests))]
    assert statuses == [200, 400, 200, 400, 400, 200]
    for i in (0, 2, 5):
        assert len(responses[i]["output"]) == 10
        assert all(isinstance(x, float) for x in responses[i]["output"])
    assert responses[0] == responses[2] == responses[5]
    assert "not valid JSON" in responses[1]["error"]
    assert "shape [1, 2]" in responses[3]["error"]
    assert "no body" in responses[4]["error"]
    assert all(context.get_response_content_type(i) == "application/json" for i in range(len(requests)))
    phrase = context.get_response_status(3)[1]
    assert "shape [1, 2]" in phrase and "\n" not in phrase
    # Batching does not change a request's answer.
    alone_handler, alone_context = make_handler(model_dir, 1)
    alone = alone_handler.handle([{"body": example}], alone_context)
    assert alone[0]["output"] == pytest.approx(responses[0]["output"], abs=1e-5)


def test_handler_all_bad_batch_skips_the_model(model_dir):
    handler, context = make_handler(model_dir, 2)

    def must_not_run(**kwargs):
        raise AssertionError("the model ran on an all-bad batch")

    handler.model = must_not_run
    responses = handler.handle([{"body": b""}, {"body": b"[]"}], context)
    assert [set(r) for r in responses] == [{"error"}, {"error"}]
    assert [context.get_response_status(i)[0] for i in range(2)] == [400, 400]


def test_handler_inference_on_synthetic_batch(model_dir):
    handler, _ = make_handler(model_dir, 1)
    batch = synthetic_batch(handler.spec, 3)
    copy = {k: v.clone() for k, v in batch.items()}
    out1 = handler.inference(batch)
    out2 = handler.inference(batch)
    assert out1.shape == (3, 10) and torch.equal(out1, out2)
    assert all(torch.equal(batch[k], copy[k]) for k in batch)


def test_handler_bad_archive_fails_initialize(model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in model_dir.rglob("*"):
        if p.is_file() and p.name != "weights.pt":
            dest = broken / p.relative_to(model_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(p.read_bytes())
    with pytest.raises(ArchiveError, match="weights file"):
        make_handler(broken, 1)


# ---- extract_archive and archive_digest


def test_extract_accepts_a_directory(model_dir):
    assert extract_archive(model_dir, Path("/unused")) == model_dir


@pytest.mark.parametrize("kind, words", [
    ("missing", "not found"),
    ("not_zip", "not a zip file"),
    ("no_manifest", "has no MAR-INF/MANIFEST.json"),
    ("unsafe", "unsafe path '../evil.py'"),
    ("bad_manifest", "not valid JSON"),
    ("corrupt", "corrupt"),
    ("dir_without_manifest", "directory without MAR-INF/MANIFEST.json"),
])
def test_extract_errors(tmp_path, small_cnn, kind, words):
    path = tmp_path / "x.mar"
    if kind == "not_zip":
        path.write_bytes(b"hello")
    elif kind in ("no_manifest", "unsafe", "bad_manifest"):
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("model.py", "")
            if kind != "no_manifest":
                zf.writestr("MAR-INF/MANIFEST.json", "{" if kind == "bad_manifest" else "{}")
            if kind == "unsafe":
                zf.writestr("../evil.py", "")
    elif kind == "corrupt":
        data = bytearray(small_cnn.mar_path.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 1000] = b"\0" * 1000  # inside weights.pt's data
        path.write_bytes(bytes(data))
    elif kind == "dir_without_manifest":
        path.mkdir()
    with pytest.raises(ArchiveError) as e:
        extract_archive(path, tmp_path / "out")
    assert words in str(e.value)
    assert not (tmp_path.parent / "evil.py").exists()


def test_digest(tmp_path, small_cnn, model_dir):
    assert archive_digest(small_cnn.mar_path) == archive_digest(small_cnn.mar_path)
    again = extract_archive(small_cnn.mar_path, tmp_path / "again")
    d = archive_digest(model_dir)
    assert archive_digest(again) == d != archive_digest(small_cnn.mar_path)
    # TorchServe's worker leaves bytecode in an unpacked archive; it is not content.
    (again / "__pycache__").mkdir()
    (again / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"x")
    assert archive_digest(again) == d
    (again / "packrat.json").write_text((again / "packrat.json").read_text() + " ")
    assert archive_digest(again) != d
    (again / "packrat.json").rename(again / "packrat2.json")
    assert archive_digest(again) != d
    with pytest.raises(ArchiveError, match="not found"):
        archive_digest(tmp_path / "nothing.mar")


# ---- transformers models: construct and run on a tiny input (no archive: too big for tests)


@require(HAS_TRANSFORMERS, "transformers (pip install -e '.[models]')")
def test_transformers_models_build_and_run():
    from transformers import BertConfig, GPT2Config

    assert get_zoo_model("bert-base").spec.inputs[0].high == BertConfig().vocab_size
    assert get_zoo_model("gpt2").spec.inputs[0].high == GPT2Config().vocab_size
    start = time.monotonic()
    resnet = build_model(get_zoo_model("resnet50"))
    with torch.inference_mode():
        assert resnet(**synthetic_batch(get_zoo_model("resnet50").spec, 1)).shape == (1, 1000)
    del resnet
    for name, out_shape in (("bert-base", (2, 2)), ("gpt2", (2, 5))):
        entry = get_zoo_model(name)
        model = build_model(entry)
        ids = torch.randint(0, entry.spec.inputs[0].high, (2, 8))  # short sequence: cheap
        with torch.inference_mode():
            out = model(input_ids=ids)
        assert out.shape == out_shape
        if name == "gpt2":
            assert out.dtype == torch.int64 and int(out.max()) < entry.spec.inputs[0].high
        del model
    assert time.monotonic() - start < 60
