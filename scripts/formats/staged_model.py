"""Where a submission's node-local copy of the model and of vLLM's model-info cache lie
(config weights.stage_dir): model/stage.py writes them, the engines' supervisor and the
rank tasks read them."""

from __future__ import annotations

from pathlib import Path

from formats.files import safe_name


def staged_path(stage_dir: str, job_id: str, host: str, model: str) -> Path:
    """Where ``model`` lies on ``host`` during PBS job ``job_id``."""
    return Path(stage_dir) / f"model-{safe_name(job_id)}" / safe_name(host) / Path(model).name


def staged_cache_root(stage_dir: str, job_id: str, host: str) -> Path:
    """Where vLLM's model-info cache (VLLM_CACHE_ROOT, built by rule fetch_model) lies on
    ``host`` during PBS job ``job_id``: engines read it from node-local space, as
    ALCF's GettingStarted examples copy it to each node's /tmp."""
    return Path(stage_dir) / f"model-{safe_name(job_id)}" / safe_name(host) / "vllm-cache"
