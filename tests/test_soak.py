"""scripts/soak.py end to end, short: a few reconfigurations under load through `packrat
serve` on a real TorchServe, nothing lost, the summary and soak.json written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TORCHSERVE, has_torchserve, require
from tests.serving import CORES, N_SERVE, PROFILE

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


@require(has_torchserve(), TORCHSERVE)
@require(len(CORES) >= N_SERVE, f"{N_SERVE} usable cores: the test PROFILE is for 2")
def test_soak_runs_and_reports(tmp_path):
    profile = tmp_path / "p.csv"
    profile.write_text(PROFILE)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--reconfigurations", "3", "--clients", "3",
         "--cores", str(N_SERVE), "--out", str(tmp_path / "soak"), "--profile", str(profile)],
        capture_output=True, text=True, timeout=600,
    )
    print(out.stdout, out.stderr)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "soak" / "soak.json").read_text())
    assert report["cores"] == N_SERVE  # the plans cycled through are those of N_SERVE cores
    assert report["reconfigurations"] == 3 and report["failed_switches"] == 0
    assert report["answered"] > 0 and report["failed"] == 0 and report["unanswered"] == 0
    assert report["versions_left"] == 1
    # the same plan at start and end: one worker of all N_SERVE cores
    assert len(report["memory_start"]["workers_mb"]) == len(report["memory_end"]["workers_mb"]) == 1
    assert "0 failed, 0 unanswered" in out.stdout
    # the cycle starts and ends on one instance of all N_SERVE threads, not of every usable core
    assert f"(1x<t={N_SERVE},b=1>)" in out.stdout and f"[3/3] 1x<t={N_SERVE},b=1>" in out.stdout


def test_soak_refuses_too_few_reconfigurations(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--reconfigurations", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "at least 2" in out.stderr


@pytest.mark.parametrize("cores", [0, len(CORES) + 1])
def test_soak_refuses_cores_it_may_not_use(tmp_path, cores):
    out = subprocess.run([sys.executable, str(SCRIPT), "--cores", str(cores),
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"--cores {cores}: this process may use 1..{len(CORES)}" in out.stderr
