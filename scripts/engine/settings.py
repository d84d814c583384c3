"""The engines' command line of the run's settings, as rule fetch_model checks it against
the installed vLLM. (What every engine runs with, and the Python that runs them, are
derived once with the settings: formats/settings.py engine_env, inference_python.)

Stdlib only, so dry runs and DAG pictures work on a login node without vLLM.
"""

from __future__ import annotations

from engine import lifecycle
from formats.settings import Settings, plain


def engine_check_argv(settings: Settings, model: str) -> tuple[list[str], str, dict]:
    """The engines' command line of these settings, the server that parses it (config
    warm.server; vLLM's engine arguments for per-rank engines) and each flag's config key."""
    server = settings.warm.server if settings.warm_engines else "inprocess"
    vllm = plain(settings.vllm)
    argv = lifecycle.server_argv(
        settings.inference_python,
        model,
        settings.tiles.base_port + 1000,
        vllm,
        settings.tiles.per_job,
        server=server,
    )
    keys = {a: lifecycle.flag_key(a, vllm) for a in argv if a.startswith("--")}
    return argv, server, keys
