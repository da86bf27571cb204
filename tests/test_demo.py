"""`packrat demo` end to end on small-cnn (real TorchServe), shortened, on 2 cores."""

import subprocess
import sys

import pytest

from packrat.serving.rundir import RunDir
from packrat.torchserve import server_processes
from tests.conftest import TORCHSERVE, has_torchserve, require
from tests.serving import CORES, N_SERVE, SERVE_CORES, on_cores

pytestmark = [pytest.mark.integration, require(has_torchserve(), TORCHSERVE),
              require(len(CORES) >= N_SERVE, f"{N_SERVE} usable cores")]


def test_demo_runs_and_stops_everything(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "packrat.cli", "demo", "--zoo", "small-cnn", "--out", tmp_path,
         "--phases", "1:4,8:10", "--baseline-seconds", "3"],
        capture_output=True, text=True, timeout=300,
        preexec_fn=on_cores(SERVE_CORES),  # the demo has no --cores; its run time is for 2 cores
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "phase: 8 concurrent clients" in out.stderr and "B estimate" in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["clients", "Packrat", "plan"]
    assert [ln.split()[0] for ln in lines[1:3]] == ["1", "8"]
    assert "0 failed or unanswered" in out.stdout
    assert server_processes(RunDir(tmp_path / "run").torchserve) == []
