"""One submission: its plan (nodes, walltime, name) from Snakemake's jobscript, the
jobscript PBS runs, and the qsub call."""

from __future__ import annotations

import heapq
import json
import math
import re
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine import lifecycle  # stdlib only, like this package (scripts/ is on the path)
from formats import engine_spec, preflight_failure
from formats import marker as model_marker
from formats import record as rank_record
from formats import settings as run_settings
from rank import layout as rank_files

from .plan import (
    AURORA_QUEUES,
    check_settings,
    format_walltime,
    jobs_per_node,
    max_walltime,
    queue_nodes,
    ranks_per_job_slot,
    submission_minutes,
    submission_nodes,
)
from .settings import QUERY_TIMEOUT, run_id
from .state import StateStore, append_index, new_job_record

# The line of profiles/aurora/jobscript.sh that pbs-submit replaces by config pbs.setup.
SETUP_MARKER = "# @site-setup@"
STAGE_SCRIPT = Path(__file__).resolve().parents[1] / "model" / "stage.py"
SERVE_SCRIPT = Path(__file__).resolve().parents[1] / "engine" / "supervisor.py"
NODE_SCRIPT = Path(__file__).resolve().with_name("node.py")
ACCOUNTING_SCRIPT = Path(__file__).resolve().parents[1] / "reporting" / "accounting.py"
# Before the site setup (no Python yet): when the job started, for its phases file.
START_LINE = "aurora_job_start=$(date +%s.%N)"


class SubmitError(RuntimeError):
    """A submission that was refused, by us or by qsub."""


def read_properties(jobscript_text: str) -> dict:
    """The job properties Snakemake writes into the jobscript (``# properties = {...}``)."""
    for line in jobscript_text.splitlines():
        if line.startswith("# properties = "):
            return json.loads(line.removeprefix("# properties = "))
    raise SubmitError("the jobscript has no '# properties = ' line (profiles/aurora/jobscript.sh)")


def job_ranks(properties: Mapping, jobscript_text: str = "") -> list[int]:
    """Ranks of the ``<rank>.out`` / ``<rank>.jsonl`` outputs, else of the ``<rank>.in`` /
    ``<rank>.jsonl`` inputs, else of the jobs the script's Snakemake targets
    (``--target-jobs 'infer:rank=7' 'infer_jsonl:rank=8' ...``).

    Snakemake leaves a list out of the properties beyond 100 files (96 outputs for
    48 ranks); with more than 100 ranks per submission both are missing.
    """
    for key, suffix in (("output", "(?:out|jsonl)"), ("input", "(?:in|jsonl)")):
        pattern = re.compile(rf"(?:^|/)(\d+)\.{suffix}$")
        found = (pattern.search(f) for f in properties.get(key) or ())
        ranks = sorted({int(m.group(1)) for m in found if m})
        if ranks:
            return ranks
    found = re.findall(r"'infer(?:_jsonl)?:rank=(\d+)'", jobscript_text)
    return sorted({int(r) for r in found})


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


def plan_submission(properties: Mapping, settings: Mapping, jobscript_text: str = "") -> Plan:
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
    per_slot = ranks_per_job_slot(settings)
    nodes = math.ceil(jobs / (jobs_per_node(settings) * per_slot))
    limit = settings["nodes_per_submission"]
    if nodes > limit:
        raise SubmitError(
            f"this submission would need {nodes} nodes ({jobs} jobs of {per_job} tile(s), "
            f"{jobs_per_node(settings)} per node, {per_slot} per tile slot) but "
            f"pbs.nodes_per_submission is {limit}: profile key group-components packs "
            "more jobs than fit"
        )
    nodes = queue_nodes(nodes, settings)
    runtime = resources.get("runtime", settings["runtime_minutes"])
    minutes = submission_minutes(settings, jobs, nodes, runtime)
    queue = settings["queue"]
    queue_limits = AURORA_QUEUES.get(queue)
    if queue_limits is not None and minutes > queue_limits.max_minutes:
        raise SubmitError(
            f"walltime {format_walltime(minutes)} (runtime {runtime} min + margin) exceeds "
            f"queue {queue!r}'s {format_walltime(queue_limits.max_minutes)}: Snakemake "
            "runs this submission's jobs in waves; raise profile key cores"
        )
    walltime = format_walltime(minutes)
    ranks = tuple(job_ranks(properties, jobscript_text))
    name = job_name(ranks, str(properties.get("jobid", "")))
    return Plan(name=name, jobs=jobs, nodes=nodes, walltime=walltime, ranks=ranks)


def job_lines(settings: Mapping, stage_file: Path | None, engines_file: Path | None) -> list[str]:
    """Jobscript lines after the site setup: check every node and copy the model to it
    first (preflight; config weights.stage), start the warm engines with one launcher
    call (config warm_engines), and undo both when the job script ends. Only paths the
    provider made reach the shell, quoted."""
    python = settings["task_python"]
    # The job's phases (scripts/reporting/accounting.py: where its node-hours went).
    phase = [python, str(ACCOUNTING_SCRIPT), "phase", str(settings["log_dir"])]
    lines = [f'{shlex.join([*phase, "setup"])} "start=$aurora_job_start"']
    if settings.get("settings_file"):
        # The job's Snakemakes read the run's settings (formats/settings.py), not the config.
        variable = run_settings.VARIABLE
        lines.append(f"export {variable}={shlex.quote(settings['settings_file'])}")
    cleanup = [shlex.join([*phase, "ranks_done"])]
    if engines_file is not None:
        serve = [python, str(SERVE_SCRIPT)]
        cleanup.append(shlex.join([*serve, "stop", str(engines_file)]))
    if stage_file is not None:
        stage = [python, str(STAGE_SCRIPT)]
        if settings.get("stage"):
            cleanup.append(shlex.join([*stage, "remove", str(stage_file)]))
    cleanup.append(shlex.join([*phase, "end"]))
    lines.append(f"trap {shlex.quote('; '.join(cleanup))} EXIT")
    if stage_file is not None:
        lines += [
            "# preflight: every node checks vLLM, its tiles and (config weights.stage) its",
            "# room, then gets its copy of the model; a failed check ends the job here",
            f"{shlex.join([*stage, 'prepare', str(stage_file)])} || exit 1",
        ]
    elif preflight_skipped(settings):
        lines.append("echo 'preflight: skipped: config node_launcher is empty'")
    lines.append(shlex.join([*phase, "staged"]))
    if engines_file is not None:
        lines += [
            "# warm engines (config warm_engines): ONE launcher call starts them on every",
            "# node, listening on the node's loopback address only",
            f"{shlex.join([*serve, 'launch', str(engines_file)])} &",
        ]
    return lines


def node_local_lines(settings: Mapping, engines_file: Path, nodes_file: Path) -> list[str]:
    """The ranks of a warm submission: ONE more launcher call (config node_launcher)
    runs a Snakemake on every node, serving the node's share of the ranks (as threads)
    against the node's own engines. Replaces the group job's one Snakemake."""
    node = [settings["task_python"], str(NODE_SCRIPT)]
    return [
        "# the ranks: every node runs its share in a Snakemake of its own, against its",
        "# own engines (scripts/pbs/node.py ranks); the job fails if any node's does",
        shlex.join([*node, "ranks", str(engines_file), str(nodes_file)]),
    ]


def exec_job_argv(jobscript_text: str) -> tuple[int, str, list[str]]:
    """The line of the group job's Snakemake command in the jobscript, its folder and
    its argument list.

    cluster-generic writes ``cd DIR && PYTHON -m snakemake ... --mode remote ...
    && exit 0 || exit 1``; the parts are split here, in Python, so that the node-local
    Snakemakes start from an argument list (no shell)."""
    lines = jobscript_text.splitlines()
    for number, line in enumerate(lines):
        if " -m snakemake " not in line:
            continue
        words = shlex.split(line)
        parts, part = [], []
        for word in words:
            if word in ("&&", "||"):
                parts.append(part)
                part = []
            else:
                part.append(word)
        parts.append(part)
        if len(parts[0]) != 2 or parts[0][0] != "cd":
            raise SubmitError(f"the jobscript's Snakemake command does not start with cd: {line}")
        commands = [p for p in parts[1:] if "snakemake" in p and "-m" in p]
        rest = [
            p for p in parts[1:] if p not in commands and p not in (["exit", "0"], ["exit", "1"])
        ]
        if len(commands) != 1 or rest:
            raise SubmitError(
                "the jobscript's Snakemake command has parts a node-local Snakemake cannot "
                f"run (environment or pre-commands): {line}"
            )
        return number, parts[0][1], commands[0]
    raise SubmitError("the jobscript has no Snakemake command ('-m snakemake')")


def node_argv(argv: Sequence[str], cores: int) -> list[str]:
    """One node's Snakemake: the group job's command without its target jobs (each node
    gets its own), its rank jobs as threads of itself (no Snakemake, interpreter or
    launcher per rank), ``cores`` of them at once, greedy scheduling (thousands of
    jobs), no cap on jobs started per second (Snakemake's default, 100/1s, protects a
    batch scheduler; here it made dispatch come in bursts), and the ranks after a failed
    one still run (--keep-going). Later options win, so they go right before ``--mode``
    (``--default-resources`` and ``--quiet`` replace the group job's)."""
    kept, skipping = [], False
    for word in argv:
        if word == "--target-jobs":
            skipping = True
            continue
        if skipping and not word.startswith("-"):
            continue
        skipping = False
        kept.append(word)
    if "--mode" not in kept:
        raise SubmitError("the jobscript's Snakemake command has no --mode option")
    at = kept.index("--mode")
    extra = ["--force-use-threads", "--keep-going", "--cores", str(int(cores))]
    extra += ["--scheduler", "greedy", "--max-jobs-per-timespan", "100000/1s"]
    # Per rank, Snakemake's own work is most of a node's cost (benchmarks/dispatch.py):
    # its greedy scheduler looks at every ready rank each round (a sample of as many as
    # run at once is enough), a cluster run's default mem_mb and disk_mb evaluate each
    # rank's input size, and each rank's job details and three progress lines go to the
    # PBS log, unlabelled, from every node through the launcher (a rank has its own log
    # and record; the main Snakemake's progress lines follow the submission; failures
    # are still printed).
    extra += ["--scheduler-subsample", str(int(cores))]
    extra += ["--default-resources", "mem_mb=0", "disk_mb=0", "--quiet", "progress", "rules"]
    return kept[:at] + extra + kept[at:]


def prompt_count(path: Path) -> int:
    """Non-blank lines of a rank file (its prompts); 1 for a file that cannot be read
    (its rank fails on its node, naming the file)."""
    try:
        with open(path, "rb") as lines:
            return max(1, sum(1 for line in lines if line.strip()))
    except OSError:
        return 1


def node_shares(weights: Mapping[int, int], nodes: int) -> list[list[int]]:
    """Ranks per node, balanced by prompt count (largest first onto the lightest node;
    ties by rank number), each share in rank order."""
    loads = [(0, node) for node in range(nodes)]
    heapq.heapify(loads)
    shares: list[list[int]] = [[] for _ in range(nodes)]
    for rank in sorted(weights, key=lambda r: (-weights[r], r)):
        load, node = heapq.heappop(loads)
        shares[node].append(rank)
        heapq.heappush(loads, (load + weights[rank], node))
    return [sorted(share) for share in shares]


def write_nodes_file(settings: Mapping, plan: Plan, jobscript_text: str, path: Path) -> int:
    """What each node's Snakemake needs (scripts/engine/supervisor.py ranks): the folder, the group
    job's command and each node's share of the ranks. Returns the jobscript line of the
    group job's command, which the node-local launch replaces."""
    number, workdir, argv = exec_job_argv(jobscript_text)
    data = Path(workdir, settings["data_dir"])
    files = {rank: rank_files.input_file(data, str(rank)) for rank in plan.ranks}
    weights = {rank: prompt_count(path) for rank, path in files.items()}
    per_node = jobs_per_node(settings) * settings["ranks_in_flight"]
    nodes = {
        "workdir": workdir,
        "argv": node_argv(argv, per_node),
        "shares": node_shares(weights, plan.nodes),
        # the rule of each rank: infer (.in) or infer_jsonl (.jsonl)
        "rules": {str(rank): rank_files.rule_of(path.name) for rank, path in files.items()},
        "node_launcher": settings["node_launcher"],
        # which ranks are whole or failed by their input, for a node's new Snakemake
        "results_dir": settings.get("results_dir") or "",
        "failed_dir": settings.get("failed_dir") or "",
    }
    path.write_text(json.dumps(nodes))
    return number


def write_engines_file(settings: Mapping, path: Path) -> None:
    """What scripts/engine/supervisor.py needs (formats/engine_spec.py): the engines'
    settings, the model folder, and the file holding the submission's engine key (new for
    each submission, mode 0600)."""
    key_file = engine_spec.key_path(path)
    lifecycle.write_key_file(key_file, lifecycle.new_api_key())
    spec = engine_spec.with_model(
        dict(settings["engines"]) | {"api_key_file": str(key_file)},
        engine_fields(settings),
        stage=bool(settings.get("stage") and settings.get("model")),
        stage_dir=settings["stage_dir"],
        python=settings["task_python"],
    )
    engine_spec.write_spec(path, spec)


def insert_setup(jobscript_text: str, setup_lines: Sequence[str], after: Sequence[str] = ()) -> str:
    """Replace the marker line by the site setup (a failing setup line ends the job),
    followed by ``after`` (e.g. `job_lines`)."""
    lines = jobscript_text.splitlines()
    try:
        at = lines.index(SETUP_MARKER)
    except ValueError:
        raise SubmitError(
            f"the jobscript has no line {SETUP_MARKER!r} (profiles/aurora/jobscript.sh)"
        ) from None
    block = [START_LINE]
    if setup_lines:
        block += [
            "# site setup (config pbs.setup); a failing line ends the job here",
            "trap 'echo \"aurora-pbs: site setup (config pbs.setup) failed\" >&2' EXIT",
            "set -e",
            *setup_lines,
            "set +e",
            "trap - EXIT",
        ]
    return "\n".join(lines[:at] + block + list(after) + lines[at + 1 :]) + "\n"


def qsub_argv(settings: Mapping, plan: Plan, script: str, log: str) -> list[str]:
    """qsub's argument list, resources in one comma-joined -l."""
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


def engine_fields(settings: Mapping) -> dict:
    """What the engines take of the model marker (formats/marker.py): the folder they
    load (the fetched copy named by the marker, else the configured local folder), the
    versions and the weights' size."""
    marker = settings.get("model_marker")
    try:
        return model_marker.engine_fields(marker, settings["model"], quiet=True)
    except (OSError, ValueError, KeyError) as error:
        raise SubmitError(f"cannot read the model marker {marker}: {error}") from error


def runs_preflight(settings: Mapping) -> bool:
    """Whether the nodes are checked (and given their copy) before engines start: for
    vLLM engines, with a launcher that starts one process per node."""
    return settings["engine"] != "echo" and bool(settings["node_launcher"])


def preflight_skipped(settings: Mapping) -> bool:
    return settings["engine"] != "echo" and not settings["node_launcher"]


def write_stage_file(settings: Mapping, path: Path, failure_file: Path) -> None:
    """What scripts/model/stage.py needs: what to check on every node, the model folder,
    where to copy it, how, and where a failed check is reported."""
    engines = settings["engines"]
    tiles = {"per_node": settings["tiles_per_node"], "hierarchy": settings["tiles_hierarchy"]}
    path.write_text(
        json.dumps(
            {
                **engine_fields(settings),
                "stage": bool(settings.get("stage") and settings.get("model")),
                "stage_dir": settings["stage_dir"],
                "broadcast_host": settings.get("broadcast_host") or "{host}",
                "node_launcher": settings["node_launcher"],
                "python": settings["task_python"],
                "env": dict(engines.get("env") or {}),
                "tiles": tiles,
                "failure_file": str(failure_file),
            }
        )
    )


@dataclass(frozen=True)
class Continuation:
    """A submission of the unfinished ranks of one that PBS ended (pbs.resubmit)."""

    name: str  # e.g. r0-479.c1
    ranks: tuple[int, ...]
    attempt: int  # 1 for the first continuation
    minutes: int  # its walltime
    source: str  # Snakemake's jobscript of the first submission (kept by `submit`)
    left_out: tuple[int, ...] = ()  # ranks not run again: their input is at fault


def restrict_targets(jobscript_text: str, ranks: Sequence[int]) -> str:
    """The jobscript with its group job's Snakemake targeting only ``ranks`` (the rank
    jobs of the other members are left out; any other target is kept)."""
    number, workdir, argv = exec_job_argv(jobscript_text)
    keep = {f"infer:rank={r}" for r in ranks}
    kept, targets = [], False
    for word in argv:
        if word == "--target-jobs":
            targets = True
        elif targets and word.startswith("-"):
            targets = False
        elif targets and word.startswith("infer:rank=") and word not in keep:
            continue
        kept.append(word)
    lines = jobscript_text.splitlines()
    lines[number] = f"cd {shlex.quote(workdir)} && {shlex.join(kept)} && exit 0 || exit 1"
    return "\n".join(lines) + "\n"


def continuation_plan(plan: Plan, settings: Mapping, more: Continuation) -> Plan:
    """The plan of a continuation: its ranks on the nodes they need (at most the first
    submission's), its own name and walltime (capped at the queue's limit)."""
    jobs = len(more.ranks)
    nodes = min(plan.nodes, submission_nodes(jobs, settings))
    minutes = more.minutes
    limits = AURORA_QUEUES.get(settings["queue"])
    if limits is not None:
        minutes = min(minutes, max_walltime(limits, nodes)[0])
    return Plan(more.name, jobs, nodes, format_walltime(minutes), tuple(more.ranks))


def spent_node_hours(log_dir) -> float:
    """Node-hours of the submissions in ``log_dir`` (pbs.budget_node_hours): nodes x (end -
    start) of those whose job script noted both, the walltime asked for of the others
    (running, queued, or ended without a note)."""
    from reporting import accounting

    spent = 0.0
    for row in accounting.read_index(log_dir):
        try:
            path = accounting.phases_path(log_dir, row["id"])
            marks = json.loads(path.read_text())["phases"]
            spent += row["nodes"] * (marks["end"] - marks["start"]) / 3600
        except (OSError, ValueError, KeyError, TypeError):
            spent += row["nodes"] * (accounting.walltime_hours(row["walltime"]) or 0.0)
    return spent


def budget_problem(settings: Mapping, plan: Plan) -> str | None:
    """Why a submission must not go out: the node-hours spent (logs/pbs) and the ones it
    asks for above config key pbs.budget_node_hours; None: it may."""
    from reporting import accounting

    budget = settings.get("budget_node_hours")
    if budget is None:
        return None
    spent = spent_node_hours(settings["log_dir"])
    asks = plan.nodes * (accounting.walltime_hours(plan.walltime) or 0.0)
    if spent + asks <= budget:
        return None
    records = rank_record.records_dir(settings["results_dir"])
    done = len(list(records.glob("*.json"))) if records.is_dir() else 0
    ranks = len(rank_files.discover_ranks(settings["data_dir"]))
    return (
        f"budget reached: {spent:.3f} of {budget:g} node-hours spent (config key "
        f"pbs.budget_node_hours) and {plan.name} asks for {asks:.3f} more: not submitted. "
        f"Done: {done} of {ranks} ranks, {max(0, ranks - done)} left; rerun with a larger "
        "budget to pick up from there"
    )


def submit(
    jobscript: str,
    settings: Mapping,
    *,
    run=subprocess.run,
    now=time.time,
    continuation: Continuation | None = None,
) -> str:
    """Submit one Snakemake jobscript with qsub; return the scheduler's job id.

    The id goes into the status store (with this run's id) before it is returned, so
    the watchdog can delete the submission if Snakemake never learns it. Snakemake's
    jobscript is kept as ``<name>.job.sh``: a continuation of the submission starts
    from it (``continuation``: only its unfinished ranks, its own walltime).
    """
    check_settings(settings)
    text = Path(jobscript).read_text()
    log_dir = Path(settings["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)
    if continuation is None:
        plan = plan_submission(read_properties(text), settings, text)
        source = log_dir / f"{plan.name}.job.sh"
        source.write_text(text)
    else:
        source = Path(continuation.source)
        plan = plan_submission(read_properties(text), settings, text)
        plan = continuation_plan(plan, settings, continuation)
        text = restrict_targets(text, plan.ranks)
    problem = budget_problem(settings, plan)
    if problem:
        raise SubmitError(problem)
    script = log_dir / f"{plan.name}.sh"
    stage_file = engines_file = None
    failure_file = preflight_failure.failure_file(log_dir, plan.name)
    failure_file.unlink(missing_ok=True)  # an earlier run's
    if (settings.get("stage") and settings.get("model")) or runs_preflight(settings):
        stage_file = log_dir / f"{plan.name}.stage.json"
        write_stage_file(settings, stage_file, failure_file)
    if settings.get("warm_engines"):
        engines_file = engine_spec.spec_path(log_dir, plan.name)
        write_engines_file(settings, engines_file)
        nodes_file = log_dir / f"{plan.name}.nodes.json"
        number = write_nodes_file(settings, plan, text, nodes_file)
        lines = text.splitlines()
        lines[number : number + 1] = node_local_lines(settings, engines_file, nodes_file)
        text = "\n".join(lines) + "\n"
    after = job_lines(settings, stage_file, engines_file)
    script.write_text(insert_setup(text, settings["setup"], after))
    script.chmod(0o755)
    # Absolute paths: PBS starts the job in $HOME.
    argv = qsub_argv(settings, plan, str(script), str(log_dir / f"{plan.name}.log"))
    what = (
        f"{plan.name} ({plan.jobs} jobs on {plan.nodes} node(s), walltime {plan.walltime}, "
        f"queue {settings['queue']})"
    )
    try:
        result = run(
            argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT, start_new_session=True
        )
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
        record = new_job_record(now(), plan.name, run_id(settings), settings["queue"])
        record["source"] = str(source)
        if continuation is not None:
            record["attempt"] = continuation.attempt
            record["left_out"] = list(continuation.left_out)
        state["jobs"][job_id] = record
    append_index(log_dir, now(), job_id, plan, settings["queue"])
    return job_id
