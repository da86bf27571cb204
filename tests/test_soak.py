"""scripts/soak.py end to end, short: a few reconfigurations under load through `packrat
serve` on a real TorchServe, nothing lost, the summary and soak.json written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TORCHSERVE, has_torchserve, require
from tests.serving import CORES, N_SERVE, PROFILE, SERVE_CORES, on_cores

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


@require(has_torchserve(), TORCHSERVE)
@require(len(CORES) >= N_SERVE, f"{N_SERVE} usable cores: the test PROFILE is for 2")
def test_soak_runs_and_reports(tmp_path):
    profile = tmp_path / "p.csv"
    profile.write_text(PROFILE)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--reconfigurations", "3", "--clients", "3",
         "--out", str(tmp_path / "soak"), "--profile", str(profile)],
        capture_output=True, text=True, timeout=600,
        preexec_fn=on_cores(SERVE_CORES),  # soak.py serves on every core it may use
    )
    print(out.stdout, out.stderr)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "soak" / "soak.json").read_text())
    assert report["cores"] == len(SERVE_CORES)
    assert report["reconfigurations"] == 3 and report["failed_switches"] == 0
    assert report["answered"] > 0 and report["failed"] == 0 and report["unanswered"] == 0
    assert report["versions_left"] == 1
    # the same plan at start and end: one worker of all cores
    assert len(report["memory_start"]["workers_mb"]) == len(report["memory_end"]["workers_mb"]) == 1
    assert "0 failed, 0 unanswered" in out.stdout


def test_soak_refuses_too_few_reconfigurations(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--reconfigurations", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "at least 2" in out.stderr
