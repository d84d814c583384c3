"""The repository stays formatted and lint-clean (snakefmt, ruff, snakemake --lint)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        [str(BIN / "snakefmt"), "--check", "Snakefile"],
        [str(BIN / "ruff"), "check", "."],
        [str(BIN / "ruff"), "format", "--check", "."],
        [sys.executable, "-m", "snakemake", "--lint", "--profile", "profiles/local"],
    ],
    ids=["snakefmt", "ruff-check", "ruff-format", "snakemake-lint"],
)
def test_clean(command):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    if "--lint" in command:
        assert "Congratulations, your workflow is in a good condition" in result.stderr
