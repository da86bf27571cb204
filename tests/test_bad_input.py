"""Bad input of every kind gets a one-line error and a non-zero exit (CLI) or a 4xx (HTTP):
never a traceback, a dead worker or lost state.

The CLI runs in-process (`packrat.cli.main`); each case checks the exit code, that stderr
holds exactly one line (`packrat CMD: error: ...`, or an argparse usage error; the few cases
that find the problem late may print a progress or `run directory:` line first), that it says
what was wrong, and that nothing was printed on stdout. "No lost state": the serve, reconfigure
and load cases also check that the run directory was not touched. Where each case is tested:

profile files (`packrat plan --profile`, `packrat serve --profiles`)
    NaN / inf, negative, zero latencies ............ test_bad_profile_file: nan*, inf, negative, zero
    missing cells, short rows ...................... test_bad_profile_file: missing*, short_row
    wrong columns .................................. test_bad_profile_file: wrong_header, reordered,
                                                     published_* (also tests/test_cli_plan.py)
    empty files .................................... test_bad_profile_file: empty, blank, header_only
    not text, huge values, bad metadata ............ test_bad_profile_file: binary, huge_*, meta_*
    through `packrat serve --profiles` ............. test_serve_bad_input: profile_*
cores: zero, negative, too many ................... test_bad_cores (plan, serve, profile --threads)
B: zero, negative, beyond the profile ............. test_bad_batch (plan --batch, serve
                                                     --initial-batch, reconfigure --for-batch,
                                                     profile --max-batch). Not here: a live
                                                     controller clamps `reconfigure --for-batch`
                                                     and `serve --initial-batch` above the largest
                                                     servable B instead of refusing them.
unknown zoo names ................................. test_unknown_zoo_name (archive, demo)
missing or corrupt archives ....................... test_bad_archive (profile), test_serve_bad_input
                                                     (serve: archive_*); extract_archive alone in
                                                     tests/test_zoo_archive.py::test_extract_errors
invalid model names (slashes, `..`) ............... test_bad_model_name (serve, reconfigure, load);
                                                     check_model_name alone in
                                                     tests/test_policy_rundir.py::test_bad_model_names
request bodies: empty, malformed, wrong shape,
    too large ...................................... test_bad_request_body (decode_request, as the
                                                     handler calls it), test_too_large_bodies_are_
                                                     refused_before_allocating, test_handler_answers_
                                                     each_bad_request_alone (the handler's batch);
                                                     over real TorchServe (HTTP 400, 413 over its size
                                                     limit, worker pid unchanged):
                                                     tests/test_torchserve_serving.py::
                                                     test_bad_body_is_4xx_and_worker_survives
"""

from __future__ import annotations

import base64
import json
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from packrat.model.archive import build_zoo_archive
from packrat.cli import main
from packrat.measure.cpus import usable_cores
from packrat.errors import PackratError, RequestError
from packrat.model.spec import MAX_BODY_BYTES
from packrat.model.wire import decode_request
from packrat.model.zoo import get_zoo_model

GOOD = "threads,batch,latency_ms\n1,1,10\n1,2,19\n2,1,6\n2,2,11\n"
HEADER = "threads,batch,latency_ms\n"


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of `packrat ARGS`, run in this process."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, words, *, command=None, before=()):
    """A non-zero exit, one error line naming `words`, nothing on stdout. `before`: prefixes
    of informational lines allowed ahead of the error (progress, the run directory)."""
    assert code not in (0, None), (out, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines, "no error message"
    if before:
        assert all(line.startswith(tuple(before)) for line in lines[:-1]), err
    else:
        assert len(lines) == 1, err
    assert ": error: " in lines[-1], err
    if command:
        assert lines[-1].startswith(f"packrat {command}: error: "), err
    for w in [words] if isinstance(words, str) else words:
        assert w in lines[-1], err
    assert out == ""


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    return build_zoo_archive("small-cnn", tmp_path_factory.mktemp("store"))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    # `packrat profile` must never find (or leave) a profile in the user's cache.
    monkeypatch.setenv("PACKRAT_CACHE_DIR", str(tmp_path / "cache"))


# ---- profile files -----------------------------------------------------------------------

PROFILE_CASES = {
    # name: (file content (None: no file, "DIR": a directory), words in the error)
    "nan": (HEADER + "1,1,nan\n", "latency_ms is 'nan'"),
    "nan_upper": (HEADER + "1,1,NaN\n2,1,3\n", "latency_ms is 'NaN'"),
    "nan_p10": ("threads,batch,latency_ms,p10_ms\n1,1,3,nan\n", "p10_ms is 'nan'"),
    "inf": (HEADER + "1,1,inf\n", "latency_ms is 'inf'"),
    "overflow": (HEADER + "1,1,1e400\n", "latency_ms is '1e400'"),
    "negative": (HEADER + "1,1,-3\n", "must be > 0"),
    "zero": (HEADER + "1,1,0\n", "must be > 0"),
    "zero_threads": (HEADER + "0,1,3\n", "threads is '0'; it must be > 0"),
    "negative_batch": (HEADER + "1,-2,3\n", "batch is '-2'; it must be > 0"),
    "float_threads": (HEADER + "1.5,1,3\n", "threads is '1.5', not an integer"),
    "not_a_number": (HEADER + "1,1,fast\n", "not a number"),
    "missing_cell": (HEADER + "1,,3\n", "cell is missing"),
    "missing_latency": (HEADER + "1,1,\n", "cell is missing"),
    "short_row": (HEADER + "1,1\n", "cell is missing"),
    "wrong_header": ("threads,batch\n1,1\n", "unrecognized columns threads,batch"),
    "reordered": ("batch,threads,latency_ms\n1,1,3\n", "unrecognized columns"),
    "published_missing_columns": ("intraop_threads,latency(avg)\n1,3\n",
                                  "columns batch_size, topology, allocator, benchmark are missing"),
    "empty": ("", "is empty"),
    "blank": ("  \n\n", "is empty"),
    "header_only": (HEADER, "no measurements"),
    "duplicate": (HEADER + "1,1,3\n1,1,4\n", "appears twice"),
    "binary": (b"\xff\xfe\x00\x01garbage", "not a text CSV file"),
    "huge_batch": (HEADER + "1,99999999999,3\n", "batch must be an integer in 1..8192"),
    "huge_threads": (HEADER + "99999,1,3\n", "threads must be an integer in 1..1024"),
    "meta_not_json": ((GOOD, "{"), "unreadable metadata"),
    "meta_not_object": ((GOOD, "[1, 2]"), "unreadable metadata (a JSON object is expected"),
    "missing": (None, "does not exist"),
    "directory": ("DIR", "does not exist"),
}


def write_profile(tmp_path: Path, content) -> Path:
    path = tmp_path / "p.csv"
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, tuple):
        path.write_text(content[0])
        (tmp_path / "p.meta.json").write_text(content[1])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    return path


@pytest.mark.parametrize("case", PROFILE_CASES)
def test_bad_profile_file(tmp_path, capsys, case):
    content, words = PROFILE_CASES[case]
    prof = write_profile(tmp_path, content)
    result = run_cli(capsys, "plan", "--profile", prof, "--cores", 2, "--batch", 1)
    assert_one_line_error(*result, words, command="plan")


def test_a_good_profile_plans(tmp_path, capsys):
    # the cases above fail for their bad cell, not for something in the common setup
    code, out, err = run_cli(capsys, "plan", "--profile", write_profile(tmp_path, GOOD),
                             "--cores", 2, "--batch", "1,4", "--json")
    assert code == 0 and err == "" and [r["batch"] for r in json.loads(out)] == [1, 4]


# ---- cores -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "args, words",
    [
        pytest.param(["plan", "--cores", 0], "cores must be an integer >= 1, got 0", id="plan-zero"),
        pytest.param(["plan", "--cores", -4], "cores must be an integer >= 1, got -4", id="plan-negative"),
        pytest.param(["plan", "--cores", 100_000_000], "give --cores 1..1024", id="plan-too-many"),
        pytest.param(["plan", "--cores", "two"], "invalid int value: 'two'", id="plan-not-int"),
        pytest.param(["serve", "--cores", 0], "--cores must be >= 1, got 0", id="serve-zero"),
        pytest.param(["serve", "--cores", -1], "--cores must be >= 1, got -1", id="serve-negative"),
        pytest.param(["serve", "--cores", 100_000],
                     f"this process may use 1..{len(usable_cores())} cores", id="serve-too-many"),
        pytest.param(["profile", "--threads", 0], "thread counts [0] are outside", id="profile-zero"),
        pytest.param(["profile", "--threads", 100_000], "thread counts [100000] are outside",
                     id="profile-too-many"),
        pytest.param(["profile", "--threads", "1-100000"], "has more than 10000 values",
                     id="profile-range-too-long"),
    ],
)
def test_bad_cores(tmp_path, capsys, small_cnn, args, words):
    command, *rest = args
    if command == "plan":
        full = ["plan", "--profile", write_profile(tmp_path, GOOD), "--batch", 1, *rest]
    elif command == "serve":
        full = ["serve", "--run-dir", tmp_path / "run", "--models", f"m={small_cnn.mar_path}", *rest]
    else:
        full = ["profile", small_cnn.mar_path, *rest]
    assert_one_line_error(*run_cli(capsys, *full), words)
    assert not (tmp_path / "run").exists()  # refused before anything was started or written


# ---- batch sizes B -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "args, words",
    [
        pytest.param(["plan", "--batch", 0], "batch size must be an integer >= 1, got 0", id="plan-zero"),
        pytest.param(["plan", "--batch", -1], "batch size must be an integer >= 1, got -1",
                     id="plan-negative"),
        pytest.param(["plan", "--batch", 5], "the largest servable batch is 4", id="plan-beyond"),
        pytest.param(["plan", "--batch", "1,2,99"], "batch size 99 cannot be served",
                     id="plan-one-beyond"),
        pytest.param(["plan", "--batch", 10**20], "cannot be served on 2 cores", id="plan-huge"),
        pytest.param(["plan", "--batch", "8-2"], "'8-2' is an empty range", id="plan-empty-range"),
        pytest.param(["plan", "--batch", "1-100000000"], "has more than 10000 values",
                     id="plan-range-too-long"),
        pytest.param(["plan", "--batch", "x"], "not a list of integers", id="plan-not-int"),
        pytest.param(["serve", "--initial-batch", 0], "--initial-batch must be >= 1, got 0",
                     id="serve-initial-zero"),
        pytest.param(["serve", "--max-batch", 0], "--max-batch must be >= 1, got 0",
                     id="serve-max-zero"),
        pytest.param(["reconfigure", "--for-batch", 0], "--for-batch must be >= 1, got 0",
                     id="reconfigure-zero"),
        pytest.param(["reconfigure", "--for-batch", -3], "--for-batch must be >= 1, got -3",
                     id="reconfigure-negative"),
        pytest.param(["reconfigure", "--instances", 1, "--threads", 1, "--batch", 0],
                     "--batch must be >= 1", id="reconfigure-manual-zero"),
        pytest.param(["reconfigure", "--instances", 0, "--threads", 1, "--batch", 1],
                     "--instances must be >= 1", id="reconfigure-no-instances"),
        pytest.param(["profile", "--max-batch", 0], "--max-batch must be >= 1, got 0",
                     id="profile-max-zero"),
        pytest.param(["profile", "--max-batch", 100_000], "--max-batch must be <= 8192",
                     id="profile-max-too-large"),
    ],
)
def test_bad_batch(tmp_path, capsys, small_cnn, args, words):
    command, *rest = args
    run = tmp_path / "run"
    if command == "plan":
        full = ["plan", "--profile", write_profile(tmp_path, GOOD), "--cores", 2, *rest]
    elif command == "serve":
        full = ["serve", "--run-dir", run, "--models", f"m={small_cnn.mar_path}", *rest]
    elif command == "reconfigure":
        full = ["reconfigure", "--run-dir", run, "--model", "m", *rest]
    else:
        full = ["profile", small_cnn.mar_path, "--threads", 1, *rest]
    assert_one_line_error(*run_cli(capsys, *full), words)
    assert not run.exists()


# ---- zoo names ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["nope", "", "../small-cnn", "small_cnn", "RESNET50"])
@pytest.mark.parametrize("command", ["archive", "demo"])
def test_unknown_zoo_name(tmp_path, capsys, command, name):
    result = run_cli(capsys, command, "--zoo", name, "--out", tmp_path / "out")
    assert_one_line_error(*result, [f"unknown zoo model {name!r}", "known models: bert-base"],
                          command=command)
    assert not (tmp_path / "out").exists()


# ---- archives ----------------------------------------------------------------------------

def rewrite(src: Path, dest: Path, replace: dict[str, bytes | None]) -> Path:
    """A copy of the zip src with members replaced (None: left out)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for name in zin.namelist():
            data = replace.get(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)
    return dest


def make_archive(kind: str, good: Path, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.mar"
    data = good.read_bytes()
    if kind == "missing":
        pass
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_zip":
        path.write_bytes(b"not a zip at all")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bad_crc":
        mid = len(data) // 2  # inside weights.pt's bytes
        path.write_bytes(data[:mid] + b"\0" * 1000 + data[mid + 1000:])
    elif kind == "no_manifest":
        rewrite(good, path, {"MAR-INF/MANIFEST.json": None})
    elif kind == "manifest_not_json":
        rewrite(good, path, {"MAR-INF/MANIFEST.json": b"{"})
    elif kind == "manifest_without_handler":
        rewrite(good, path, {"MAR-INF/MANIFEST.json": b'{"model": {}}'})
    elif kind == "no_spec":
        rewrite(good, path, {"packrat.json": None})
    elif kind == "spec_not_json":
        rewrite(good, path, {"packrat.json": b"{"})
    elif kind == "no_weights":
        rewrite(good, path, {"weights.pt": None})
    elif kind == "garbage_weights":
        rewrite(good, path, {"weights.pt": b"garbage"})
    elif kind == "unsafe_path":
        rewrite(good, path, {})
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr("../evil.py", "")
    elif kind == "dir_without_manifest":
        path.mkdir()
    return path


ARCHIVE_CASES = {
    "missing": "not found",
    "empty": "is not a zip file",
    "not_zip": "is not a zip file",
    "truncated": "is not a zip file",
    "bad_crc": "is corrupt or unreadable (Bad CRC-32",
    "no_manifest": "has no MAR-INF/MANIFEST.json",
    "manifest_not_json": "MAR-INF/MANIFEST.json is not valid JSON",
    "manifest_without_handler": "MANIFEST.json names no handler",
    "no_spec": "has no packrat.json",
    "spec_not_json": "packrat.json is not valid JSON",
    "no_weights": "has no weights.pt",
    # only found when the model loads, in the profiler's worker process
    "garbage_weights": "cannot load state_dict",
    "unsafe_path": "unsafe path '../evil.py'",
    "dir_without_manifest": "directory without MAR-INF/MANIFEST.json",
}


@pytest.mark.parametrize("kind", ARCHIVE_CASES)
def test_bad_archive(tmp_path, capsys, small_cnn, kind):
    path = make_archive(kind, small_cnn.mar_path, tmp_path)
    result = run_cli(capsys, "profile", path, "--threads", 1, "--max-batch", 1, "--reps", 1,
                     "--min-time", 0)
    # the progress line ahead of the error is there when the model was being loaded
    assert_one_line_error(*result, ARCHIVE_CASES[kind], command="profile", before=("profiling ",))
    assert path.name in result[2] or kind == "garbage_weights"


# ---- `packrat serve`: its archives and profiles, checked before TorchServe starts --------

@pytest.mark.parametrize(
    "case, words",
    [
        ("archive_missing", ["model m: archive", "does not exist"]),
        ("archive_not_zip", "is not a zip file"),
        ("archive_spec_not_json", "packrat.json is not valid JSON"),
        ("archive_manifest_without_handler", "names no handler"),
        ("archive_no_weights", "has no weights.pt"),
        ("archive_bad_crc", "is corrupt or unreadable (Bad CRC-32"),
        ("profile_missing", ["model m: profile", "does not exist"]),
        ("profile_nan", "latency_ms is 'nan'"),
        ("profile_huge_batch", "batch must be an integer in 1..8192"),
        ("profile_wrong_columns", "unrecognized columns"),
        ("models_empty", "--models names no model"),
        ("models_twice", "--models names 'm' twice"),
        ("models_not_pairs", "is not NAME=FILE"),
        ("extra_profile", "--profiles names models not in --models: other"),
    ],
)
def test_serve_bad_input(tmp_path, capsys, small_cnn, case, words):
    mar = small_cnn.mar_path
    profile = write_profile(tmp_path, GOOD)
    models, profiles = f"m={mar}", f"m={profile}"
    if case.startswith("archive"):
        models = f"m={make_archive(case.split('_', 1)[1], mar, tmp_path)}"
    elif case == "profile_missing":
        profiles = f"m={tmp_path / 'nope.csv'}"
    elif case.startswith("profile"):
        content = {"profile_nan": HEADER + "1,1,nan\n",
                   "profile_huge_batch": HEADER + "1,99999999999,3\n",
                   "profile_wrong_columns": "threads,batch\n1,1\n"}[case]
        profiles = f"m={write_profile(tmp_path, content)}"
    elif case == "models_empty":
        models = ""
    elif case == "models_twice":
        models = f"m={mar},m={mar}"
    elif case == "models_not_pairs":
        models = str(mar)
    elif case == "extra_profile":
        profiles = f"m={profile},other={profile}"
    run = tmp_path / "run"
    result = run_cli(capsys, "serve", "--run-dir", run, "--models", models, "--profiles", profiles)
    if case == "archive_bad_crc":
        # a corrupt member is only found as the archive is unpacked, into the run directory
        assert_one_line_error(*result, words, command="serve", before=("run directory: ",))
        assert not (run / "state.json").exists() and not (run / "model_store").exists()
    else:
        # everything else is refused before the run directory is touched
        assert_one_line_error(*result, words, command="serve")
        assert not run.exists()


# ---- model names -------------------------------------------------------------------------

BAD_NAMES = ["a/b", "..", "../x", "x/../y", "/abs", "a.b", "-lead", "x" * 65, "x\n", "a b"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("command", ["serve", "reconfigure", "load"])
def test_bad_model_name(tmp_path, capsys, small_cnn, command, name):
    run = tmp_path / "run"
    if command == "serve":
        args = ["serve", "--run-dir", run, f"--models={name}={small_cnn.mar_path}"]
    elif command == "reconfigure":
        args = ["reconfigure", "--run-dir", run, f"--model={name}", "--for-batch", 2]
    else:
        args = ["load", "--run-dir", run, f"--model={name}", "--body", small_cnn.example_path,
                "--phases", "1:1"]
    assert_one_line_error(*run_cli(capsys, *args), f"invalid model name {name!r}", command=command)
    assert not run.exists()


def test_load_missing_body_file(tmp_path, capsys):
    result = run_cli(capsys, "load", "--run-dir", tmp_path / "run", "--model", "m",
                     "--body", tmp_path / "nope.json")
    assert_one_line_error(*result, ["--body", "nope.json", "does not exist"], command="load")


@pytest.mark.parametrize("content", ["[]", "{not json", '{"models": 3}'])
def test_status_of_a_corrupt_state_file(tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(content)
    result = run_cli(capsys, "status", "--run-dir", run)
    assert_one_line_error(*result, "is not a Packrat state file", command="status")


# ---- request bodies ----------------------------------------------------------------------

SPEC = get_zoo_model("small-cnn").spec  # pixel_values: float32 [3, 32, 32]
NUMEL = 3 * 32 * 32


def b64(n_bytes: int, shape=(3, 32, 32), dtype="float32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "b64": base64.b64encode(b"\0" * n_bytes).decode()}


def nested(depth: int) -> bytes:
    return b'{"pixel_values": ' + b"[" * depth + b"]" * depth + b"}"


# name: (body, or a function making a big one, words in the error)
BODY_CASES = {
    # empty
    "empty_bytes": (b"", "request body is empty"),
    "empty_str": ("", "request body is empty"),
    "empty_object": ({}, "missing input(s) ['pixel_values']"),
    "empty_list": ({"pixel_values": []}, "is empty"),
    # malformed
    "not_json": (b"{not json", "not valid JSON"),
    "truncated_json": (b'{"pixel_values": [[', "not valid JSON"),
    "whitespace": (b"   ", "not valid JSON"),
    "not_utf8": (b"\xff\xfe{}", "not UTF-8"),
    "not_object": (b"[1, 2, 3]", "must be a JSON object, got list"),
    "null": (b"null", "must be a JSON object, got NoneType"),
    "nested_too_deeply": (lambda: nested(100_000), "nested too deeply"),
    "unknown_input": ({"pixel_values": [0], "other": 1}, "unknown input(s) ['other']"),
    "not_numbers": ({"pixel_values": [["a"] * 32] * 3}, "must hold only numbers"),
    "string_value": ({"pixel_values": "abc"}, "must be a nested list"),
    "ragged": ({"pixel_values": [[[0.0] * 32] * 32, [[0.0] * 32] * 32, [[0.0] * 31]]},
               "not a regular nested list"),
    "bad_b64": ({"pixel_values": {"dtype": "float32", "shape": [3, 32, 32], "b64": "@@@@"}},
                "not valid base64"),
    "nan": ({"pixel_values": [[[float("nan")] * 32] * 32] * 3}, "NaN or infinity"),
    # wrong shape
    "shape_flat": ({"pixel_values": [0.0] * NUMEL}, f"has shape [{NUMEL}]"),
    "shape_short": ({"pixel_values": [[1, 2]]}, "has shape [1, 2]"),
    "shape_transposed": ({"pixel_values": [[[0.0] * 3] * 32] * 32}, "has shape [32, 32, 3]"),
    "b64_shape": ({"pixel_values": b64(NUMEL * 4, shape=(32, 32, 3))}, "shape [32, 32, 3] does not match"),
    "b64_dtype": ({"pixel_values": b64(NUMEL * 8, dtype="int64")}, "dtype 'int64' does not match"),
    "b64_too_few_bytes": ({"pixel_values": b64(100)}, "decodes to 100 bytes"),
    # too large
    "body_over_limit": (lambda: b" " * (MAX_BODY_BYTES + 1), "over the 67108864 byte limit"),
    "too_many_values": (lambda: {"pixel_values": [0.0] * 1_000_000},
                        "has shape [1000000], more values than expected"),
    "too_many_values_nested": (lambda: {"pixel_values": [[[0.0] * 32] * 32] * 1000},
                               "more values than expected"),
    "b64_too_many_bytes": (lambda: {"pixel_values": b64(3_000_000)}, "decodes to 3000000 bytes"),
    "huge_declared_shape": ({"pixel_values": {"dtype": "float32", "shape": [10**9] * 3, "b64": "AAAA"}},
                            "does not match"),
}


@pytest.mark.parametrize("case", BODY_CASES)
def test_bad_request_body(case):
    body, words = BODY_CASES[case]
    body = body() if callable(body) else body
    with pytest.raises(RequestError) as e:
        decode_request(body, SPEC)
    message = str(e.value)
    assert words in message
    assert isinstance(e.value, PackratError)
    assert "\n" not in message and len(message) < 500  # one line, fit for an HTTP answer


@pytest.mark.parametrize(
    "case", ["too_many_values", "too_many_values_nested", "b64_too_many_bytes", "huge_declared_shape"]
)
def test_too_large_bodies_are_refused_before_allocating(case):
    # Refused from the value's length or declared shape: no array or decoded buffer is built.
    # (A 3x32x32 float32 input is 12 KB; these bodies would make megabytes.)
    body, _ = BODY_CASES[case]
    body = body() if callable(body) else body
    tracemalloc.start()
    try:
        with pytest.raises(RequestError):
            decode_request(body, SPEC)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200_000, f"decoding a refused body allocated {peak} bytes"


def test_handler_answers_each_bad_request_alone(small_cnn, tmp_path):
    # The handler as TorchServe drives it: one batch of good and bad requests; each bad one
    # gets its error, the good ones their output, and the handler goes on serving.
    from packrat.model.archive import extract_archive
    from tests.test_zoo_archive import make_handler

    model_dir = extract_archive(small_cnn.mar_path, tmp_path / "m")
    example = small_cnn.example_path.read_bytes()
    cases = ["empty_bytes", "not_json", "nested_too_deeply", "shape_short", "too_many_values"]
    bad = [BODY_CASES[c][0] for c in cases]
    requests = ([{"body": example}] + [{"body": b() if callable(b) else b} for b in bad]
                + [{"body": example}])
    handler, context = make_handler(model_dir, len(requests))
    for _ in range(2):  # a second batch: the handler is still usable
        out = handler.handle(requests, context)
        assert [("output" in r) for r in out] == [True] + [False] * len(cases) + [True]
        for r, c in zip(out[1:-1], cases):
            assert BODY_CASES[c][1] in r["error"]
        assert [context.get_response_status(i)[0] for i in range(1, len(cases) + 1)] == [400] * len(cases)
