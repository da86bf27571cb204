"""A wheel install works: scripts/check_install.sh makes a fresh venv, `pip install`s the
repository (not editable) and, from outside the checkout, archives, profiles and serves
small-cnn, answers one request and stops (about 2 minutes here, most of it pip)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TORCHSERVE, has_torchserve, require

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_install.sh"

pytestmark = pytest.mark.integration


@require(shutil.which("bash") is not None and shutil.which("python3") is not None, "bash and python3")
@require(has_torchserve(), TORCHSERVE)
def test_wheel_install_archives_profiles_serves_and_stops():
    out = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, f"{SCRIPT.name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    assert "PASS: wheel install" in out.stderr
    assert "-> 200: 10 outputs" in out.stderr
