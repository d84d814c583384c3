"""Continuing a submission that PBS ended (config pbs.resubmit).

A walltime kill, a qdel from outside or a node failure ends a submission with ranks
still unfinished. Snakemake's own retries (``--retries``) would resubmit the whole
group job, also for a rank that failed by its input, and rerun finished ranks. Here
the status command, which sees why PBS ended the job, submits a continuation of only
its unfinished ranks (`submission.Continuation`) and reports the first job as running
until the continuation ends: Snakemake sees one job that succeeds or fails.

- Finished ranks are left alone: their answers (``<rank>.out`` or ``<rank>.jsonl``)
  are whole by their record's digest (`layout.rank_is_whole`).
- Ranks that failed by their input (their failure note, scripts/formats/failure_note.py) are not
  run again; the submission fails in the end, naming them.
- The walltime covers what is left: the engines' start, then the left ranks per
  engine at the pace the ranks were served at (at least warm.rank_minutes each).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from formats import failure_note, faults
from formats import record as rank_record
from rank import layout as rank_files

from .parse import FAILED, SUCCESS
from .plan import jobs_per_node, submission_nodes, walltime_minutes
from .settings import LOG_DIR
from .state import StateStore, submission_ranks, submitting
from .submission import Continuation, SubmitError, submit


def rank_states(ranks: Iterable[int], settings: Mapping) -> tuple[list, list, list]:
    """(done, failed by their input, left) among ``ranks``. Done: its answers, a
    prompt file's ``.out`` or a JSONL file's ``.jsonl``, are what its record says (a
    file torn by a node's crash is not done)."""
    results = Path(settings.get("results_dir") or "results")
    notes = Path(settings.get("failed_dir") or failure_note.NOTES_DIR)
    done, bad, left = [], [], []
    for rank in ranks:
        if rank_files.rank_is_whole(results, str(rank)):
            done.append(rank)
            continue
        bad_input = failure_note.cause(notes, rank) == failure_note.INPUT_FAULT
        (bad if bad_input else left).append(rank)
    return done, bad, left


def seconds_per_rank(done: Iterable[int], settings: Mapping, engines: int) -> float | None:
    """Seconds one engine took per rank in the ended submission: its serving time
    (first request's start to last record) x engines / ranks done; None if none."""
    results = Path(settings.get("results_dir") or "results")
    first = last = None
    count = 0
    for rank in done:
        record = rank_record.load(rank_record.record_file(results, rank))
        try:
            written = float(record["written_at"])
            began = rank_record.began(record)
        except (ValueError, KeyError, TypeError):
            continue
        first = began if first is None else min(first, began)
        last = written if last is None else max(last, written)
        count += 1
    if not count or first is None:
        return None
    return max(1.0, last - first) * max(1, engines) / count


def continuation_minutes(settings: Mapping, left: int, nodes: int, per_rank_s: float | None) -> int:
    """Walltime of a continuation of ``left`` ranks on ``nodes`` nodes.

    Warm engines: their start, then the ranks of the busiest engine at the pace seen
    (at least warm.rank_minutes each); when no rank had finished, the start allowance
    is doubled (the engines' start is what did not fit). Per-rank engines: as before.
    """
    if not settings["warm_engines"]:
        return walltime_minutes(settings["runtime_minutes"], settings)
    engines = max(1, nodes * jobs_per_node(settings))
    start = settings["start_minutes"]
    per_rank = float(settings["rank_minutes"])
    if per_rank_s is None:
        start *= 2
    else:
        per_rank = max(per_rank, per_rank_s / 60)
    work = start + math.ceil(math.ceil(left / engines) * per_rank)
    return walltime_minutes(work, settings)


def continuation_name(name: str, attempt: int) -> str:
    """``r0-479.c1``: the first submission's name and the continuation's number
    (PBS job names are kept to 15 characters)."""
    base = name.split(".c", 1)[0]
    suffix = f".c{attempt}"
    return base[: 15 - len(suffix)] + suffix


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def continue_submission(
    job_id: str,
    settings: Mapping,
    *,
    warn: Callable[[str], None] = _say,
    submit_fn=submit,
) -> str | None:
    """Continue the job ``job_id`` that PBS ended; returns the continuation's id, or
    None when nothing is left to run (the job then reads success or failed)."""
    store = StateStore(settings["state_dir"])
    job = dict(store.read()["jobs"][job_id])
    name, attempt = job["name"], int(job.get("attempt", 0)) + 1
    info = submission_ranks(settings, [job_id]).get(job_id)
    ranks = info["ranks"] if info else []
    done, bad, left = rank_states(ranks, settings)
    bad = sorted(set(bad) | set(job.get("left_out") or ()))
    why = f"submission {name} (job {job_id}) was ended by PBS: {job['detail']}"
    if not left or not ranks:
        state, detail = _without_continuation(why, ranks, bad)
        _record(store, job_id, state=state, detail=detail)
        warn(f"pbs-status: {detail}")
        return None
    engines = info["engines"] if info else 0
    per_rank_s = seconds_per_rank(done, settings, engines)
    nodes = submission_nodes(len(left), settings)
    more = Continuation(
        name=continuation_name(name, attempt),
        ranks=tuple(left),
        attempt=attempt,
        minutes=continuation_minutes(settings, len(left), nodes, per_rank_s),
        source=job.get("source") or str(Path(settings["log_dir"], f"{name}.job.sh")),
        left_out=tuple(bad),
    )
    try:
        with submitting(settings):  # the watchdog waits for it
            if not store.read()["jobs"][job_id].get("continuing"):
                return None  # cancelled meanwhile (Ctrl-C: pbs-cancel)
            new_id = submit_fn(more.source, settings, continuation=more)
    except (SubmitError, OSError, ValueError) as error:
        detail = f"{why}; its continuation could not be submitted: {error}"
        _record(store, job_id, state=FAILED, detail=detail)
        warn(f"pbs-status: {detail}; PBS log: {LOG_DIR}/{name}.log")
        return None
    # The job itself has ended; its id now stands for the continuation (status.current_job).
    _record(store, job_id, continued_by=new_id, state=FAILED)
    cut_off = "ranks cut off by the infrastructure" in job["detail"]
    with contextlib.suppress(OSError):  # for the run summary
        faults.append_fault(
            settings["log_dir"], job_id, name, faults.CUT_OFF if cut_off else faults.ENDED_BY_PBS,
            job.get("hosts") or [], f"{job['detail']}; {len(left)} rank(s) continued in "
            f"{more.name} (job {new_id})",
        )  # fmt: skip
    pace = f", {per_rank_s:.0f} s per rank and engine so far" if per_rank_s else ""
    lines = [
        f"pbs-status: {why}; {len(done)} of its {len(ranks)} rank(s) are done and kept, "
        f"the {len(left)} unfinished go on in {more.name} (job {new_id}, continuation "
        f"{attempt} of pbs.resubmit {settings.get('resubmit', 0)}, walltime "
        f"{more.minutes // 60:02d}:{more.minutes % 60:02d}:00{pace})"
    ]
    if bad:
        lines.append(f"pbs-status: not run again, their input is at fault: {_ranks_logs(bad)}")
    warn("\n".join(lines))
    return new_id


def _without_continuation(why: str, ranks: list, bad: list) -> tuple[str, str]:
    if not ranks:
        return FAILED, f"{why}; its ranks are unknown (logs/pbs/submissions.tsv), not continued"
    if bad:
        return FAILED, (
            f"{why}; its other ranks are done; failed by their input (not run again): "
            f"{_ranks_logs(bad)}"
        )
    return SUCCESS, f"{why}, after all its {len(ranks)} rank(s) were done"


def _ranks_logs(ranks: Iterable[int]) -> str:
    ranks = sorted(ranks)
    shown = ", ".join(f"rank {r} (logs/infer/{r}.log)" for r in ranks[:5])
    return shown + (f" and {len(ranks) - 5} more" if len(ranks) > 5 else "")


def _record(store: StateStore, job_id: str, **changes) -> None:
    with store.locked() as state:
        job = state["jobs"][job_id]
        job.update(changes, continuing=False)
