"""Aurora's queues, the checks a plan must pass, how jobs pack into submissions, and
the dry run's plan. Called by the Snakefile when it loads (`export_settings`,
`announce_plan`, `node_group`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
from collections import Counter
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine import lifecycle  # stdlib only, like this package (scripts/ is on the path)
from formats import marker
from model import fetch
from placement import launcher, node_layout

from .settings import (
    SETTINGS_VARIABLE,
    PbsConfigError,
    profile_in_use,
    provider_settings,
    run_info,
)

if TYPE_CHECKING:
    from formats.settings import Settings


@dataclass(frozen=True)
class QueueLimits:
    min_nodes: int
    max_nodes: int
    max_minutes: int
    min_minutes: int = 5
    max_jobs: int | None = None  # per user (or project), queued + running at once
    max_running: int | None = None  # per user (or project), running at once
    # (up to nodes, walltime limit in minutes): a routing queue's execution queues
    routes: tuple[tuple[int, int, str], ...] = ()


# ALCF user guide, docs/aurora/running-jobs-aurora.md (August 2026; changed February
# 2026). prod is a routing queue: small 256-1024 nodes (12 h), medium 1025-1999 (18 h),
# large 2000+ (24 h); 10 running and 100 queued jobs per project. A job below prod's
# 256 nodes is refused, or by a known PBS bug silently dropped. Unknown queue names
# pass unchecked (other sites, new queues).
AURORA_QUEUES: dict[str, QueueLimits] = {
    "debug": QueueLimits(1, 2, 60, max_jobs=1, max_running=1),
    "debug-scaling": QueueLimits(2, 256, 60, max_jobs=1, max_running=1),
    "capacity": QueueLimits(1, 16, 168 * 60, max_jobs=5, max_running=2),
    "prod": QueueLimits(
        256,
        10624,
        24 * 60,
        max_jobs=100,
        max_running=10,
        routes=((1024, 12 * 60, "small"), (1999, 18 * 60, "medium"), (10624, 24 * 60, "large")),
    ),
}


def walltime_minutes(runtime_minutes: int, settings: Mapping) -> int:
    return int(runtime_minutes) + int(settings["walltime_margin_minutes"])


def ranks_per_job_slot(settings: Mapping) -> int:
    """Rank jobs one tile slot serves in a submission: warm.ranks_per_engine with warm
    engines, else 1 (each rank starts its own engine)."""
    return settings["ranks_per_engine"] if settings["warm_engines"] else 1


def submission_minutes(settings: Mapping, ranks: int, nodes: int, runtime=None) -> int:
    """Walltime of a submission of ``ranks`` rank jobs on ``nodes`` nodes.

    Per-rank engines run all ranks at once: runtime_minutes (or the jobs' runtime
    resource). Warm engines: their start, then the ranks of the busiest engine one
    after another (warm.start_minutes + ceil(ranks / engines) x warm.rank_minutes).
    """
    if not settings["warm_engines"]:
        return walltime_minutes(
            settings["runtime_minutes"] if runtime is None else runtime, settings
        )
    engines = max(1, nodes * jobs_per_node(settings))
    # rank_minutes estimated from a history is a fraction (dataset/bill.py)
    work = settings["start_minutes"] + math.ceil(
        math.ceil(ranks / engines) * settings["rank_minutes"]
    )
    return walltime_minutes(work, settings)


def format_walltime(minutes: int) -> str:
    """PBS walltime HH:MM:SS (hours may exceed 24)."""
    hours, mins = divmod(int(minutes), 60)
    return f"{hours:02d}:{mins:02d}:00"


def jobs_per_node(settings: Mapping) -> int:
    return node_layout.engines_per_node(settings["tiles_per_node"], settings["tiles_per_job"])


def max_walltime(limits: QueueLimits, nodes: int) -> tuple[int, str]:
    """The walltime limit for a job of ``nodes`` nodes, and where it comes from."""
    for up_to, minutes, name in limits.routes:
        if nodes <= up_to:
            return minutes, f"execution queue {name!r} ({nodes} nodes)"
    return limits.max_minutes, ""


def _walltime_keys(warm: bool) -> str:
    if warm:
        return "warm.start_minutes + warm.ranks_per_engine x warm.rank_minutes"
    return "runtime_minutes"


def queue_problems(
    queue: str, nodes: int, minutes: int, jobs: int | None, warm: bool = False
) -> list[str]:
    """What queue ``queue`` refuses in submissions of ``nodes`` nodes and ``minutes``
    walltime, ``jobs`` of them in the system at once (None: not known)."""
    limits = AURORA_QUEUES.get(queue)
    if limits is None:
        return []
    problems = []
    if not limits.min_nodes <= nodes <= limits.max_nodes:
        hint = ""
        if queue == "prod":
            hint = (
                ": prod takes only jobs of 256 nodes or more; for smaller runs use "
                "queue capacity (1-16 nodes) or debug-scaling (2-256 nodes, 1 h)"
            )
        elif nodes > limits.max_nodes:
            hint = ": lower it, or use a queue that takes bigger jobs (prod: 256+ nodes)"
        problems.append(
            f"config key pbs.nodes_per_submission ({nodes}) is outside queue {queue!r}'s "
            f"{limits.min_nodes}-{limits.max_nodes} nodes (config key pbs.queue){hint}"
        )
    longest, route = max_walltime(limits, nodes)
    if not limits.min_minutes <= minutes <= longest:
        problems.append(
            f"walltime {format_walltime(minutes)} (config keys {_walltime_keys(warm)} + "
            f"pbs.walltime_margin_minutes) is outside queue {queue!r}'s "
            f"{format_walltime(limits.min_minutes)}-{format_walltime(longest)}"
            + (f" for {route}" if route else "")
        )
    if limits.max_jobs is not None and jobs is not None and jobs > limits.max_jobs:
        problems.append(
            f"queue {queue!r} (config key pbs.queue) lets one user have {limits.max_jobs} "
            f"job(s) queued or running, but up to {jobs} submissions may be in the system "
            f"(--jobs / profile key jobs): run with --jobs {limits.max_jobs}; more are "
            "refused by qsub"
        )
    return problems


def settings_problems(settings: Mapping, *, jobs: int | None = None) -> list[str]:
    """Everything that cannot work, each naming its config key (empty: all fine)."""
    problems = []
    if not str(settings["account"]).strip():
        problems.append(
            "config key pbs.account is empty: set it to your ALCF project, e.g. "
            "--config 'pbs={account: MyProject}' (or in profiles/aurora/aurora.yaml)"
        )
    if settings["tiles_per_job"] > settings["tiles_per_node"]:
        problems.append(
            f"config key tiles.per_job ({settings['tiles_per_job']}) is larger than "
            f"tiles.per_node ({settings['tiles_per_node']}): a job must fit on one node"
        )
    problems += node_layout.reserved_core_problems(settings.get("tiles_cpu_bind") or ())
    problems += model_problems(settings)
    nodes = settings["nodes_per_submission"]
    problems += launcher_problems(settings)
    minutes = submission_minutes(settings, expected_group_size(settings), nodes)
    problems += queue_problems(settings["queue"], nodes, minutes, jobs, settings["warm_engines"])
    return problems


def model_problems(settings: Mapping) -> list[str]:
    """Tensor parallel against the model's attention heads, where the model's folder is
    known here (a local folder, or the one rule fetch_model's marker names)."""
    if settings.get("engine") == "echo" or not settings.get("model"):
        return []
    folder = settings["model"]
    with contextlib.suppress(OSError, ValueError, KeyError):
        if settings.get("model_marker"):
            folder = marker.read_marker(settings["model_marker"])["path"]
    problem = fetch.tensor_parallel_problem(folder, settings["model"], settings["tiles_per_job"])
    return [problem] if problem else []


def launcher_problems(settings: Mapping) -> list[str]:
    """The launchers' placeholders, and with warm engines the node-local ranks' needs."""
    problems, warm_engines = [], settings["warm_engines"]
    spec = settings.get("engines") or {}
    launchers = [("node_launcher", settings["node_launcher"], launcher.NODE_LAUNCHER_PLACEHOLDERS)]
    if warm_engines:
        launchers.append(
            ("engine_launcher", spec.get("launcher") or [], launcher.ENGINE_LAUNCHER_PLACEHOLDERS)
        )
    for key, template, names in launchers:
        try:
            launcher.launcher_fields(template, names, key)
        except ValueError as error:
            problems.append(str(error))
    if warm_engines and settings["nodes_per_submission"] > 1 and not settings["node_launcher"]:
        problems.append(
            "config key node_launcher is empty: with warm engines every node of a "
            "submission runs its own ranks, started by one node_launcher call (Aurora: "
            "mpiexec -n {nodes} --ppn 1)"
        )
    listen = str(spec.get("listen") or "127.0.0.1")
    if warm_engines and "{host}" not in listen:
        # A name this login node cannot resolve is left to the nodes (serve.listen_address).
        with contextlib.suppress(OSError):
            outside = lifecycle.not_loopback(
                socket.getaddrinfo(listen, None, type=socket.SOCK_STREAM)
            )
            if outside:
                problems.append(lifecycle.not_loopback_message(listen, outside))
    return problems


def check_settings(settings: Mapping, *, jobs: int | None = None) -> None:
    problems = settings_problems(settings, jobs=jobs)
    if problems:
        raise PbsConfigError("PBS settings (profiles/aurora):\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------- group packing


def expected_group_size(settings: Mapping) -> int:
    """Rank jobs per submission: every tile slot of every node busy, each serving
    warm.ranks_per_engine ranks with warm engines."""
    return settings["nodes_per_submission"] * jobs_per_node(settings) * ranks_per_job_slot(settings)


def group_packing_problems(
    group_components: Mapping[str, int], settings: Mapping, *, cores=None, group: str = "node"
) -> list[str]:
    expected = expected_group_size(settings)
    how = (
        f"{settings['nodes_per_submission']} nodes (pbs.nodes_per_submission) x "
        f"{jobs_per_node(settings)} engines per node (tiles.per_node, tiles.per_job)"
    )
    if settings["warm_engines"]:
        how += f" x {settings['ranks_per_engine']} ranks per engine (warm.ranks_per_engine)"
    got = group_components.get(group)
    problems = []
    if got is None:
        problems.append(
            f"profile key group-components has no {group}= entry: without it every job "
            f"is its own submission; set group-components: {{{group}: {expected}}} ({how})"
        )
    elif got != expected:
        problems.append(
            f"profile key group-components has {group}={got} but one submission holds "
            f"{expected} jobs ({how}): set group-components: {{{group}: {expected}}}"
        )
    if isinstance(cores, int) and cores < expected:
        problems.append(
            f"--cores / profile key cores is {cores}, below the {expected} jobs of one "
            "submission: Snakemake would run them in waves and stretch the walltime; "
            f"set cores to at least {expected}"
        )
    return problems


def node_group(workflow, run_settings: Settings, name: str = "node") -> Callable | None:
    """The tile rule's ``group:``: a function that checks the profile's packing, or None.

    Only the Aurora profile packs jobs into submissions; elsewhere the rule has no group
    (a group per job costs Snakemake about 0.3 ms per job in every dry run).
    Snakemake sets ``--group-components`` on the workflow only after the Snakefile is
    loaded, so the check runs when the DAG asks for the rule's group: in dry runs too.
    It applies in the main Snakemake process only.
    """
    if not profile_in_use(run_info(workflow).configfiles):
        return None
    # One group holds a whole submission's ranks (30,720 in prod): without these,
    # Snakemake's group handling takes time quadratic in that (snakemake_fixes).
    from pbs import snakemake_fixes

    snakemake_fixes.apply()
    checked = []

    def group(wildcards) -> str:
        if not checked:
            info = run_info(workflow)
            if info.main:
                problems = group_packing_problems(
                    workflow.group_settings.group_components,
                    provider_settings(run_settings),
                    cores=info.cores,
                    group=name,
                )
                if problems:
                    raise PbsConfigError(
                        "PBS packing (profiles/aurora):\n  " + "\n  ".join(problems)
                    )
            checked.append(True)
        return name

    return group


# ------------------------------------------------------------------------------- plan


def queue_nodes(nodes: int, settings: Mapping) -> int:
    """Nodes to ask for: at least the queue's minimum (debug-scaling takes 2 or more)."""
    limits = AURORA_QUEUES.get(settings["queue"])
    return max(nodes, limits.min_nodes) if limits else nodes


def submission_nodes(ranks: int, settings: Mapping) -> int:
    """Nodes a submission of ``ranks`` rank jobs asks for."""
    slots = jobs_per_node(settings) * ranks_per_job_slot(settings)
    return queue_nodes(math.ceil(ranks / slots), settings)


def plan_run(pending_jobs: int, settings: Mapping) -> list[tuple[int, int]]:
    """(jobs, nodes) of each submission that ``pending_jobs`` rank jobs make.

    Snakemake fills each group up to group-components jobs (checked to equal
    `expected_group_size`), so all submissions but the last are full.
    """
    size = expected_group_size(settings)
    full, rest = divmod(pending_jobs, size)
    sizes = [size] * full + ([rest] if rest else [])
    return [(jobs, submission_nodes(jobs, settings)) for jobs in sizes]


def describe_plan(pending_jobs: int, settings: Mapping, jobs: int | None = None) -> str:
    """The dry run's plan: submissions, nodes each (with warm engines also engines,
    ranks and ranks per engine), walltime, node-hours at most, and how many the queue
    runs at once."""
    plan = plan_run(pending_jobs, settings)
    if not plan:
        return "PBS plan: nothing to submit."
    queue = settings["queue"]
    shapes = Counter(plan)
    node_hours = (
        sum(
            count * nodes * submission_minutes(settings, ranks, nodes)
            for (ranks, nodes), count in shapes.items()
        )
        / 60
    )
    if settings["warm_engines"]:
        per_node = jobs_per_node(settings)
        parts = []
        for (ranks, nodes), count in sorted(shapes.items(), reverse=True):
            engines = nodes * per_node
            minutes = submission_minutes(settings, ranks, nodes)
            parts.append(
                f"{count} x ({nodes} node(s), {engines} engines, {ranks} ranks, "
                f"{math.ceil(ranks / nodes)} per node, {math.ceil(ranks / engines)} per "
                f"engine, walltime {format_walltime(minutes)})"
            )
        text = (
            f"PBS plan: {pending_jobs} rank job(s) -> {len(plan)} submission(s) to queue "
            f"{queue!r} with warm engines: {', '.join(parts)}; at most {node_hours:.2f} "
            "node-hours"
        )
    else:
        minutes = walltime_minutes(settings["runtime_minutes"], settings)
        nodes_shapes = ", ".join(
            f"{count} x {nodes} node(s)"
            for nodes, count in sorted(Counter(n for _, n in plan).items(), reverse=True)
        )
        text = (
            f"PBS plan: {pending_jobs} rank job(s) -> {len(plan)} submission(s) to queue "
            f"{queue!r} ({nodes_shapes}), walltime {format_walltime(minutes)} each, "
            f"at most {node_hours:.2f} node-hours"
        )
    limits = AURORA_QUEUES.get(queue)
    at_once = [n for n in (jobs, limits.max_running if limits else None) if n]
    if at_once and len(plan) > min(at_once):
        text += f"; {min(at_once)} in the system or running at once, the rest wait"
    if not settings["warm_engines"]:
        idle = sum(nodes * jobs_per_node(settings) - count for count, nodes in plan)
        if idle:
            text += f"; {idle} tile(s) idle (the last submission is not full)"
    return text


# ------------------------------------------------------------ entry points of the Snakefile


def export_settings(
    run_settings: Settings,
    environ: MutableMapping = os.environ,
    workflow=None,
    *,
    model: str = "",
    marker: str = "",
    engines: Mapping | None = None,
    settings_file: str = "",
) -> dict:
    """Put the provider's settings of ``run_settings`` (`provider_settings`) as JSON into
    ``environ`` for the profile's commands.

    With ``workflow`` (Snakemake's object, or a `RunInfo`) and the Aurora profile in
    use, also validate them, so a setting the scheduler would refuse fails the dry
    run with a `PbsConfigError` that names the config key.
    """
    settings = provider_settings(
        run_settings, model=model, marker=marker, engines=engines, settings_file=settings_file
    )
    if workflow is not None:
        info = run_info(workflow)
        if profile_in_use(info.configfiles):
            check_settings(settings, jobs=info.jobs if info.main else None)
    environ[SETTINGS_VARIABLE] = json.dumps(settings)
    return settings


def announce_plan(
    workflow, run_settings: Settings, pending_jobs: Callable[[], int], stream=None
) -> None:
    """With the Aurora profile, print the PBS plan of the pending ranks (dry runs too).

    ``pending_jobs`` is called only then: the Snakemake inside each submission (and
    each of its jobs) skips looking at every rank's outputs on the shared file system.
    """
    info = run_info(workflow)
    if info.main and profile_in_use(info.configfiles):
        plan = describe_plan(pending_jobs(), provider_settings(run_settings), jobs=info.jobs)
        print(plan, file=stream or sys.stderr)
