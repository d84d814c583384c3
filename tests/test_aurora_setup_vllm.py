"""vLLM's "does not fit" refusal as the engines' supervisor reads it (supervisor.DOES_NOT_FIT),
in the vLLM source of both tested versions: the project's venv (vLLM 0.32) and vLLM 0.15.0,
the version of Aurora's module frameworks/2025.3.1 (`.venv-vllm015`, which `make test-vllm`
builds and `make test-unit` does not). The rest of the Aurora set-up:
tests/test_aurora_setup.py."""

from __future__ import annotations

import re

import pytest

from engine import supervisor
from test_aurora_setup import REPO

pytestmark = pytest.mark.vllm


# .venv-vllm015 is the vLLM tier's (make test-vllm builds it, make test-unit does not).
VLLM015 = pytest.param(".venv-vllm015", marks=[pytest.mark.vllm015, pytest.mark.vllm])


@pytest.mark.parametrize("venv", [".venv", VLLM015])
def test_does_not_fit_patterns_are_vllms_own_messages(venv):
    """The patterns are in the vLLM source of both tested versions (they change between
    releases: "model's" in 0.32, "models's" in 0.15)."""
    source = next(
        (REPO / venv / "lib").glob("python3*/site-packages/vllm/v1/core/kv_cache_utils.py")
    )
    text = re.sub(r'"\s*\n\s*f?"', "", source.read_text())  # join implicit concatenation
    for pattern in supervisor.DOES_NOT_FIT:
        assert pattern in text, (venv, pattern)
