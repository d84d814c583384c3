"""What PBS answers, read: ``qstat -x -f -F json`` and the plain ``qstat -x -f`` text.

Both forms become {job id: attributes}; `verdict` turns one job's attributes into
running, success or failed. Formats as a real PBS server (OpenPBS 23.06) printed
them: tests/data/openpbs/.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

RUNNING, SUCCESS, FAILED = "running", "success", "failed"
FINAL = frozenset({SUCCESS, FAILED})

# Exit_status values below 0 are set by PBS itself (job.h JOB_EXEC_*).
PBS_EXIT_REASONS = {
    -25: "killed by PBS: ncpus limit exceeded",
    -27: "killed by PBS: memory limit exceeded",
    -29: "killed by PBS: walltime exceeded",
}
PBS_RUNNING_STATES = frozenset("QHWRESTUBM")
# substate 91: the job was deleted (qdel) while it ran. PBS then reports Exit_status 0.
SUBSTATE_TERMINATED = 91
# substate 93: the job failed. With Exit_status 0 (OpenPBS 23.06, 2026-12-06): its first
# mom ended it because a sister's (restarted) mom no longer knew it ("Discard running
# job, A sister Mom failed to delete job"): a node of it was lost, nothing finished.
SUBSTATE_FAILED = 93
# A job PBS could not start on its nodes again and again: held for good.
FAILED_ATTEMPTS = "too many failed attempts to run"


class QueryError(RuntimeError):
    """The scheduler could not be asked (command missing, failed, unreadable output)."""


@dataclass(frozen=True)
class Verdict:
    state: str  # running, success or failed
    detail: str  # what PBS said, for the status log and the user
    # PBS keeps the job (held for good): the provider must qdel it after failing it.
    delete: bool = False
    # A user hold: waits until released; worth a warning.
    held: bool = False
    # Failed because PBS ended it (walltime, qdel from outside, a node failure), not
    # because its script failed: its unfinished ranks may be continued (pbs.resubmit).
    ended_by_pbs: bool = False
    # Failed because the infrastructure cut ranks off (a node's Snakemake died, a node
    # never reported: pbs/node.py), continued as one PBS ended.
    infrastructure: bool = False
    # For the progress line: queued, running, held, ...; PBS's comment; when it started.
    phase: str = ""
    comment: str = ""
    started: float | None = None
    # Where it runs (exec_host, in PBS_NODEFILE order) and how often PBS started it
    # (run_count: more than once after PBS requeued it, e.g. when a node was lost).
    hosts: tuple[str, ...] = ()
    run_count: int | None = None


def parse_json(text: str) -> dict[str, dict]:
    """``qstat -x -f -F json`` -> {job id: attributes}; QueryError if it is no such JSON.

    Jobs qstat does not know are simply absent (qstat names them on stderr).
    """
    try:
        # strict=False: PBS versions have emitted raw control characters in strings.
        data = json.loads(text, strict=False)
    except ValueError as error:
        raise QueryError(f"qstat printed no valid JSON ({error}): {text[:200]!r}") from error
    if not isinstance(data, dict) or not isinstance(data.get("Jobs", {}), dict):
        raise QueryError(f"qstat JSON has no 'Jobs' mapping: {text[:200]!r}")
    return {job_id: job for job_id, job in data.get("Jobs", {}).items() if isinstance(job, dict)}


def parse_nodes(text: str) -> dict[str, dict]:
    """``pbsnodes -a -F json`` -> {host: attributes}; QueryError if it is no such JSON."""
    try:
        data = json.loads(text, strict=False)
    except ValueError as error:
        raise QueryError(f"pbsnodes printed no valid JSON ({error}): {text[:200]!r}") from error
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, dict):
        raise QueryError(f"pbsnodes JSON has no 'nodes' mapping: {text[:200]!r}")
    return {name: node for name, node in nodes.items() if isinstance(node, dict)}


_TEXT_JOB = re.compile(r"^Job Id:\s*(\S+)\s*$")
_TEXT_ATTRIBUTE = re.compile(r"^\s{4}([A-Za-z_][\w.]*) = (.*)$")


def parse_text(text: str) -> dict[str, dict]:
    """Plain ``qstat -x -f`` -> {job id: attributes} (values are strings).

    PBS wraps long values onto lines that start with a tab; they are joined back.
    """
    jobs: dict[str, dict] = {}
    job: dict | None = None
    key = None
    for line in text.splitlines():
        if match := _TEXT_JOB.match(line):
            job = jobs.setdefault(match.group(1), {})
            key = None
        elif job is not None and (match := _TEXT_ATTRIBUTE.match(line)):
            key = match.group(1)
            job[key] = match.group(2)
        elif job is not None and key is not None and line.startswith("\t"):
            job[key] += line[1:]
    return jobs


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def exit_meaning(code: int) -> str:
    if code == 0:
        return "Exit_status 0"
    if code < 0:
        return f"Exit_status {code} ({PBS_EXIT_REASONS.get(code, 'job not run or killed by PBS')})"
    if code > 256:
        return f"Exit_status {code} (killed by signal {code - 256})"
    return f"Exit_status {code}"


# What a job_state letter means, in the progress line.
PHASES = {"Q": "queued", "W": "waiting", "H": "held", "R": "running", "E": "exiting",
          "T": "moving", "S": "suspended", "U": "suspended", "B": "running",
          "M": "moving"}  # fmt: skip


def pbs_time(value) -> float | None:
    """Epoch seconds of a PBS time attribute (``Tue Dec  1 05:25:12 2026``), else None."""
    try:
        return time.mktime(time.strptime(" ".join(str(value).split()), "%a %b %d %H:%M:%S %Y"))
    except (TypeError, ValueError, OverflowError):
        return None


def ended_by_pbs(code: int | None, substate: int | None, comment: str) -> bool:
    """PBS ended the job, its script did not fail: a walltime or other limit (Exit_status
    below 0, e.g. -29; a node that failed: also below 0), a signal PBS sent (256 + N,
    e.g. 271 for SIGTERM: how PBS Pro reports some walltime kills and qdel), or qdel
    while it ran (substate 91)."""
    if substate == SUBSTATE_TERMINATED or "terminated" in comment:
        return True
    return code is not None and (code < 0 or code > 256)


def exec_hosts(value) -> tuple[str, ...]:
    """The hosts of ``exec_host`` (``node1/0+node3/0*2``), each once, in order."""
    hosts = (part.split("/")[0].strip() for part in str(value or "").split("+"))
    return tuple(dict.fromkeys(h for h in hosts if h))


def verdict(job: Mapping) -> Verdict:
    """running, success or failed for one job's attributes (JSON or text form)."""
    letter = str(job.get("job_state", "?"))
    comment = " ".join(str(job.get("comment", "")).split())
    said = f"; comment: {comment}" if comment else ""
    phase = PHASES.get(letter, f"job_state {letter}")
    seen = {
        "phase": phase,
        "comment": comment,
        "started": pbs_time(job.get("stime")),
        "hosts": exec_hosts(job.get("exec_host")),
        "run_count": _int(job.get("run_count")),
    }
    if letter in ("F", "X"):
        code, substate = _int(job.get("Exit_status")), _int(job.get("substate"))
        by_pbs = ended_by_pbs(code, substate, comment)
        if substate == SUBSTATE_TERMINATED or "terminated" in comment:
            # qdel while running: Exit_status is 0 although nothing finished.
            return Verdict(FAILED, f"deleted while running (qdel){said}", ended_by_pbs=True, **seen)
        if code == 0 and substate == SUBSTATE_FAILED:
            return Verdict(
                FAILED,
                f"ended by PBS with Exit_status 0 and substate 93 (a node of it was lost){said}",
                ended_by_pbs=True,
                **seen,
            )
        if code is None:
            # e.g. deleted before it ran
            return Verdict(FAILED, f"job_state {letter} without Exit_status{said}", **seen)
        state = SUCCESS if code == 0 else FAILED
        return Verdict(state, exit_meaning(code) + said, ended_by_pbs=by_pbs, **seen)
    if letter == "H":
        holds = str(job.get("Hold_Types", ""))
        if "s" in holds or FAILED_ATTEMPTS in comment:
            return Verdict(
                FAILED, f"held by the system (Hold_Types {holds}){said}", delete=True, **seen
            )
        return Verdict(RUNNING, f"held (Hold_Types {holds}){said}", held=True, **seen)
    detail = f"job_state {letter}"
    if letter not in PBS_RUNNING_STATES:
        detail += " (unknown state, read as running)"
    return Verdict(RUNNING, detail + said, **seen)


def match_ids(wanted: Iterable[str], found: Mapping[str, object]) -> dict:
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
