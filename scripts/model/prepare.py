"""The model a run uses: checks of config model, rule fetch_model (weights and vLLM's
model-info cache, on the login side) and its marker, and a node's staged copy in a PBS
submission. Each takes the run's settings (formats/settings.py); the engines' command line
is engine/settings.py's.

Stdlib only, so dry runs and DAG pictures work on a login node without vLLM.
"""

import json
import os
import re
import subprocess
import time
from pathlib import Path

from engine import watchdog
from engine.settings import engine_check_argv
from formats.registry import REGISTRY_ROOT
from formats.settings import Settings
from formats.workflow_config import ConfigError
from model import fetch

# Beside warm engines: how long rule fetch_model waits for one of them to claim the model's
# preparation (each claims it as its process starts) before it runs fetch.py itself.
CLAIM_WAIT_S = 60.0


def is_local_model(model: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything that exists or looks like a path is local."""
    return (
        Path(model).expanduser().exists()
        or model.startswith(("/", "./", "../", "~"))
        or model.count("/") > 1
    )


def check_model(model: str) -> str:
    """Return the model as the engine should see it, failing early on a missing local folder."""
    if not is_local_model(model):
        return model
    path = Path(model).expanduser().resolve()
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise ConfigError(f"config key 'model': local model folder {model!r} {what}")
    return str(path)


def model_slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", model)


def model_marker(settings: Settings, model: str) -> list[str]:
    """Rule fetch_model's output that rank jobs wait for (none for the echo engine): it
    names the model folder the engines load, with vLLM's model-info cache built."""
    if settings.engine == "echo":
        return []
    return [f"{settings.results_dir}/model/{model_slug(model)}.json"]


def fetch_env(settings: Settings, environ=os.environ) -> dict:
    """The task's environment, online: the login node may download what jobs may not."""
    env = {**environ, **settings.engine_env}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    return env


def fetch_argv(settings: Settings, model: str, marker: str) -> list[str]:
    """fetch.py and its arguments (the Python that runs it is the engines')."""
    weights = settings.weights
    argv, server, keys = engine_check_argv(settings, model)
    return [
        str(Path(fetch.__file__)),
        "--model",
        model,
        "--marker",
        os.path.abspath(marker),
        "--shared-hf-home",
        weights.shared_hf_home,
        "--hf-home",
        os.path.abspath(os.path.expanduser(weights.hf_home)),
        "--engine-argv",
        json.dumps(argv),
        "--server",
        server,
        "--flag-keys",
        json.dumps(keys),
    ]


def beside_engines(settings: Settings, model: str, marker: str, log: str) -> list[str]:
    """What the engines started beside rule fetch_model run before their server's argv
    (engine spec ``prepare``): fetch.py, so that one of them prepares the model."""
    fetch.forget(os.path.abspath(log))
    return [*fetch_argv(settings, model, marker), "--log", os.path.abspath(log), fetch.SERVE]


def status_beside(log: str, claim_wait_s: float = CLAIM_WAIT_S) -> int | None:
    """The status of the preparation an engine ran beside the rule (its output in
    ``log``); None when no engine claimed it within ``claim_wait_s`` (the rule has now,
    and runs fetch.py itself). An engine that died before its checks ended fails the
    rule (after a Ctrl-C the run is ending: nothing new starts)."""
    log = os.path.abspath(log)
    started = time.monotonic()
    while (code := fetch.status(log)) is None:
        pid = fetch.claimant(log)
        if pid is None and time.monotonic() - started > claim_wait_s and fetch.claim(log):
            return None
        if pid and not watchdog.alive(pid) and (code := fetch.status(log)) is None:
            raise RuntimeError(
                f"the engine that ran rule fetch_model's checks (pid {pid}) ended before "
                f"they did; see {log} and the engine logs in {REGISTRY_ROOT}/"
            )
        time.sleep(0.05)
    return code


def fetch_model(
    settings: Settings, model: str, marker: str, log: str, beside: bool = False
) -> None:
    """Find or fetch the model's weights, check the engines' command line against the
    installed vLLM and build vLLM's model-info cache (rule fetch_model); ``beside``: the
    engines started with the rule (`beside_engines`) do it, unless none claims it."""
    try:
        code = status_beside(log) if beside else None
        if code is None:
            command = [settings.inference_python, *fetch_argv(settings, model, marker)]
            with open(log, "w") as stream:
                code = subprocess.run(
                    command, env=fetch_env(settings), stdout=stream, stderr=stream
                ).returncode
    finally:
        if beside:  # the claim held off the engines until the outcome was known
            fetch.forget(os.path.abspath(log))
    if code != 0:
        errors = [line for line in Path(log).read_text().splitlines() if line.startswith("ERROR:")]
        cause = f": {errors[-1][len('ERROR: ') :]}" if errors else ""
        raise RuntimeError(f"preparing model {model!r} failed{cause}; see {log}")


def check_chat_template(settings: Settings) -> None:
    """Config vllm.chat_template must name a readable file: else every chat rank would
    fail (or every warm engine fail to start) only once the run is under way."""
    path = settings.vllm.chat_template
    if path and not os.path.isfile(os.path.expanduser(path)):
        raise ConfigError(f"config key 'vllm.chat_template': no such file {path!r}")
