"""The provider's settings: what submit, status and cancel need of the run's settings
(formats/settings.py, made once when the Snakefile loads).

The Snakefile (main Snakemake process) puts them as JSON into the environment
variable ``AURORA_PBS_SETTINGS``; the profile's commands are its children and read
them back with `load_settings`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from formats.failure_note import NOTES_DIR
from formats.registry import REGISTRY_ROOT

if TYPE_CHECKING:
    from formats.settings import Settings

SETTINGS_VARIABLE = "AURORA_PBS_SETTINGS"
STATE_DIR = ".snakemake/pbs"
LOG_DIR = "logs/pbs"
QUERY_TIMEOUT = 60  # seconds for one qstat (or qsub) call
PROGRESS_LOG = "logs/progress.log"  # the progress lines of the terminal, with times
# The profile command whose presence next to a loaded config file marks the profile.
SUBMIT_COMMAND = "pbs-submit"


class PbsConfigError(ValueError):
    """A setting that cannot work on the scheduler, named by its config key."""


def _process_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot ("" if unknown): with the pid,
    it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def provider_settings(
    settings: Settings,
    *,
    model: str = "",
    marker: str = "",
    owner_pid: int | None = None,
    engines: Mapping | None = None,
    settings_file: str = "",
) -> dict:
    """The provider's settings from the run's settings (formats/settings.py).

    ``model`` is the checked model (a local folder or a hub id), ``marker`` rule
    fetch_model's output that names the folder the engines load ("" for none).

    ``engines``: with config warm_engines, what each submission's engines need
    (formats/engine_spec.py from_settings; scripts/engine/supervisor.py reads it).

    ``settings_file``: the run's settings file (formats/settings.py), which every job
    script exports to the job's Snakemakes.

    ``owner_pid`` is the main Snakemake process: the profile's watchdog deletes the
    run's submissions when that process is gone (Ctrl-C, a crash, SIGKILL).
    """
    pbs, tiles, warm, weights = settings.pbs, settings.tiles, settings.warm, settings.weights
    owner = os.getpid() if owner_pid is None else owner_pid
    return {
        "account": pbs.account,
        "queue": pbs.queue,
        "filesystems": pbs.filesystems,
        "place": pbs.place,
        "nodes_per_submission": pbs.nodes_per_submission,
        "walltime_margin_minutes": pbs.walltime_margin_minutes,
        "budget_node_hours": pbs.budget_node_hours,
        "setup": list(pbs.setup),
        "status_interval": pbs.status_interval,
        # Continuations of a submission PBS ended (walltime, qdel, node failure).
        "resubmit": pbs.resubmit,
        "tiles_per_node": tiles.per_node,
        "tiles_per_job": tiles.per_job,
        "tiles_cpu_bind": list(tiles.cpu_bind or ()),
        "runtime_minutes": settings.runtime_minutes,
        # Warm engines: one per tile for the whole submission, serving ranks_per_engine
        # ranks each; the walltime is their start plus the ranks.
        "warm_engines": bool(settings.warm_engines),
        "ranks_per_engine": warm.ranks_per_engine,
        "ranks_in_flight": warm.ranks_in_flight,
        # unset (null): what they were before they could be (a dataset's bill sets them)
        "start_minutes": _or(warm.start_minutes, 15),
        "rank_minutes": _or(warm.rank_minutes, 1),
        "engines": dict(engines or {}),
        "settings_file": settings_file,
        "engine": settings.engine,
        "tiles_hierarchy": tiles.hierarchy,
        "state_dir": os.path.abspath(STATE_DIR),
        "log_dir": os.path.abspath(LOG_DIR),
        # Node-local staging of the model (scripts/model/stage.py, one call per submission).
        "stage": bool(weights.stage) and settings.engine != "echo",
        "model": model,
        "model_marker": os.path.abspath(marker) if marker else "",
        "stage_dir": weights.stage_dir,
        "broadcast_host": weights.broadcast_host or "{host}",
        "node_launcher": list(settings.node_launcher),
        "data_dir": settings.data_dir,
        # What the status rounds read for the progress lines (scripts/reporting/progress.py).
        "results_dir": os.path.abspath(settings.results_dir),
        "registry_root": os.path.abspath(REGISTRY_ROOT),
        "failed_dir": os.path.abspath(NOTES_DIR),
        "progress_log": os.path.abspath(PROGRESS_LOG),
        "task_python": settings.inference_python,
        # The profile's commands re-run themselves with this interpreter when the
        # `python3` on PATH is too old (e.g. a login node's system Python).
        "python": sys.executable,
        "owner": {"pid": owner, "start": _process_start(owner)},
    }


def _or(value, fallback):
    return fallback if value is None else value


def run_id(settings: Mapping) -> str:
    """One run of the main Snakemake: its pid and start time."""
    owner = settings.get("owner") or {}
    return f"{owner.get('pid', '?')}-{owner.get('start', '')}"


def owner_alive(settings: Mapping) -> bool:
    owner = settings.get("owner") or {}
    pid = owner.get("pid")
    return isinstance(pid, int) and _process_start(pid) == owner.get("start") != ""


@dataclass(frozen=True)
class RunInfo:
    """What the Snakefile knows about the run when it loads (see `run_info`)."""

    configfiles: tuple[str, ...] = ()
    jobs: int | None = None  # --jobs: submissions in the system at once
    cores: int | None = None  # --cores: passed on to each group job's Snakemake
    main: bool = True  # the main Snakemake process, not the one inside a group job


def run_info(workflow) -> RunInfo:
    """Read `RunInfo` from Snakemake's ``workflow`` object (9.x attribute names), or
    pass a `RunInfo` through.

    At load time Snakemake has not chosen its executor yet (``workflow.executor_plugin``
    is None, even in real runs), so the profile is recognised by its config file.
    """
    if isinstance(workflow, RunInfo):
        return workflow
    mode = getattr(workflow.workflow_settings.exec_mode, "name", "DEFAULT")
    return RunInfo(
        configfiles=tuple(str(f) for f in workflow.config_settings.configfiles or ()),
        jobs=workflow.resource_settings.nodes,
        cores=workflow.resource_settings.cores,
        main=str(mode).upper() == "DEFAULT",
    )


def profile_in_use(configfiles: Iterable[str | os.PathLike]) -> bool:
    """True if a loaded config file sits next to this provider's submit command.

    profiles/aurora/config.yaml loads profiles/aurora/aurora.yaml through its
    ``configfile:`` key, so this holds exactly when the profile (or its config file)
    is in use, wherever the profile folder was copied.
    """
    return any((Path(f).parent / SUBMIT_COMMAND).is_file() for f in configfiles)


def load_settings(environ: Mapping = os.environ) -> dict:
    text = environ.get(SETTINGS_VARIABLE)
    if not text:
        raise PbsConfigError(
            f"{SETTINGS_VARIABLE} is not set: the profile's commands must be started by "
            "Snakemake running this workflow (its Snakefile calls pbs.export_settings)"
        )
    return json.loads(text)
