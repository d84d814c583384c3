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
from pathlib import Path

from engine.settings import engine_check_argv
from formats.settings import Settings
from formats.workflow_config import ConfigError


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


def fetch_model(settings: Settings, model: str, marker: str, log: str) -> None:
    """Find or fetch the model's weights, check the engines' command line against the
    installed vLLM and build vLLM's model-info cache (rule fetch_model)."""
    weights = settings.weights
    argv, server, keys = engine_check_argv(settings, model)
    command = [
        settings.inference_python,
        str(Path(__file__).with_name("fetch.py")),
        "--model",
        model,
        "--marker",
        marker,
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
    with open(log, "w") as stream:
        code = subprocess.run(
            command, env=fetch_env(settings), stdout=stream, stderr=stream
        ).returncode
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
