"""The layer contracts of ARCHITECTURE.md, checked by import-linter ([tool.importlinter] in
pyproject.toml): imports point one way only, cli > bench > serving > torchserve > worker >
measure > model > core, and the core imports no torch."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


@require(LINT_IMPORTS.is_file(), "import-linter (pip install -e '.[dev]')")
def test_layer_contracts_hold():
    out = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"lint-imports failed:\n{out.stdout}\n{out.stderr}"
    assert "0 broken" in out.stdout, out.stdout
