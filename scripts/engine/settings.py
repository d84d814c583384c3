"""The engines' settings, from the workflow config: the environment every engine runs
with, the Python that runs them and their command line (as rule fetch_model checks it
against the installed vLLM).

Stdlib only, so dry runs and DAG pictures work on a login node without vLLM.
"""

from __future__ import annotations

import os
import sys

from engine import lifecycle


def vllm_cache_root(config: dict) -> str:
    return os.path.abspath(os.path.expanduser(config["vllm_cache_root"]))


def offline_env(config: dict) -> dict:
    """What every engine runs with: no hub (compute nodes have no internet), and the
    model-info cache rule fetch_model built (else vLLM fails on a node's first run)."""
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CACHE_ROOT": vllm_cache_root(config),
    } | config["task_env"]


def inference_python(config: dict) -> str:
    return config["python"] or sys.executable


def engine_check_argv(config: dict, model: str) -> tuple[list[str], str, dict]:
    """The engines' command line of this config, the server that parses it (config
    warm.server; vLLM's engine arguments for per-rank engines) and each flag's config key."""
    server = config["warm"]["server"] if config["warm_engines"] else "inprocess"
    settings = config["vllm"]
    argv = lifecycle.server_argv(
        inference_python(config),
        model,
        config["tiles"]["base_port"] + 1000,
        settings,
        config["tiles"]["per_job"],
        server=server,
    )
    keys = {a: lifecycle.flag_key(a, settings) for a in argv if a.startswith("--")}
    return argv, server, keys
