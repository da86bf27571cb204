import base64
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packrat.errors import ArchiveError, PackratError, RequestError
from packrat.model.loader import load_model
from packrat.model.spec import MAX_BODY_BYTES, SPEC_FILE, InputSpec, ModelSpec
from packrat.model.wire import decode_request, encode_b64, encode_example, synthetic_batch

IMAGE = ModelSpec("Model", (InputSpec("pixel_values", (3, 32, 32), "float32"),))
TOKENS = ModelSpec("Model", (InputSpec("input_ids", (8,), "int64", high=100),))
TWO = ModelSpec(
    "Model",
    (InputSpec("x", (2, 3), "float32"), InputSpec("ids", (4,), "int64", high=10)),
)


def good_two() -> dict:
    return {"x": [[0.5, 1, 2], [3, 4, 5]], "ids": [0, 1, 2, 9]}


# ---- decode_request: good bodies


@pytest.mark.parametrize("as_type", [bytes, bytearray, str, dict])
def test_decode_accepts_bytes_str_and_parsed(as_type):
    text = json.dumps(good_two())
    body = {bytes: text.encode(), bytearray: bytearray(text.encode()), str: text}.get(
        as_type, good_two()
    )
    out = decode_request(body, TWO)
    assert out["x"].dtype == torch.float32 and out["x"].shape == (2, 3)
    assert out["ids"].dtype == torch.int64 and out["ids"].tolist() == [0, 1, 2, 9]
    assert out["x"][0].tolist() == [0.5, 1.0, 2.0]


def test_decode_b64_form():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    body = {"x": encode_b64(t), "ids": {"dtype": "int64", **_b64(np.array([1, 2, 3, 4]))}}
    out = decode_request(body, TWO)
    assert torch.equal(out["x"], t)
    assert out["ids"].tolist() == [1, 2, 3, 4]
    # The decoded tensor must be writable and own its memory (torch.stack, in-place ops).
    out["x"] += 1


def _b64(arr: np.ndarray) -> dict:
    return {"shape": list(arr.shape), "b64": base64.b64encode(arr.astype("<i8").tobytes()).decode()}


@pytest.mark.parametrize("spec", [IMAGE, TOKENS, TWO])
@pytest.mark.parametrize("seed", [0, 1])
def test_encode_example_round_trip(spec, seed):
    body = encode_example(spec, seed)
    wire = json.dumps(body).encode()
    out = decode_request(wire, spec)
    expected = synthetic_batch(spec, 1, seed)
    for name in spec.input_names:
        assert torch.equal(out[name], expected[name][0])


def test_encode_example_uses_b64_only_for_large_float_inputs():
    assert set(encode_example(IMAGE)["pixel_values"]) == {"dtype", "shape", "b64"}
    assert isinstance(encode_example(TOKENS)["input_ids"], list)
    assert isinstance(encode_example(TWO)["x"], list)


def test_synthetic_batch_is_deterministic_and_in_range():
    a = synthetic_batch(TWO, 5, seed=3)
    b = synthetic_batch(TWO, 5, seed=3)
    c = synthetic_batch(TWO, 5, seed=4)
    assert a["x"].shape == (5, 2, 3) and a["ids"].shape == (5, 4)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["ids"], b["ids"])
    assert not torch.equal(a["x"], c["x"])
    assert int(a["ids"].min()) >= 0 and int(a["ids"].max()) < 10
    with pytest.raises(ValueError):
        synthetic_batch(TWO, 0)


# ---- decode_request: bad bodies. Every one is a RequestError (-> HTTP 400) naming the problem.


@pytest.mark.parametrize(
    "body, words",
    [
        (b"", "empty"),
        ("", "empty"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b"null", "JSON object"),
        ({"x": [[0, 1, 2], [3, 4, 5]]}, "missing input(s) ['ids']"),
        ({**good_two(), "y": [1]}, "unknown input(s) ['y']"),
        ({"x": [[0, 1, 2]], "ids": [0, 1, 2, 3]}, "shape [1, 3]"),
        ({"x": [[0, 1], [2, 3]], "ids": [0, 1, 2, 3]}, "shape [2, 2]"),
        ({"x": [[0, 1, 2], [3, 4]], "ids": [0, 1, 2, 3]}, "not a regular nested list"),
        ({"x": [], "ids": [0, 1, 2, 3]}, "empty"),
        ({"x": [["a", "b", "c"], [3, 4, 5]], "ids": [0, 1, 2, 3]}, "only numbers"),
        ({"x": [[None, 1, 2], [3, 4, 5]], "ids": [0, 1, 2, 3]}, "only numbers"),
        ({"x": [[True, False, True]] * 2, "ids": [0, 1, 2, 3]}, "booleans"),
        ({"x": "abc", "ids": [0, 1, 2, 3]}, "nested list"),
        ({"x": 1.0, "ids": [0, 1, 2, 3]}, "nested list"),
        ({"x": [[0, 1, 2], [3, 4, 5]], "ids": [0.5, 1, 2, 3]}, "integers"),
        ({"x": [[0, 1, 2], [3, 4, 5]], "ids": [0, 1, 2, 10]}, "outside [0, 10)"),
        ({"x": [[0, 1, 2], [3, 4, 5]], "ids": [-1, 1, 2, 3]}, "outside [0, 10)"),
        ({"x": [[0, 1, 2], [3, 4, 5]], "ids": [2**64, 1, 2, 3]}, "only numbers"),
        ({"x": [[float("nan"), 1, 2], [3, 4, 5]], "ids": [0, 1, 2, 3]}, "NaN"),
        ({"x": [[1e39, 1, 2], [3, 4, 5]], "ids": [0, 1, 2, 3]}, "infinity"),
    ],
)
def test_decode_rejects(body, words):
    with pytest.raises(RequestError) as e:
        decode_request(body, TWO)
    assert words in str(e.value)
    assert isinstance(e.value, PackratError)


def test_decode_errors_tell_the_expected_inputs():
    with pytest.raises(RequestError, match=r"x: float32 \[2, 3\]; ids: int64 \[4\], ids in \[0, 10\)"):
        decode_request({}, TWO)


def test_decode_rejects_too_large_body_before_parsing():
    body = b" " * (MAX_BODY_BYTES + 1)
    with pytest.raises(RequestError, match="byte limit"):
        decode_request(body, TWO)


def b64_value(raw: bytes, dtype: str = "float32", shape=(2, 3)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "b64": base64.b64encode(raw).decode()}


@pytest.mark.parametrize(
    "value, words",
    [
        (b64_value(b"\0" * 20), "decodes to 20 bytes"),
        (b64_value(b"\0" * 28), "decodes to 28 bytes"),
        (b64_value(b"\0" * 24, shape=(3, 2)), "shape [3, 2] does not match"),
        (b64_value(b"\0" * 48, dtype="int64"), "dtype 'int64' does not match"),
        ({"dtype": "float32", "shape": [2, 3], "b64": "@@not base64@@"}, "not valid base64"),
        ({"dtype": "float32", "shape": [2, 3], "b64": 12}, "base64 string"),
        ({"dtype": "float32", "shape": [2, 3]}, "exactly the keys"),
        ({**b64_value(b"\0" * 24), "extra": 1}, "exactly the keys"),
        (b64_value(np.array([np.inf] * 6, dtype="<f4").tobytes()), "infinity"),
    ],
)
def test_decode_rejects_bad_b64(value, words):
    with pytest.raises(RequestError) as e:
        decode_request({"x": value, "ids": [0, 1, 2, 3]}, TWO)
    assert words in str(e.value)


def test_decode_rejects_b64_ids_out_of_range():
    value = {"dtype": "int64", **_b64(np.array([0, 1, 2, 99]))}
    with pytest.raises(RequestError, match=r"outside \[0, 10\)"):
        decode_request({"x": good_two()["x"], "ids": value}, TWO)


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=3),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                    max_leaves=20))
def test_decode_never_fails_with_anything_but_request_error(value):
    # Whatever a client sends for an input, the answer is a tensor of the right shape or a
    # RequestError: never another exception, which would fail the whole batch with HTTP 503.
    for body in ({"x": value, "ids": [0, 1, 2, 3]}, {"x": good_two()["x"], "ids": value}, value):
        try:
            out = decode_request(body, TWO)
        except RequestError:
            continue
        assert out["x"].shape == (2, 3) and out["ids"].shape == (4,)


# ---- ModelSpec.load


def test_spec_json_round_trip(tmp_path):
    (tmp_path / SPEC_FILE).write_text(json.dumps(TWO.to_json()))
    assert ModelSpec.load(tmp_path / SPEC_FILE) == TWO
    assert ModelSpec.load(tmp_path) == TWO  # a model directory works too


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "not found"),
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"inputs": []}', "'model_class' is missing"),
        ('{"model_class": "Model"}', "'inputs' is missing"),
        ('{"model_class": "Model", "inputs": [], "x": 1}', "unknown field(s) ['x']"),
        ('{"model_class": "Model", "inputs": {}}', "must be a list"),
        ('{"model_class": "Model", "inputs": []}', "at least one input"),
        ('{"model_class": "not a name", "inputs": [{"name": "a", "shape": [1], "dtype": "float32"}]}',
         "'not a name'"),
        ('{"model_class": "M", "inputs": [1]}', "inputs[0] must be an object"),
        ('{"model_class": "M", "inputs": [{"name": "a", "shape": [1]}]}', "missing ['dtype']"),
        ('{"model_class": "M", "inputs": [{"name": "a", "shape": [1], "dtype": "float16"}]}',
         "dtype 'float16' is not supported"),
        ('{"model_class": "M", "inputs": [{"name": "a", "shape": [0], "dtype": "float32"}]}',
         "shape (0,)"),
        ('{"model_class": "M", "inputs": [{"name": "a", "shape": 3, "dtype": "float32"}]}',
         "inputs[0].shape must be a list"),
        ('{"model_class": "M", "inputs": [{"name": "a", "shape": [1.5], "dtype": "float32"}]}',
         "shape (1.5,)"),
        ('{"model_class": "M", "inputs": [{"name": "a-b", "shape": [1], "dtype": "float32"}]}',
         "'a-b' is not a Python identifier"),
        ('{"model_class": "M", "inputs": [{"name": "a", "shape": [1], "dtype": "float32", "high": 5}]}',
         "only applies to int64"),
        ('{"model_class": "M", "inputs": [{"name": "a", "shape": [1], "dtype": "int64", "high": 0}]}',
         "high 0 must be a positive integer"),
        ('{"model_class": "M", "inputs": [{"name": "a", "shape": [1], "dtype": "int64"},'
         ' {"name": "a", "shape": [1], "dtype": "int64"}]}', "not unique"),
    ],
)
def test_spec_load_errors(tmp_path, content, words):
    path = tmp_path / SPEC_FILE
    if content is not None:
        path.write_text(content)
    with pytest.raises(ArchiveError) as e:
        ModelSpec.load(path)
    assert words in str(e.value)
    assert str(path) in str(e.value)


# ---- load_model


MODEL_PY = """
import torch
from torch import nn

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 2)

    def forward(self, x, ids):
        return self.lin(x.flatten(1)) + ids.sum(1, keepdim=True)
"""


def write_model_dir(path, source=MODEL_PY, spec=TWO, weights=True):
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.py").write_text(source)
    (path / SPEC_FILE).write_text(json.dumps(spec.to_json()))
    if weights:
        torch.manual_seed(0)
        lin = torch.nn.Linear(6, 2)
        torch.save({"lin.weight": lin.weight.detach(), "lin.bias": lin.bias.detach()}, path / "weights.pt")
    return path


def test_load_model_runs_forward(tmp_path):
    model, spec = load_model(write_model_dir(tmp_path / "m"))
    assert spec == TWO and not model.training
    out = model(**synthetic_batch(spec, 3))
    assert out.shape == (3, 2)


def test_load_model_keeps_two_dirs_apart(tmp_path):
    a, _ = load_model(write_model_dir(tmp_path / "a"))
    other = MODEL_PY.replace("nn.Linear(6, 2)", "nn.Linear(6, 2)\n        self.tag = 'b'")
    b, _ = load_model(write_model_dir(tmp_path / "b", source=other))
    assert type(a).__module__ != type(b).__module__
    assert not hasattr(a, "tag") and b.tag == "b"


def test_load_model_uses_manifest_serialized_file(tmp_path):
    d = write_model_dir(tmp_path / "m")
    (d / "weights.pt").rename(d / "custom.pt")
    (d / "MAR-INF").mkdir()
    (d / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({"model": {"serializedFile": "custom.pt"}}))
    load_model(d)


@pytest.mark.parametrize(
    "breakage, words",
    [
        ("no_spec", "packrat.json not found"),
        ("no_model_py", "model.py not found"),
        ("no_weights", "weights file"),
        ("wrong_class", "no torch.nn.Module class 'Missing' (found ['Model'])"),
        ("wrong_weights", "does not match Model"),
        ("not_state_dict", "not a state_dict"),
        ("garbage_weights", "cannot load state_dict"),
        ("import_error", "needs the missing package 'transformerz'"),
        ("init_error", "Model() failed"),
    ],
)
def test_load_model_errors(tmp_path, breakage, words):
    d = write_model_dir(tmp_path / "m")
    if breakage == "no_spec":
        (d / SPEC_FILE).unlink()
    elif breakage == "no_model_py":
        (d / "model.py").unlink()
    elif breakage == "no_weights":
        (d / "weights.pt").unlink()
    elif breakage == "wrong_class":
        (d / SPEC_FILE).write_text(json.dumps(ModelSpec("Missing", TWO.inputs).to_json()))
    elif breakage == "wrong_weights":
        torch.save({"lin.weight": torch.zeros(3, 6)}, d / "weights.pt")
    elif breakage == "not_state_dict":
        torch.save([1, 2], d / "weights.pt")
    elif breakage == "garbage_weights":
        (d / "weights.pt").write_bytes(b"not a torch file")
    elif breakage == "import_error":
        (d / "model.py").write_text("import transformerz\n" + MODEL_PY)
    elif breakage == "init_error":
        (d / "model.py").write_text(MODEL_PY.replace("super().__init__()", "raise ValueError('boom')"))
    with pytest.raises(ArchiveError) as e:
        load_model(d)
    assert words in str(e.value)
