"""One rank's job, as rule infer runs it: on the run's warm engines (supervisor.py's engine
service: in a PBS submission its node's engines, locally the one-node case), or on an
engine of its own placed on a free tile (launcher.run_placed, then scripts/rank/task.py).

Stdlib only, so dry runs and DAG pictures work on a login node without vLLM.
"""

import atexit
import os
import threading
from pathlib import Path

from engine import client, local, routing, supervisor, vllm_server
from formats import engine_spec as engine_specs
from formats import failure_note
from formats import registry as registry_format
from formats import settings as run_settings
from formats.marker import engine_fields, folder_bytes, marker_versions, model_folder
from formats.partial import resume
from formats.settings import Settings
from formats.staged_model import staged
from model import prepare as model_prepare
from pbs.settings import profile_in_use, run_info
from placement import launcher, node_layout
from rank import checks, task, warm
from reporting import progress


def local_spec(settings: Settings, model: str, marker=()) -> dict:
    """The engine spec of a local run: a submission's (what the settings say of the
    engines plus what pbs-submit adds) for this host, with the model rule fetch_model
    found and no staging."""
    return engine_specs.with_model(
        engine_specs.from_settings(settings),
        engine_fields(marker, model),
        stage=False,
        stage_dir=settings.weights.stage_dir,
        python=settings.inference_python,
    )


class RankEngines:
    """The engines this process's rank threads route through, made once: in a PBS
    submission, its node's engines that the job's launcher call started (the spec file
    named by supervisor.SPEC_VARIABLE); in a local run, the one-node case of the same service
    (local.LocalService), started when the first rank needs it and stopped by
    `stop_engines` (onsuccess/onerror) or at exit."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pool = None
        self._local = None

    def pool(
        self,
        settings: Settings,
        model: str,
        marker=(),
        environ=os.environ,
        go_file=None,
        prepare=(),
    ):
        """``go_file``: the engines build their engine once it exists, and ``prepare`` runs
        before their server (`start_beside_fetch`)."""
        with self._lock:
            if self._pool is None:
                spec_path = environ.get(supervisor.SPEC_VARIABLE)
                if spec_path:
                    spec = engine_specs.read_spec(spec_path)
                    self._pool = routing.RegistryPool.for_job(spec, environ)
                else:
                    spec = local_spec(settings, model, marker)
                    if go_file:  # no marker yet: the folder's size for the ready timeout
                        go = {vllm_server.GO_FILE_VARIABLE: os.path.abspath(go_file)}
                        spec["env"] = spec["env"] | go
                        spec["prepare"] = list(prepare)
                        spec["weights_bytes"] = folder_bytes(model)
                    self._local = local.LocalService(spec)
                    atexit.register(self._local.stop)
                    self._pool = self._local.start()
            return self._pool

    def stop(self, wait: bool = True) -> None:
        with self._lock:
            if self._local is not None:
                self._local.stop(wait=wait)

    def local_registry(self) -> Path | None:
        """The registry folder of a local run's engines, once they are being started."""
        local = self._local
        return local.registry if local is not None else None


ENGINES = RankEngines()


def start_beside_fetch(workflow, settings: Settings, model: str, marker: str, log: str) -> bool:
    """Rule fetch_model of a local run of warm in-process engines on a model folder:
    start the engines now, beside the rule (True). Each imports vLLM and parses its
    command line meanwhile, and builds its engine once the rule's marker exists, its
    checks passed and its model-info cache written; the first of them to claim it runs
    the rule's checks itself (model/fetch.py `serve`, the rule waits: model/prepare.py).
    A config the checks refuse loads no model (the run's onerror stops the engines).
    Hub models (their folder is the rule's to find), vLLM's own server and PBS runs start
    their engines after the rule, as before."""
    if (
        settings.engine != "vllm"
        or not settings.warm_engines
        or settings.warm.server != "inprocess"
        or not os.path.isdir(model)
        or os.environ.get(supervisor.SPEC_VARIABLE)
        or profile_in_use(run_info(workflow).configfiles)
    ):
        return False
    prepare = model_prepare.beside_engines(settings, model, marker, log)
    ENGINES.pool(settings, model, go_file=marker, prepare=prepare)
    return True


def stop_engines(wait: bool = True) -> None:
    """Stop a local run's engines; ``wait`` False: tell them to stop and go on (the
    summary rule, which runs once every rank is answered, while they stop)."""
    ENGINES.stop(wait)


def engine_states(settings: Settings):
    """For the local progress line (progress.LOCAL): a callable giving (engines ready,
    engines, what the ranks wait for), or None without warm engines; read from the
    run's engine registry (local.LocalService)."""
    per_node = node_layout.engines_per_node(settings.tiles.per_node, settings.tiles.per_job)

    def states():
        if not settings.warm_engines:
            return None
        registry = ENGINES.local_registry()
        if registry is None:
            return 0, per_node, "starting: the ranks wait for them to load the model"
        entries = registry_format.read_registry(registry).values()
        ready = sum(1 for e in entries if e.get("state") == registry_format.READY)
        starting = [e for e in entries if e.get("state") in registry_format.COMING]
        trouble = [f"{e['name']} {e['state']} ({e['log']})" for e in entries
                   if e.get("state") not in registry_format.UP]  # fmt: skip
        if starting and not ready:
            trouble.append(
                f"{len(starting)} starting: the ranks wait for them to load the model; "
                f"{registry}/*-tile*.log"
            )
        return ready, max(per_node, len(entries)), ", ".join(trouble)

    return states


def serve_rank(settings: Settings, model: str, rank: str, input, output, log: str) -> None:
    """One rank on the run's warm engines, in this thread; raise if it failed."""
    pool = ENGINES.pool(settings, model, input.model)
    rank_settings = settings.task(model_folder(input.model, model))
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    failure_note.clear_failure_note(log, rank)
    with open(log, "w") as out:
        try:
            line = warm.serve_rank(
                int(rank),
                rank_settings,  # checked with the config (config/schema.yaml)
                input.prompts,
                output.out,
                output.record,
                pool,
                resume(output.out, input.prompts, rank_settings),
                retries=settings.warm.retry_after_engine_death,
                request_timeout=settings.warm.stall_timeout_s,
                versions=marker_versions(input.model),
            )
        except (checks.UsageError, task.PromptFileError, client.EngineError) as error:
            out.write(f"ERROR: {error}\n")
            # Its input is at fault unless an engine failed: then a continuation of its
            # PBS submission runs it again (pbs.resubmit).
            cause = "engine" if isinstance(error, client.EngineError) else failure_note.INPUT_FAULT
            failure_note.write_failure_note(log, rank, cause, str(error))
            raise RuntimeError(f"rank {rank} failed: {error} (log: {log})") from None
        out.write(line + "\n")


def run_rank(settings: Settings, model: str, rank: str, input, output, log: str) -> None:
    """Run one rank's inference on a tile of this allocation; raise if it failed.

    With config warm_engines: on the run's warm engines (in a PBS submission, on the
    engines its job script started).

    Paths are absolute and the task writes its own log: a launcher may start it in
    another folder (pbs_tmrsh: $HOME) and send its output elsewhere.
    """
    progress.LOCAL.start()  # the local run's progress line (its first rank starts it)
    if settings.warm_engines:
        return serve_rank(settings, model, rank, input, output, log)
    script = Path(__file__).resolve().parents[1] / "rank" / "task.py"
    model = model_folder(input.model, model)
    on_node = staged(settings, model)

    settings_file = run_settings.write_settings(settings)  # once per run: named by its digest

    def command(slot: node_layout.Slot) -> list[str]:
        return [
            settings.inference_python,
            str(script),
            "--rank",
            rank,
            "--prompts",
            os.path.abspath(input.prompts),
            "--output",
            os.path.abspath(output.out),
            "--record",
            os.path.abspath(output.record),
            "--settings-file",
            str(settings_file),
            "--model",
            on_node(slot.host) if on_node else model,
            "--log",
            os.path.abspath(log),
        ]

    placement = settings.tiles
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    failure_note.clear_failure_note(log, rank)
    code = launcher.run_placed(
        command,
        log_path=Path(log),
        tiles_per_job=placement.per_job,
        tiles_per_node=placement.per_node,
        hierarchy_setting=placement.hierarchy,
        base_port=placement.base_port,
        cpu_bind=list(placement.cpu_bind),
        launcher=list(settings.launcher),
        extra_env=dict(settings.engine_env),
    )
    if code != 0:
        # scripts/rank/task.py exits 2 for a bad rank file or prompt (its input is at fault)
        cause = failure_note.INPUT_FAULT if code == 2 else "task"
        failure_note.write_failure_note(log, rank, cause, f"exit code {code}")
        raise RuntimeError(f"rank {rank} failed with exit code {code}; see {log}")
