"""Glue between the Snakefile and the task: model checks, task settings, one rank's job.

Stdlib only, so dry runs and DAG pictures work on a login node without vLLM.
"""

import atexit
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import engines
import infer
import progress
import ranks as rank_files
import serve
import stage_model
import tiles
from fetch_model import read_marker


class ConfigError(ValueError):
    """A config value that cannot work, named by its key."""


_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _from_string(text: str, types) -> object:
    """``text`` as the first of the JSON schema ``types`` it reads as, else unchanged."""
    for kind in [types] if isinstance(types, str) else types:
        word = text.strip()
        if kind == "integer" and re.fullmatch(r"[+-]?\d+", word):
            return int(word)
        if kind == "number" and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", word):
            return float(word) if re.search(r"[.eE]", word) else int(word)
        if kind == "boolean" and word.lower() in _BOOLEANS:
            return _BOOLEANS[word.lower()]
        if kind == "null" and word.lower() in ("null", "none", "~", ""):
            return None
    return text


def coerce_config(config: dict, schema: dict) -> dict:
    """Turn strings into the numbers, booleans and nulls the schema asks for, in place.

    ``--config 'pbs={nodes_per_submission: 8}'`` hands Snakemake's config the values of
    such a mapping as strings; without this the schema refuses "'8'".
    """
    properties = schema.get("properties", {})
    for key, value in config.items():
        sub = properties.get(key)
        if not isinstance(sub, dict):
            continue
        if isinstance(value, dict):
            coerce_config(value, sub)
        elif isinstance(value, str) and sub.get("type") not in (None, "string"):
            config[key] = _from_string(value, sub["type"])
    return config


def load_config(config: dict, schema_path: str) -> dict:
    """`coerce_config` with the schema file, before Snakemake validates against it."""
    import yaml

    with open(schema_path) as handle:
        return coerce_config(config, yaml.safe_load(handle))


def check_chat_template(config: dict) -> None:
    """Config vllm.chat_template must name a readable file: else every chat rank would
    fail (or every warm engine fail to start) only once the run is under way."""
    path = config["vllm"].get("chat_template")
    if path and not os.path.isfile(os.path.expanduser(path)):
        raise ConfigError(f"config key 'vllm.chat_template': no such file {path!r}")


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
    """Ranks whose outputs (``.out`` or ``.jsonl``, and record) are missing or older than
    the input.

    What a run will redo: rule infer writes both, and rule summary needs the records.

    All of them while the model still has to be fetched (``marker`` missing): the
    fetch job then updates every rank's input.
    """
    if any(not os.path.exists(path) for path in marker):
        return list(ranks)
    pending = []
    for rank in ranks:
        since = rank_files.input_file(data_dir, rank).stat().st_mtime
        outputs = (
            rank_files.output_file(results_dir, data_dir, rank),
            Path(results_dir, "records", f"{rank}.json"),
        )
        if any(not out.exists() or out.stat().st_mtime < since for out in outputs):
            pending.append(rank)
    return pending


def task_settings(config: dict, model: str) -> dict:
    """What scripts/infer.py needs, as one JSON-able mapping (file names absolute: a
    launcher may start the task in another folder)."""
    settings = {"engine": config["engine"], "model": model, "sampling": config["sampling"]}
    settings |= config["vllm"]
    if settings.get("chat_template"):
        settings["chat_template"] = os.path.abspath(settings["chat_template"])
    return settings


def inference_python(config: dict) -> str:
    return config["python"] or sys.executable


def model_marker(config: dict, model: str) -> list[str]:
    """Rule fetch_model's output that rank jobs wait for (none for the echo engine): it
    names the model folder the engines load, with vLLM's model-info cache built."""
    if config["engine"] == "echo":
        return []
    return [f"{config['results_dir']}/model/{model_slug(model)}.json"]


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


def fetch_env(config: dict, environ=os.environ) -> dict:
    """The task's environment, online: the login node may download what jobs may not."""
    env = {**environ, **offline_env(config)}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    return env


def engine_check_argv(config: dict, model: str) -> tuple[list[str], str, dict]:
    """The engines' command line of this config, the server that parses it (config
    warm.server; vLLM's engine arguments for per-rank engines) and each flag's config key."""
    server = config["warm"]["server"] if config["warm_engines"] else "inprocess"
    settings = config["vllm"]
    argv = engines.server_argv(
        inference_python(config),
        model,
        config["tiles"]["base_port"] + 1000,
        settings,
        config["tiles"]["per_job"],
        server=server,
    )
    keys = {a: engines.flag_key(a, settings) for a in argv if a.startswith("--")}
    return argv, server, keys


def fetch_model(config: dict, model: str, marker: str, log: str) -> None:
    """Find or fetch the model's weights, check the engines' command line against the
    installed vLLM and build vLLM's model-info cache (rule fetch_model)."""
    weights = config["weights"]
    argv, server, keys = engine_check_argv(config, model)
    command = [
        inference_python(config),
        str(Path(__file__).with_name("fetch_model.py")),
        "--model",
        model,
        "--marker",
        marker,
        "--shared-hf-home",
        weights["shared_hf_home"],
        "--hf-home",
        os.path.abspath(os.path.expanduser(weights["hf_home"])),
        "--engine-argv",
        json.dumps(argv),
        "--server",
        server,
        "--flag-keys",
        json.dumps(keys),
    ]
    with open(log, "w") as stream:
        code = subprocess.run(
            command, env=fetch_env(config), stdout=stream, stderr=stream
        ).returncode
    if code != 0:
        errors = [line for line in Path(log).read_text().splitlines() if line.startswith("ERROR:")]
        cause = f": {errors[-1][len('ERROR: ') :]}" if errors else ""
        raise RuntimeError(f"preparing model {model!r} failed{cause}; see {log}")


def marker_field(marker, name: str):
    """A field of rule fetch_model's marker (None for the echo engine, which has none)."""
    return read_marker(marker[0]).get(name) if marker else None


def marker_versions(marker) -> dict:
    """The vLLM, torch and IPEX versions rule fetch_model found ({} for echo)."""
    return marker_field(marker, "versions") or {}


def engine_model(config: dict, model: str, marker) -> str:
    """The folder (or id) the engine loads: the one rule fetch_model found, else ``model``."""
    return marker_field(marker, "path") if marker else model


def staged(config: dict, model: str, environ=os.environ):
    """With config weights.stage on inside a PBS job: host -> that node's copy of the
    model (scripts/stage_model.py made it). Otherwise None."""
    job = environ.get("PBS_JOBID")
    if not (config["weights"]["stage"] and job and config["engine"] != "echo"):
        return None
    return lambda host: str(
        stage_model.staged_path(config["weights"]["stage_dir"], job, host, model)
    )


def stop_engines() -> None:
    ENGINES.stop()


def engine_states(config: dict):
    """For the local progress line (progress.LOCAL): a callable giving (engines ready,
    engines, what the ranks wait for), or None without warm engines; read from the
    run's engine registry (serve.LocalService)."""
    per_node = config["tiles"]["per_node"] // config["tiles"]["per_job"]

    def states():
        if not config["warm_engines"]:
            return None
        registry = ENGINES.local_registry()
        if registry is None:
            return 0, per_node, "starting: the ranks wait for them to load the model"
        entries = serve.read_registry(registry).values()
        ready = sum(1 for e in entries if e.get("state") == "ready")
        starting = [e for e in entries if e.get("state") in ("starting", "restarting")]
        trouble = [f"{e['name']} {e['state']} ({e['log']})" for e in entries
                   if e.get("state") not in ("ready", "starting", "restarting")]  # fmt: skip
        if starting and not ready:
            trouble.append(
                f"{len(starting)} starting: the ranks wait for them to load the model; "
                f"{registry}/*-tile*.log"
            )
        return ready, max(per_node, len(entries)), ", ".join(trouble)

    return states


def engine_spec(config: dict) -> dict:
    """What the warm engines of a PBS submission need (scripts/serve.py; pbs-submit
    adds the model folder and the staging)."""
    warm = config["warm"]
    return {
        "engine": config["engine"],
        # file names absolute: a node's supervisor may run in another folder
        "vllm": {k: v for k, v in task_settings(config, "").items() if k in config["vllm"]},
        "tiles": config["tiles"],
        "env": offline_env(config),
        "launcher": config["engine_launcher"],
        "max_restarts": warm["max_restarts"],
        "ready_timeout_s": warm["ready_timeout_s"],
        "ranks_in_flight": warm["ranks_in_flight"],
        "server": warm["server"],
        "stall_timeout_s": warm["stall_timeout_s"],
        "listen": warm["listen"],
        "registry_root": os.path.abspath("logs/engines"),
    }


def local_spec(config: dict, model: str, marker=()) -> dict:
    """The engine spec of a local run: a submission's (engine_spec plus what pbs-submit
    adds) for this host, with the model rule fetch_model found and no staging."""
    return engine_spec(config) | {
        "model": engine_model(config, model, marker) if config["engine"] != "echo" else "",
        "versions": marker_versions(marker),
        "weights_bytes": marker_field(marker, "weights_bytes"),
        "stage": False,
        "stage_dir": config["weights"]["stage_dir"],
        "python": inference_python(config),
    }


class RankEngines:
    """The engines this process's rank threads route through, made once: in a PBS
    submission, its node's engines that the job's launcher call started (the spec file
    named by serve.SPEC_VARIABLE); in a local run, the one-node case of the same service
    (serve.LocalService), started when the first rank needs it and stopped by
    `stop_engines` (onsuccess/onerror) or at exit."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pool = None
        self._local = None

    def pool(self, config: dict, model: str, marker=(), environ=os.environ):
        with self._lock:
            if self._pool is None:
                spec_path = environ.get(serve.SPEC_VARIABLE)
                if spec_path:
                    spec = json.loads(Path(spec_path).read_text())
                    self._pool = serve.RegistryPool.for_job(spec, environ)
                else:
                    self._local = serve.LocalService(local_spec(config, model, marker))
                    atexit.register(self._local.stop)
                    self._pool = self._local.start()
            return self._pool

    def stop(self) -> None:
        with self._lock:
            if self._local is not None:
                self._local.stop()

    def local_registry(self) -> Path | None:
        """The registry folder of a local run's engines, once they are being started."""
        local = self._local
        return local.registry if local is not None else None


ENGINES = RankEngines()


def serve_rank(config: dict, model: str, rank: str, input, output, log: str) -> None:
    """One rank on the run's warm engines, in this thread; raise if it failed."""
    pool = ENGINES.pool(config, model, input.model)
    settings = task_settings(config, engine_model(config, model, input.model))
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    progress.clear_failure_note(log, rank)
    with open(log, "w") as out:
        try:
            line = infer.serve_rank(
                int(rank),
                infer.parse_settings(json.dumps(settings)),
                input.prompts,
                output.out,
                output.record,
                pool,
                echo_in_process=False,  # echo engines are echo servers, as in a submission
                retries=config["warm"]["retry_after_engine_death"],
                request_timeout=config["warm"]["stall_timeout_s"],
                versions=marker_versions(input.model),
            )
        except (infer.UsageError, infer.PromptFileError, engines.EngineError) as error:
            out.write(f"ERROR: {error}\n")
            # Its input is at fault unless an engine failed: then a continuation of its
            # PBS submission runs it again (pbs.resubmit).
            cause = "engine" if isinstance(error, engines.EngineError) else progress.INPUT_FAULT
            progress.write_failure_note(log, rank, cause, str(error))
            raise RuntimeError(f"rank {rank} failed: {error} (log: {log})") from None
        out.write(line + "\n")


def run_rank(config: dict, model: str, rank: str, input, output, log: str) -> None:
    """Run one rank's inference on a tile of this allocation; raise if it failed.

    With config warm_engines: on the run's warm engines (in a PBS submission, on the
    engines its job script started).

    Paths are absolute and the task writes its own log: a launcher may start it in
    another folder (pbs_tmrsh: $HOME) and send its output elsewhere.
    """
    progress.LOCAL.start()  # the local run's progress line (its first rank starts it)
    if config["warm_engines"]:
        return serve_rank(config, model, rank, input, output, log)
    script = Path(__file__).with_name("infer.py")
    model = engine_model(config, model, input.model)
    on_node = staged(config, model)

    def command(slot: tiles.Slot) -> list[str]:
        settings = task_settings(config, on_node(slot.host) if on_node else model)
        return [
            inference_python(config),
            str(script),
            "--rank",
            rank,
            "--prompts",
            os.path.abspath(input.prompts),
            "--output",
            os.path.abspath(output.out),
            "--record",
            os.path.abspath(output.record),
            "--settings",
            json.dumps(settings),
            "--log",
            os.path.abspath(log),
        ]

    placement = config["tiles"]
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    progress.clear_failure_note(log, rank)
    code = tiles.run_placed(
        command,
        log_path=Path(log),
        tiles_per_job=placement["per_job"],
        tiles_per_node=placement["per_node"],
        hierarchy_setting=placement["hierarchy"],
        base_port=placement["base_port"],
        cpu_bind=placement["cpu_bind"],
        launcher=config["launcher"],
        extra_env=offline_env(config),
    )
    if code != 0:
        # scripts/infer.py exits 2 for a bad rank file or prompt (its input is at fault)
        cause = progress.INPUT_FAULT if code == 2 else "task"
        progress.write_failure_note(log, rank, cause, f"exit code {code}")
        raise RuntimeError(f"rank {rank} failed with exit code {code}; see {log}")


# When this run's Snakemake loaded the workflow: reports older than this are not its.
STARTED = time.time()


def preflight_failures(pbs_logs: str = "logs/pbs", since: float = STARTED) -> list[str]:
    """This run's submissions that ended at their preflight (scripts/stage_model.py)."""
    lines = []
    for path in sorted(Path(pbs_logs).glob("*.failed.json")):
        with contextlib.suppress(OSError, ValueError):
            if path.stat().st_mtime < since:
                continue
            failure = json.loads(path.read_text())
            name = path.name[: -len(".failed.json")]
            lines.append(
                f"Submission {name} (job {failure['job_id']}) ended before any engine started "
                f"(its PBS log: {path.with_name(name + '.log')}); its ranks did not run:"
            )
            lines += [f"  {cause}" for cause in failure["causes"]]
    return lines


def report_failures(
    ranks, results_dir: str, log_pattern: str, stream=None, pbs_logs: str = "logs/pbs"
) -> None:
    """Print which ranks ran and failed (a log but no output), which submissions ended
    at their preflight, and where to look."""
    stream = stream or sys.stderr
    logs = {rank: log_pattern.format(rank=rank) for rank in ranks}
    failed = [
        (rank, log)
        for rank, log in logs.items()
        if not any(os.path.exists(f"{results_dir}/{rank}{x}") for x in (".out", ".jsonl"))
        and os.path.exists(log)
    ]
    preflight = preflight_failures(pbs_logs)
    if preflight:
        print("\n".join(preflight), file=stream)
    if not failed:
        if not preflight:
            print("No rank failed; the error is in the messages above.", file=stream)
        return
    lines = [f"{len(failed)} rank(s) failed; their outputs are missing, the others are kept:"]
    lines += [f"  rank {rank}: {log}" for rank, log in failed]
    lines.append("Fix the cause and run the same command again: only these ranks run.")
    print("\n".join(lines), file=stream)
