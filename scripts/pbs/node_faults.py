"""What the provider does when the infrastructure fails under a submission: a job
whose nodes' ranks were cut off (pbs/node.py noted it: a node's Snakemake died and was
not brought back, a node never reported) is continued as one PBS ended; a job PBS
requeued after losing a node of it (its run count grew) is noted with the lost node,
when, and the node-hours of the run it ended (formats/faults.py, for the run summary).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Mapping

from formats import faults, node_report
from formats.registry import job_registry

from .continuation import rank_states
from .parse import QueryError, parse_nodes
from .settings import QUERY_TIMEOUT
from .state import submission_ranks


def cut_off_by_infrastructure(settings: Mapping, job_id: str) -> str | None:
    """What cut off ranks of a job that failed although no rank of it did: its nodes'
    Snakemakes died and were not brought back, or a node's never reported
    (node.py ``ranks`` wrote ``ranks/infrastructure.json`` in the job's registry)."""
    root = settings.get("registry_root")
    if not root or not settings.get("warm_engines"):
        return None
    note = node_report.read_note(job_registry(root, job_id))
    if not note or not note["nodes"]:
        return None
    return "; ".join(f"{host}: {why}" for host, why in sorted(note["nodes"].items()))


def lost_hosts(hosts, now_on, run=subprocess.run) -> dict[str, float | None]:
    """Which of a requeued job's former ``hosts`` PBS lost: down, offline or unknown to
    ``pbsnodes`` (host -> when it changed state, epoch s); when pbsnodes cannot tell,
    those it does not run on now (``now_on``)."""
    try:
        argv = ["pbsnodes", "-a", "-F", "json"]
        result = run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT,
                     start_new_session=True)  # fmt: skip
        nodes = parse_nodes(result.stdout)
    except (OSError, subprocess.TimeoutExpired, QueryError):
        nodes = {}
    lost = {}
    for host in hosts:
        node = nodes.get(host) or nodes.get(host.split(".", 1)[0]) or {}
        state = str(node.get("state", ""))
        if any(word in state for word in ("down", "offline", "unknown")):
            changed = node.get("last_state_change_time")
            lost[host] = float(changed) if isinstance(changed, (int, float)) else None
    if not lost and not nodes:
        lost = {host: None for host in hosts if host not in now_on}
    return lost


def note_requeue(settings, job_id, job, answer, t, warn=lambda message: None, run=subprocess.run):
    """PBS started ``job_id`` again (its run count grew): it requeued it after losing a
    node of it (server attribute node_fail_requeue). Its ranks go on in the same job, on
    nodes PBS gave afresh (pbs/node.py runs only the ranks not yet whole); the lost
    node, when, and the node-hours of the run it ended go to faults.tsv and the user."""
    before = list(job.get("hosts") or [])
    lost = lost_hosts(before, set(answer.hosts), run)
    started = job.get("started_at")
    hours = len(before) * max(0.0, t - started) / 3600 if started else None
    when = [v for v in lost.values() if v]
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(min(when) if when else t))
    nodes = ", ".join(lost) or "(not known)"
    cost = f"; the run it ended cost {hours:.3f} node-hours ({len(before)} nodes)" if hours else ""
    what = (
        f"PBS requeued it (run {answer.run_count}) after losing {nodes} at {at}; it runs "
        f"again on {', '.join(answer.hosts) or 'nodes PBS gives afresh'}, only its ranks not "
        f"yet whole{cost}"
    )
    with contextlib.suppress(OSError):
        faults.append_fault(
            settings["log_dir"], job_id, job.get("name", ""), faults.NODE_LOST, list(lost),
            what, hours, now=t,
        )  # fmt: skip
    warn(f"pbs-status: job {job_id} {job.get('name', '')}: {what}")


def ranks_left(settings: Mapping, job_id: str) -> list[int]:
    """The ranks of a warm submission that PBS reports finished although they are not
    whole (and did not fail by their input): PBS can end a job whose node was lost with
    Exit_status 0. Empty for per-rank engines."""
    if not settings.get("warm_engines"):
        return []
    info = submission_ranks(settings, [job_id]).get(job_id)
    return rank_states(info["ranks"], settings)[2] if info else []
