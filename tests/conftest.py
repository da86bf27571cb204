"""The `served` fixture: `packrat serve` of small-cnn with a known profile, stopped after."""

import subprocess
import sys

import pytest

from packrat.model.archive import build_zoo_archive
from packrat.serving.rundir import RunDir
from packrat.torchserve import server_processes
from tests.serving import PROFILE, packrat, status, wait_for


@pytest.fixture
def served(tmp_path):
    archives = tmp_path / "archives"
    mar = build_zoo_archive("small-cnn", archives).mar_path
    profile = tmp_path / "small.csv"
    profile.write_text(PROFILE)
    run = tmp_path / "run"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "packrat.cli", "serve", "--run-dir", run, "--models",
         f"small-cnn={mar}", "--profiles", f"small-cnn={profile}", "--interval", "0.5"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: (run / "state.json").is_file() and status(run)["models"]["small-cnn"]["version"],
                 what="packrat serve to register small-cnn")
        yield proc, run, archives / "small-cnn.example.json"
    finally:
        if proc.poll() is None:
            stop = packrat("stop", "--run-dir", run)
            assert stop.returncode == 0, stop.stderr
        proc.wait(timeout=60)
        log.close()
        print((tmp_path / "serve.log").read_text())
        assert server_processes(RunDir(run).torchserve) == []
