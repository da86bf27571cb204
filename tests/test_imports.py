"""Commands that only read files or talk to a server start fast: `packrat plan`, `status`
and `--help` never import torch or transformers (seconds, and hundreds of MB, per call).
Each runs in a fresh interpreter, so nothing imported by other tests counts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
HEAVY = ("torch", "transformers")

PROBE = """
import json, sys
from packrat.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def run_cli(*argv):
    out = subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out


@pytest.mark.parametrize(
    "argv,ok",
    [
        (["plan", "--profile", DATA / "pytorch_resnet_latency.csv", "--batch", 8], True),
        (["status", "--run-dir", "{empty}"], False),  # no state: an error, still no torch
        (["--help"], True),
    ],
    ids=["plan", "status", "help"],
)
def test_light_commands_do_not_import_torch(tmp_path, argv, ok):
    argv = [str(a).replace("{empty}", str(tmp_path)) for a in argv]
    result, out = run_cli(*argv)
    assert result["heavy"] == [], f"packrat {' '.join(argv)} imported {result['heavy']}"
    assert (result["code"] in (0, None)) == ok, out.stderr


def test_the_probe_sees_torch_when_a_command_needs_it(tmp_path):
    """The check can fail: `packrat archive` builds a model, so it imports torch."""
    result, out = run_cli("archive", "--zoo", "small-cnn", "--out", tmp_path)
    assert result["code"] in (0, None), out.stderr
    assert "torch" in result["heavy"]
