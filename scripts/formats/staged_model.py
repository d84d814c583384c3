"""Where a submission's node-local copy of the model and of vLLM's model-info cache lie
(config weights.stage_dir): model/stage.py writes them, the engines' supervisor and the
rank tasks read them (`staged`: a rank job's way to its node's copy)."""

from __future__ import annotations

import os
from pathlib import Path

from formats.files import safe_name
from formats.settings import Settings


def staged_path(stage_dir: str, job_id: str, host: str, model: str) -> Path:
    """Where ``model`` lies on ``host`` during PBS job ``job_id``."""
    return Path(stage_dir) / f"model-{safe_name(job_id)}" / safe_name(host) / Path(model).name


def staged_cache_root(stage_dir: str, job_id: str, host: str) -> Path:
    """Where vLLM's model-info cache (VLLM_CACHE_ROOT, built by rule fetch_model) lies on
    ``host`` during PBS job ``job_id``: engines read it from node-local space, as
    ALCF's GettingStarted examples copy it to each node's /tmp."""
    return Path(stage_dir) / f"model-{safe_name(job_id)}" / safe_name(host) / "vllm-cache"


def staged(settings: Settings, model: str, environ=os.environ):
    """With config weights.stage on inside a PBS job: host -> that node's copy of the
    model (scripts/model/stage.py made it). Otherwise None."""
    job = environ.get("PBS_JOBID")
    if not (settings.weights.stage and job and settings.engine != "echo"):
        return None
    return lambda host: str(staged_path(settings.weights.stage_dir, job, host, model))
