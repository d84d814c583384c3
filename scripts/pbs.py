"""PBS provider for profiles/aurora: settings, submission, status and cancellation.

Snakemake's cluster-generic executor calls three small commands of the profile:
``pbs-submit <jobscript>``, ``pbs-status <jobid>`` and ``pbs-cancel <jobid>...``.
They are children of the main Snakemake process and read this provider's settings
from the environment variable ``AURORA_PBS_SETTINGS``, which the Snakefile fills
with `export_settings` when it loads. No config value ever passes through a shell:
qsub, qstat, scontrol and qdel are started with argument lists.

Status answers come from ONE scheduler query per polling round for all jobs of
the run, cached in ``.snakemake/pbs/`` under a file lock (see `job_status`).

Stdlib only, so the commands work with whatever Python runs Snakemake.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SETTINGS_VARIABLE = "AURORA_PBS_SETTINGS"
STATE_DIR = ".snakemake/pbs"
LOG_DIR = "logs/pbs"
# The line of profiles/aurora/jobscript.sh that pbs-submit replaces by config pbs.setup.
SETUP_MARKER = "# @site-setup@"
# The profile command whose presence next to a loaded config file marks the profile.
SUBMIT_COMMAND = "pbs-submit"

RUNNING, SUCCESS, FAILED = "running", "success", "failed"
FINAL = frozenset({SUCCESS, FAILED})

# A job whose status cannot be read (qstat fails, bad output, unknown id) is reported
# as running until this many consecutive rounds AND seconds have failed, then failed.
PROBLEM_ROUNDS = 10
PROBLEM_SECONDS = 300
QUERY_TIMEOUT = 60  # seconds for one qstat/scontrol call
CANCEL_WAIT = 1.5  # seconds pbs-cancel waits for qdel (the plugin kills it after 2 s)
FORGET_SECONDS = 7 * 24 * 3600  # drop state entries not touched for a week


class PbsConfigError(ValueError):
    """A setting that cannot work on the scheduler, named by its config key."""


class SubmitError(RuntimeError):
    """A submission that was refused, by us or by qsub."""


class QueryError(RuntimeError):
    """The scheduler could not be asked (command missing, failed, unreadable output)."""


# --------------------------------------------------------------------------- settings


def settings_from_config(config: Mapping) -> dict:
    """The provider's settings: what submit, status and cancel need from the config."""
    pbs, tiles = config["pbs"], config["tiles"]
    return {
        "account": pbs["account"],
        "queue": pbs["queue"],
        "filesystems": pbs["filesystems"],
        "place": pbs["place"],
        "nodes_per_submission": pbs["nodes_per_submission"],
        "walltime_margin_minutes": pbs["walltime_margin_minutes"],
        "setup": list(pbs["setup"]),
        "flavor": pbs["flavor"],
        "status_interval": pbs["status_interval"],
        "tiles_per_node": tiles["per_node"],
        "tiles_per_job": tiles["per_job"],
        "runtime_minutes": config["runtime_minutes"],
        "state_dir": STATE_DIR,
        "log_dir": LOG_DIR,
        # The profile's commands re-run themselves with this interpreter when the
        # `python3` on PATH is too old (e.g. a login node's system Python).
        "python": sys.executable,
    }


@dataclass(frozen=True)
class RunInfo:
    """What the Snakefile knows about the run when it loads (see `run_info`)."""

    configfiles: tuple[str, ...] = ()
    jobs: int | None = None  # --jobs: submissions in the system at once
    cores: int | None = None  # --cores: passed on to each group job's Snakemake
    main: bool = True  # the main Snakemake process, not the one inside a group job


def run_info(workflow) -> RunInfo:
    """Read `RunInfo` from Snakemake's ``workflow`` object (9.x attribute names).

    At load time Snakemake has not chosen its executor yet (``workflow.executor_plugin``
    is None, even in real runs), so the profile is recognised by its config file.
    """
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


def export_settings(config: Mapping, environ: MutableMapping = os.environ, workflow=None) -> dict:
    """Put the settings as JSON into ``environ`` for the profile's commands.

    With ``workflow`` (Snakemake's object, or a `RunInfo`) and the Aurora profile in
    use, also validate them, so a setting the scheduler would refuse fails the dry
    run with a `PbsConfigError` that names the config key.
    """
    settings = settings_from_config(config)
    if workflow is not None:
        info = workflow if isinstance(workflow, RunInfo) else run_info(workflow)
        if profile_in_use(info.configfiles):
            check_settings(settings, jobs=info.jobs if info.main else None)
    environ[SETTINGS_VARIABLE] = json.dumps(settings)
    return settings


def announce_plan(workflow, config: Mapping, pending_jobs: Callable[[], int], stream=None) -> None:
    """With the Aurora profile, print the PBS plan of the pending ranks (dry runs too).

    ``pending_jobs`` is called only then: the Snakemake inside each submission (and
    each of its jobs) skips looking at every rank's outputs on the shared file system.
    """
    info = workflow if isinstance(workflow, RunInfo) else run_info(workflow)
    if info.main and profile_in_use(info.configfiles):
        plan = describe_plan(pending_jobs(), settings_from_config(config))
        print(plan, file=stream or sys.stderr)


def load_settings(environ: Mapping = os.environ) -> dict:
    text = environ.get(SETTINGS_VARIABLE)
    if not text:
        raise PbsConfigError(
            f"{SETTINGS_VARIABLE} is not set: the profile's commands must be started by "
            "Snakemake running this workflow (its Snakefile calls pbs.export_settings)"
        )
    return json.loads(text)


# ------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class QueueLimits:
    min_nodes: int
    max_nodes: int
    max_minutes: int
    min_minutes: int = 5
    max_jobs: int | None = None  # per user, running + queued


# ALCF user guide, docs/aurora/running-jobs-aurora.md (argonne-lcf/user-guides):
# debug and debug-scaling allow one job per user (running/accruing/queued); prod is
# a routing queue (1-2048 nodes in the 2025 guide, <= 18 or 24 h by version), checked
# generously. "capacity" (1-16 nodes, 7 days) is from an earlier version of the guide.
# Unknown queue names pass: other sites, new queues.
AURORA_QUEUES: dict[str, QueueLimits] = {
    "debug": QueueLimits(1, 2, 60, max_jobs=1),
    "debug-scaling": QueueLimits(2, 31, 60, max_jobs=1),
    "capacity": QueueLimits(1, 16, 7 * 24 * 60),
    "prod": QueueLimits(1, 10624, 24 * 60),
}


def walltime_minutes(runtime_minutes: int, settings: Mapping) -> int:
    return int(runtime_minutes) + int(settings["walltime_margin_minutes"])


def format_walltime(minutes: int) -> str:
    """PBS walltime HH:MM:SS (hours may exceed 24)."""
    hours, mins = divmod(int(minutes), 60)
    return f"{hours:02d}:{mins:02d}:00"


def jobs_per_node(settings: Mapping) -> int:
    return settings["tiles_per_node"] // settings["tiles_per_job"]


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
    queue = settings["queue"]
    limits = AURORA_QUEUES.get(queue)
    if limits is not None:
        nodes = settings["nodes_per_submission"]
        minutes = walltime_minutes(settings["runtime_minutes"], settings)
        if not limits.min_nodes <= nodes <= limits.max_nodes:
            problems.append(
                f"config key pbs.nodes_per_submission ({nodes}) is outside queue {queue!r}'s "
                f"{limits.min_nodes}-{limits.max_nodes} nodes (config key pbs.queue)"
            )
        if not limits.min_minutes <= minutes <= limits.max_minutes:
            problems.append(
                f"walltime {format_walltime(minutes)} (config keys runtime_minutes "
                f"{settings['runtime_minutes']} + pbs.walltime_margin_minutes "
                f"{settings['walltime_margin_minutes']}) is outside queue {queue!r}'s "
                f"{format_walltime(limits.min_minutes)}-{format_walltime(limits.max_minutes)}"
            )
        if limits.max_jobs is not None and jobs is not None and jobs > limits.max_jobs:
            problems.append(
                f"queue {queue!r} (config key pbs.queue) takes {limits.max_jobs} job per user "
                f"at a time, but up to {jobs} submissions may be in the system (--jobs / "
                f"profile key jobs): run with --jobs {limits.max_jobs} (submissions then run "
                "one after another) or use queue prod"
            )
    return problems


def check_settings(settings: Mapping, *, jobs: int | None = None) -> None:
    problems = settings_problems(settings, jobs=jobs)
    if problems:
        raise PbsConfigError("PBS settings (profiles/aurora):\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------- group packing


def expected_group_size(settings: Mapping) -> int:
    """Jobs per submission: every tile of every node of one submission busy."""
    return settings["nodes_per_submission"] * jobs_per_node(settings)


def group_packing_problems(
    group_components: Mapping[str, int], settings: Mapping, *, cores=None, group: str = "node"
) -> list[str]:
    expected = expected_group_size(settings)
    how = (
        f"{settings['nodes_per_submission']} nodes (pbs.nodes_per_submission) x "
        f"{jobs_per_node(settings)} jobs per node (tiles.per_node // tiles.per_job)"
    )
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


def node_group(workflow, config: Mapping, name: str = "node") -> Callable | None:
    """The tile rule's ``group:``: a function that checks the profile's packing, or None.

    Only the Aurora profile packs jobs into submissions; elsewhere the rule has no group
    (a group per job costs Snakemake about 0.3 ms per job in every dry run).
    Snakemake sets ``--group-components`` on the workflow only after the Snakefile is
    loaded, so the check runs when the DAG asks for the rule's group: in dry runs too.
    It applies in the main Snakemake process only.
    """
    if not profile_in_use(run_info(workflow).configfiles):
        return None
    checked = []

    def group(wildcards) -> str:
        if not checked:
            info = run_info(workflow)
            if info.main:
                problems = group_packing_problems(
                    workflow.group_settings.group_components,
                    settings_from_config(config),
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


# ------------------------------------------------------------------------- submission


def read_properties(jobscript_text: str) -> dict:
    """The job properties Snakemake writes into the jobscript (``# properties = {...}``)."""
    for line in jobscript_text.splitlines():
        if line.startswith("# properties = "):
            return json.loads(line.removeprefix("# properties = "))
    raise SubmitError("the jobscript has no '# properties = ' line (profiles/aurora/jobscript.sh)")


def job_ranks(properties: Mapping) -> list[int]:
    """Ranks of the ``<rank>.out`` outputs, else of the ``<rank>.in`` inputs.

    Snakemake leaves a list out of the properties beyond 100 files (96 outputs for
    48 ranks); with more than 100 ranks per submission both are missing.
    """
    for key, suffix in (("output", "out"), ("input", "in")):
        pattern = re.compile(rf"(?:^|/)(\d+)\.{suffix}$")
        found = (pattern.search(f) for f in properties.get(key) or ())
        ranks = sorted({int(m.group(1)) for m in found if m})
        if ranks:
            return ranks
    return []


@dataclass(frozen=True)
class Plan:
    name: str
    jobs: int  # member jobs running at once
    nodes: int
    walltime: str
    ranks: tuple[int, ...]


def job_name(ranks: Sequence[int], fallback: str) -> str:
    """Short PBS job name (<= 15 characters, a letter first) from the ranks it runs.

    "r0-47" for a contiguous block, "r3-40_12" when 12 scattered ranks lie in 3..40.
    """
    if not ranks:
        name = "snk" + re.sub(r"[^A-Za-z0-9]", "", fallback)[:8]
    elif len(ranks) == 1:
        name = f"r{ranks[0]}"
    else:
        first, last = ranks[0], ranks[-1]
        name = f"r{first}-{last}"
        if last - first + 1 != len(ranks):
            name += f"_{len(ranks)}"
    return name[:15]


def queue_nodes(nodes: int, settings: Mapping) -> int:
    """Nodes to ask for: at least the queue's minimum (debug-scaling takes 2 or more)."""
    limits = AURORA_QUEUES.get(settings["queue"])
    return max(nodes, limits.min_nodes) if limits else nodes


def plan_run(pending_jobs: int, settings: Mapping) -> list[tuple[int, int]]:
    """(jobs, nodes) of each submission that ``pending_jobs`` tile jobs make.

    Snakemake fills each group up to group-components jobs (checked to equal
    `expected_group_size`), so all submissions but the last are full.
    """
    size = expected_group_size(settings)
    full, rest = divmod(pending_jobs, size)
    sizes = [size] * full + ([rest] if rest else [])
    return [
        (jobs, queue_nodes(math.ceil(jobs / jobs_per_node(settings)), settings)) for jobs in sizes
    ]


def describe_plan(pending_jobs: int, settings: Mapping) -> str:
    """The dry run's plan: submissions, nodes each, walltime, node-hours at most."""
    plan = plan_run(pending_jobs, settings)
    minutes = walltime_minutes(settings["runtime_minutes"], settings)
    if not plan:
        return "PBS plan: nothing to submit."
    shapes = ", ".join(
        f"{count} x {nodes} node(s)"
        for nodes, count in sorted(Counter(n for _, n in plan).items(), reverse=True)
    )
    node_hours = sum(nodes for _, nodes in plan) * minutes / 60
    return (
        f"PBS plan: {pending_jobs} rank job(s) -> {len(plan)} submission(s) to queue "
        f"{settings['queue']!r} ({shapes}), walltime {format_walltime(minutes)} each, "
        f"at most {node_hours:.2f} node-hours"
    )


def plan_submission(properties: Mapping, settings: Mapping) -> Plan:
    """Nodes, walltime and name of one submission from Snakemake's job properties.

    The members running at once come from the summed ``tiles`` resource: Snakemake
    sums resources over the members of a group that run in parallel (always present,
    unlike the output list, which is dropped beyond 100 files).
    """
    resources = properties.get("resources") or {}
    per_job = settings["tiles_per_job"]
    tiles = resources.get("tiles")
    if not isinstance(tiles, int) or tiles < 1:
        raise SubmitError(
            f"job {properties.get('jobid', '?')} has no 'tiles' resource; the Aurora profile "
            "submits only rules that declare resources: tiles=..."
        )
    jobs = math.ceil(tiles / per_job)
    nodes = math.ceil(jobs / jobs_per_node(settings))
    limit = settings["nodes_per_submission"]
    if nodes > limit:
        raise SubmitError(
            f"this submission would need {nodes} nodes ({jobs} jobs of {per_job} tile(s), "
            f"{jobs_per_node(settings)} per node) but pbs.nodes_per_submission is {limit}: "
            "profile key group-components packs more jobs than fit"
        )
    runtime = resources.get("runtime", settings["runtime_minutes"])
    minutes = walltime_minutes(runtime, settings)
    nodes = queue_nodes(nodes, settings)
    queue = settings["queue"]
    queue_limits = AURORA_QUEUES.get(queue)
    if queue_limits is not None and minutes > queue_limits.max_minutes:
        raise SubmitError(
            f"walltime {format_walltime(minutes)} (runtime {runtime} min + margin) exceeds "
            f"queue {queue!r}'s {format_walltime(queue_limits.max_minutes)}: Snakemake "
            "runs this submission's jobs in waves; raise profile key cores"
        )
    walltime = format_walltime(minutes)
    ranks = tuple(job_ranks(properties))
    name = job_name(ranks, str(properties.get("jobid", "")))
    return Plan(name=name, jobs=jobs, nodes=nodes, walltime=walltime, ranks=ranks)


def insert_setup(jobscript_text: str, setup_lines: Sequence[str]) -> str:
    """Replace the marker line by the site setup; a failing setup line ends the job."""
    lines = jobscript_text.splitlines()
    try:
        at = lines.index(SETUP_MARKER)
    except ValueError:
        raise SubmitError(
            f"the jobscript has no line {SETUP_MARKER!r} (profiles/aurora/jobscript.sh)"
        ) from None
    block = []
    if setup_lines:
        block = [
            "# site setup (config pbs.setup); a failing line ends the job here",
            "trap 'echo \"aurora-pbs: site setup (config pbs.setup) failed\" >&2' EXIT",
            "set -e",
            *setup_lines,
            "set +e",
            "trap - EXIT",
        ]
    return "\n".join(lines[:at] + block + lines[at + 1 :]) + "\n"


def qsub_argv(settings: Mapping, plan: Plan, script: str, log: str) -> list[str]:
    """qsub's argument list: one comma-joined -l (Slurm's qsub wrapper keeps the last -l)."""
    resources = ",".join(
        [
            f"select={plan.nodes}",
            f"walltime={plan.walltime}",
            f"filesystems={settings['filesystems']}",
            f"place={settings['place']}",
        ]
    )
    return [
        "qsub",
        "-A",
        settings["account"],
        "-q",
        settings["queue"],
        "-l",
        resources,
        "-N",
        plan.name,
        "-j",
        "oe",
        "-o",
        log,
        script,
    ]


def submit(jobscript: str, settings: Mapping, *, run=subprocess.run, now=time.time) -> str:
    """Submit one Snakemake jobscript with qsub; return the scheduler's job id."""
    check_settings(settings)
    text = Path(jobscript).read_text()
    plan = plan_submission(read_properties(text), settings)
    log_dir = Path(settings["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)
    # Relative paths: Slurm's qsub wrapper pastes them into a shell command line.
    script = log_dir / f"{plan.name}.sh"
    script.write_text(insert_setup(text, settings["setup"]))
    script.chmod(0o755)
    argv = qsub_argv(settings, plan, str(script), str(log_dir / f"{plan.name}.log"))
    what = (
        f"{plan.name} ({plan.jobs} jobs on {plan.nodes} node(s), walltime {plan.walltime}, "
        f"queue {settings['queue']})"
    )
    try:
        result = run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SubmitError(f"qsub could not submit {what}: {error}") from error
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        message = (result.stdout + result.stderr).strip() or "(no output)"
        error = SubmitError(
            f"qsub refused {what} (exit {result.returncode}):\n{message}\ncommand: {' '.join(argv)}"
        )
        # Where the job's PBS log would be: the terminal's copy scrolls away.
        (log_dir / f"{plan.name}.log").write_text(f"pbs-submit: {error}\n")
        raise error
    job_id = lines[0]
    store = StateStore(settings["state_dir"])
    with store.locked() as state:
        state["jobs"][job_id] = new_job_record(now(), plan.name)
    with open(log_dir / "submissions.tsv", "a") as index:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now()))
        ranks = ",".join(str(r) for r in plan.ranks)
        index.write(
            f"{stamp}\t{job_id}\t{plan.name}\t{plan.nodes}\t{plan.walltime}\t"
            f"{settings['queue']}\t{ranks}\n"
        )
    return job_id


# ---------------------------------------------------------------------------- parsing


# PBS Pro Exit_status values below 0 are set by PBS itself (job.h JOB_EXEC_*).
PBS_EXIT_REASONS = {
    -25: "killed by PBS: ncpus limit exceeded",
    -27: "killed by PBS: memory limit exceeded",
    -29: "killed by PBS: walltime exceeded",
}
PBS_RUNNING_STATES = frozenset("QHWRESTUBM")


def pbs_exit_meaning(code: int) -> str:
    if code == 0:
        return "exit 0"
    if code < 0:
        return f"Exit_status {code} ({PBS_EXIT_REASONS.get(code, 'job not run or killed by PBS')})"
    if code > 256:
        return f"Exit_status {code} (killed by signal {code - 256})"
    return f"Exit_status {code}"


def parse_pbspro_json(text: str) -> dict[str, tuple[str, str]]:
    """``qstat -x -f -F json`` output -> {job id: (running|success|failed, detail)}.

    Raises QueryError for output that is not PBS Pro JSON. Jobs qstat does not know
    are simply absent (qstat names them on stderr).
    """
    try:
        # strict=False: PBS versions have emitted raw control characters in strings.
        data = json.loads(text, strict=False)
    except ValueError as error:
        raise QueryError(f"qstat printed no valid JSON ({error}): {text[:200]!r}") from error
    if not isinstance(data, dict) or not isinstance(data.get("Jobs", {}), dict):
        raise QueryError(f"qstat JSON has no 'Jobs' mapping: {text[:200]!r}")
    states = {}
    for job_id, job in data.get("Jobs", {}).items():
        letter = str(job.get("job_state", "?"))
        if letter in ("F", "X"):
            code = job.get("Exit_status")
            if code is None:
                # e.g. deleted before it ran
                states[job_id] = (FAILED, f"job_state {letter} without Exit_status")
            else:
                try:
                    code = int(code)
                except (TypeError, ValueError):
                    states[job_id] = (FAILED, f"job_state {letter}, Exit_status {code!r}")
                    continue
                states[job_id] = (SUCCESS if code == 0 else FAILED, pbs_exit_meaning(code))
        else:
            detail = f"job_state {letter}"
            if letter not in PBS_RUNNING_STATES:
                detail += " (unknown state, read as running)"
            states[job_id] = (RUNNING, detail)
    return states


SLURM_RUNNING = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)
SLURM_FAILED = frozenset(
    {
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)
_SLURM_FIELD = r"(?:^|\s){}=(\S*)"


def parse_scontrol(text: str) -> dict[str, tuple[str, str]]:
    """``scontrol show job -o`` output (one line per job) -> {job id: (state, detail)}."""
    states = {}
    for line in text.splitlines():
        job = re.match(r"JobId=(\S+)", line)
        if not job:
            continue
        state = re.search(_SLURM_FIELD.format("JobState"), line)
        exit_code = re.search(_SLURM_FIELD.format("ExitCode"), line)
        name = state.group(1) if state else "?"
        code = exit_code.group(1) if exit_code else "?"
        detail = f"JobState={name} ExitCode={code}"
        if name == "COMPLETED":
            states[job.group(1)] = (SUCCESS if code == "0:0" else FAILED, detail)
        elif name in SLURM_FAILED:
            states[job.group(1)] = (FAILED, detail)
        else:
            if name not in SLURM_RUNNING:
                detail += " (unknown state, read as running)"
            states[job.group(1)] = (RUNNING, detail)
    return states


def match_ids(wanted: Iterable[str], found: Mapping[str, tuple[str, str]]) -> dict:
    """Answers for the ids we submitted, by exact id or else by PBS sequence number
    (qsub may print ``123.aurora-pbs-0001...`` while qstat names it differently)."""
    by_number = {key.split(".", 1)[0]: value for key, value in found.items()}
    answers = {}
    for job_id in wanted:
        if job_id in found:
            answers[job_id] = found[job_id]
        elif job_id.split(".", 1)[0] in by_number:
            answers[job_id] = by_number[job_id.split(".", 1)[0]]
    return answers


def query_scheduler(ids: Sequence[str], flavor: str, *, run=subprocess.run) -> dict:
    """One scheduler call for all ``ids`` -> {id: (state, detail)} for the ids it knows.

    Raises QueryError when the scheduler could not be asked at all.
    """
    if flavor == "pbspro":
        argv = ["qstat", "-x", "-f", "-F", "json", *ids]
        parse = parse_pbspro_json
    elif flavor == "slurm":
        argv = ["scontrol", "show", "job", "-o"]
        parse = parse_scontrol
    else:
        raise QueryError(f"unknown pbs.flavor {flavor!r}")
    try:
        result = run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT)
    except FileNotFoundError as error:
        raise QueryError(f"{argv[0]} not found: {error}") from error
    except (OSError, subprocess.TimeoutExpired) as error:
        raise QueryError(f"{argv[0]} failed: {error}") from error
    if not result.stdout.strip():
        if result.returncode != 0:
            # PBS: every id unknown (exit 153, "qstat: Unknown Job Id ..." on stderr)
            raise QueryError(
                f"{' '.join(argv[:5])} exited {result.returncode}: {result.stderr.strip()[:300]}"
            )
        return {}
    # A non-zero exit with output: qstat -x names unknown ids on stderr, prints the rest.
    return match_ids(ids, parse(result.stdout))


# ------------------------------------------------------------------------------ state


def new_job_record(now: float, name: str = "") -> dict:
    return {"name": name, "seen": now, "state": RUNNING, "detail": "", "problems": 0, "since": None}


def empty_state() -> dict:
    return {"queried_at": None, "queried_ids": [], "answered": [], "jobs": {}}


class StateStore:
    """The status cache in ``state_dir``: JSON replaced atomically, guarded by a flock."""

    def __init__(self, state_dir: str | os.PathLike):
        self.dir = Path(state_dir)
        self.path = self.dir / "status.json"
        self.lock_path = self.dir / "lock"
        self.log_path = self.dir / "status.log"

    def read(self) -> dict:
        """Read without the lock (safe: writes are atomic renames)."""
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return empty_state()
        return state if isinstance(state, dict) and "jobs" in state else empty_state()

    def write(self, state: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".status.")
        with os.fdopen(fd, "w") as out:
            json.dump(state, out)
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict]:
        """The state, exclusively; written back when the block ends without error."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            yield state
            self.write(state)

    def log(self, message: str, now: float) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as out:
            out.write(f"{stamp} {message}\n")


# ----------------------------------------------------------------------------- status


def job_status(
    job_id: str,
    settings: Mapping,
    *,
    query: Callable[[Sequence[str]], dict] | None = None,
    now: Callable[[], float] = time.time,
    problem_rounds: int = PROBLEM_ROUNDS,
    problem_seconds: float = PROBLEM_SECONDS,
    warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> str:
    """running, success or failed for one job, from at most one query per round.

    Snakemake asks about every active job once per round, one call after another.
    The cache keeps the time of the last query and the ids answered since; a request
    for an id already answered means a new round, which queries the scheduler once
    for all open jobs of the run. A query younger than status_interval/2 is never
    repeated (new jobs read as running meanwhile); one older than 3 intervals is.
    """
    if query is None:

        def query(ids):
            return query_scheduler(ids, settings["flavor"])

    interval = float(settings["status_interval"])
    store = StateStore(settings["state_dir"])
    with store.locked() as state:
        t = now()
        jobs = state["jobs"]
        job = jobs.setdefault(job_id, new_job_record(t))  # e.g. resumed from an older run
        job["seen"] = t
        if job["state"] not in FINAL:
            age = t - state["queried_at"] if state["queried_at"] is not None else math.inf
            new_round = (
                job_id in state["answered"]
                or job_id not in state["queried_ids"]
                or age > 3 * interval
            )
            if new_round and age >= interval / 2:
                _query_round(
                    state, store, query, t, interval, (problem_rounds, problem_seconds), warn
                )
        if job_id not in state["answered"]:
            state["answered"].append(job_id)
        for old in [i for i, j in jobs.items() if t - j["seen"] > FORGET_SECONDS]:
            del jobs[old]
        return job["state"]


def _query_round(state, store, query, t, interval, bounds, warn) -> None:
    """Ask the scheduler once about every open job of the run and record the answers."""
    problem_rounds, problem_seconds = bounds
    jobs = state["jobs"]
    # Jobs nobody asked about for this long belong to a run that is gone.
    stale = max(600.0, 30 * interval)
    ids = [i for i, j in jobs.items() if j["state"] not in FINAL and t - j["seen"] < stale]
    try:
        answers, whole = query(ids), None
    except QueryError as error:
        answers, whole = {}, str(error)
    except Exception as error:  # a surprise must not abort the whole workflow at once
        answers, whole = {}, f"{type(error).__name__}: {error}"
    counts = {}
    for job_state, _ in answers.values():
        counts[job_state] = counts.get(job_state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no answer"
    store.log(f"query for {len(ids)} job(s): {summary}", t)
    for job_id in ids:
        job = jobs[job_id]
        if job_id in answers:
            job["state"], job["detail"] = answers[job_id]
            job["problems"], job["since"] = 0, None
            if job["state"] == FAILED:
                warn(_failure_message(job_id, job, store))
            continue
        reason = whole or "the scheduler does not know this job id"
        job["problems"] += 1
        job["since"] = job["since"] if job["since"] is not None else t
        waited = t - job["since"]
        store.log(
            f"{job_id}: status unknown ({job['problems']}. round, {waited:.0f} s): {reason}", t
        )
        if job["problems"] >= problem_rounds and waited >= problem_seconds:
            job["state"] = FAILED
            job["detail"] = (
                f"status unreadable for {job['problems']} rounds / {waited:.0f} s: {reason}"
            )
            store.log(f"{job_id}: reported as failed", t)
            warn(_failure_message(job_id, job, store))
        elif job["problems"] == 1:
            warn(
                f"pbs-status: cannot read the status of job {job_id} ({reason}); reading it "
                f"as running for now (details: {store.log_path})"
            )
    state["queried_at"], state["queried_ids"], state["answered"] = t, ids, []


def _failure_message(job_id: str, job: Mapping, store: StateStore) -> str:
    name = job.get("name") or ""
    log = f"; PBS log: {LOG_DIR}/{name}.log" if name else ""
    return f"pbs-status: job {job_id} {name} failed: {job['detail']}{log}"


# ----------------------------------------------------------------------------- cancel


def cancel(
    ids: Sequence[str], settings: Mapping, *, popen=subprocess.Popen, wait: float = CANCEL_WAIT
) -> list[str]:
    """qdel the given jobs except those known to have ended; returns the ids passed on.

    qdel runs in its own session with output to state_dir/cancel.log, so when it is
    slower than the plugin's 2 s timeout, killing this command does not stop it.
    """
    store = StateStore(settings["state_dir"])
    known = store.read()["jobs"]
    open_ids = [i for i in ids if known.get(i, {}).get("state") not in FINAL]
    if not open_ids:
        return []
    store.dir.mkdir(parents=True, exist_ok=True)
    argv = ["qdel", *open_ids]
    with open(store.dir / "cancel.log", "a") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        log.flush()
        try:
            process = popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as error:
            log.write(f"qdel could not start: {error}\n")
            return open_ids
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=wait)
    return open_ids


# ------------------------------------------------------------------------ entry points


def main_submit(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: pbs-submit <jobscript>", file=sys.stderr)
        return 2
    try:
        job_id = submit(argv[0], load_settings())
    except (SubmitError, PbsConfigError, OSError, ValueError) as error:
        # stderr reaches the user's terminal (Snakemake 9.27.1 does not show the stdout
        # of a failed submission for group jobs); qsub refusals also go to the PBS log.
        print(f"pbs-submit: {error}", file=sys.stderr)
        return 1
    print(job_id)
    return 0


def main_status(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: pbs-status <jobid>", file=sys.stderr)
        return 2
    print(job_status(argv[0], load_settings()))
    return 0


def main_cancel(argv: Sequence[str]) -> int:
    if argv:
        cancel(list(argv), load_settings())
    return 0
