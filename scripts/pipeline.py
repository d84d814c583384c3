"""Glue between the Snakefile and the task: model checks, task settings, one rank's job.

Stdlib only, so dry runs and DAG pictures work on a login node without vLLM.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import tiles


class ConfigError(ValueError):
    """A config value that cannot work, named by its key."""


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


def pending_ranks(ranks, data_dir: str, results_dir: str, marker=()) -> list[str]:
    """Ranks whose outputs (``.out`` and record) are missing or older than the input.

    What a run will redo: rule infer writes both, and rule summary needs the records.

    All of them while the model still has to be fetched (``marker`` missing): the
    fetch job then updates every rank's input.
    """
    if any(not os.path.exists(path) for path in marker):
        return list(ranks)
    pending = []
    for rank in ranks:
        since = Path(data_dir, f"{rank}.in").stat().st_mtime
        outputs = (Path(results_dir, f"{rank}.out"), Path(results_dir, "records", f"{rank}.json"))
        if any(not out.exists() or out.stat().st_mtime < since for out in outputs):
            pending.append(rank)
    return pending


def task_settings(config: dict, model: str) -> dict:
    """What scripts/infer.py needs, as one JSON-able mapping."""
    return {"engine": config["engine"], "model": model, "sampling": config["sampling"]} | config[
        "vllm"
    ]


def inference_python(config: dict) -> str:
    return config["python"] or sys.executable


def model_marker(config: dict, model: str) -> list[str]:
    """The fetched-model marker that rank jobs wait for: none for a local folder or echo."""
    if is_local_model(model) or config["engine"] == "echo":
        return []
    return [f"{config['results_dir']}/model/{model_slug(model)}.json"]


def fetch_env(config: dict, environ=os.environ) -> dict:
    """The task's environment, online: the login node may download what jobs may not."""
    env = {**environ, **config["task_env"]}
    env.pop("HF_HUB_OFFLINE", None)
    return env


def fetch_model(config: dict, model: str, marker: str, log: str) -> None:
    """Fetch a hub model into the cache the jobs read (rule fetch_model)."""
    command = [inference_python(config), str(Path(__file__).with_name("fetch_model.py"))]
    with open(log, "w") as stream:
        code = subprocess.run(
            [*command, model, marker], env=fetch_env(config), stdout=stream, stderr=stream
        ).returncode
    if code != 0:
        raise RuntimeError(f"fetching model {model!r} failed; see {log}")


def run_rank(config: dict, model: str, rank: str, input, output, log: str) -> None:
    """Run one rank's inference on a tile of this allocation; raise if it failed."""
    prompts, out, record = input.prompts, output.out, output.record
    script = Path(__file__).with_name("infer.py")
    command = [
        inference_python(config),
        str(script),
        "--rank",
        rank,
        "--prompts",
        str(prompts),
        "--output",
        str(out),
        "--record",
        str(record),
        "--settings",
        json.dumps(task_settings(config, model)),
    ]
    placement = config["tiles"]
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    code = tiles.run_placed(
        command,
        log_path=Path(log),
        tiles_per_job=placement["per_job"],
        tiles_per_node=placement["per_node"],
        hierarchy_setting=placement["hierarchy"],
        base_port=placement["base_port"],
        cpu_bind=placement["cpu_bind"],
        launcher=config["launcher"],
        extra_env=config["task_env"],
    )
    if code != 0:
        raise RuntimeError(f"rank {rank} failed with exit code {code}; see {log}")


def report_failures(ranks, results_dir: str, log_pattern: str, stream=sys.stderr) -> None:
    """Print which ranks ran and failed (a log but no output), and where to look."""
    logs = {rank: log_pattern.format(rank=rank) for rank in ranks}
    failed = [
        (rank, log)
        for rank, log in logs.items()
        if not os.path.exists(f"{results_dir}/{rank}.out") and os.path.exists(log)
    ]
    if not failed:
        print("No rank failed; the error is in the messages above.", file=stream)
        return
    lines = [f"{len(failed)} rank(s) failed; their outputs are missing, the others are kept:"]
    lines += [f"  rank {rank}: {log}" for rank, log in failed]
    lines.append("Fix the cause and run the same command again: only these ranks run.")
    print("\n".join(lines), file=stream)
