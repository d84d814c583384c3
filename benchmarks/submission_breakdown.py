"""Benchmark: where one short submission's time goes, per node (issue 36, item 4).

One ``profiles/aurora`` run on the OpenPBS test cluster (tests/pbs_cluster.py): ONE
submission of 2 hosts, warm engines (one a node), a few dozen short prompt ranks. Two
variants: real vLLM on models/tiny-opt (profiles/local's CPU engine settings), and echo
engines (scripts/engine/echo_server.py: no model), which separates the workflow's own
start from vLLM's.

Every time is in seconds from the submission's ``qsub`` (when it returned: the PBS
provider's ``submitted`` in .snakemake/pbs/status.json, pbs/state.py):

* the login side: ``snakemake`` starts, rule fetch_model (Snakemake's job metadata),
  ``qsub``; after the job, rule summary and the command's exit;
* the job, the same for every node: PBS starts it (``stime``, whole seconds), the job
  script's phases (reporting/accounting.py: start, site set-up done, staging and
  preflight done on every node, ranks done, end), the ranks step's start (the node
  Snakemakes' launcher call, formats/node_report.py);
* per node: its engines started and ready (formats/registry.py entries), its first
  rank's requests sent and its last rank written (formats/record.py records), its
  preflight and model copy (the line scripts/model/stage.py prints), and where its
  node-seconds went: accounting.account's parts (set-up, engine start,
  serving, idle, stop) for that node alone (they add up to the submission's).

No goal: the figures say what a short submission pays in node-hours before it serves.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import yaml

from common import REPO, bench_prompts, job_window, log, markdown_table

NAME = "submission_breakdown"
NODES = 2
PROMPTS_PER_RANK = 4
MAX_TOKENS = 16
# profiles/local's CPU engine settings (vllm.*, task_env) for the real vLLM engines
LOCAL = yaml.safe_load((REPO / "profiles" / "local" / "local.yaml").read_text())
VARIANTS = {
    "vllm": {"engine": "vllm", "vllm": LOCAL["vllm"], "task_env": LOCAL["task_env"]},
    "echo": {"engine": "echo"},
}
VARIANT_NAMES = {"vllm": "vLLM, models/tiny-opt", "echo": "echo engines"}

# (kind, key, text): what happened, in the order it happens. "login" events are the run's,
# "job" ones the same for every node, "node" ones each node's own.
EVENTS = (
    ("login", "snakemake_start", "login: `snakemake` starts"),
    ("login", "fetch_model_start", "login: rule fetch_model starts"),
    ("login", "fetch_model_end", "login: rule fetch_model ends"),
    ("login", "qsub", "login: `qsub` returns (the zero)"),
    ("job", "pbs_start", "PBS starts the job (`stime`, whole seconds)"),
    ("job", "start", "the job script starts"),
    ("job", "setup", "site set-up done"),
    ("job", "staged", "staging and preflight done on every node"),
    ("job", "ranks_step", "the node Snakemakes are launched"),
    ("node", "engine_started", "the node's engine(s) start"),
    ("node", "engine_ready", "the node's engine(s) ready (the last)"),
    ("node", "first_rank_sent", "the node's first rank's requests sent"),
    ("node", "last_rank_written", "the node's last rank written"),
    ("job", "ranks_done", "ranks done (every node)"),
    ("job", "end", "the job ends (engines stopped, copies removed)"),
    ("login", "summary_start", "login: rule summary starts"),
    ("login", "summary_end", "login: rule summary ends"),
    ("login", "exit", "login: `snakemake` exits"),
)


# ----------------------------------------------------------------------------- reading


def node_breakdown(
    results: Path, pbs_logs: Path, engine_logs: Path, zero: float | None = None
) -> dict:
    """The run's one PBS submission: its job-wide events and, per node (PBS_NODEFILE
    order: the first runs the job script), its own events and node-seconds parts, in
    seconds from ``zero`` (default: the job script's start).

    Read through their owners: the records (formats/record.py), the submission with its
    phases, engines and parts (reporting/accounting.py), the ranks step's start
    (formats/node_report.py); the phase "setup", which accounting does not keep, from
    its phases file; each node's preflight and copy from the job's log
    (`stage_seconds`)."""
    from formats import node_report
    from formats import record as rank_record
    from formats.registry import job_registry
    from reporting import accounting

    records = rank_record.read_records(rank_record.records_dir(results).glob("*.json"))
    (sub,) = [s for s in accounting.submissions(records, pbs_logs, engine_logs)
              if s.id != accounting.LOCAL]  # fmt: skip
    zero = sub.start if zero is None else zero
    phases = json.loads(accounting.phases_path(pbs_logs, sub.id).read_text())["phases"]
    runs = node_report.read_runs(job_registry(engine_logs, sub.id))
    staging = stage_seconds(Path(pbs_logs) / f"{sub.name}.log")
    job = {
        "start": sub.start,
        "setup": phases.get("setup"),
        "staged": sub.staged,
        "ranks_step": runs[0]["time"] if runs else None,
        "ranks_done": sub.ranks_done,
        "end": sub.end,
    }
    nodes = {}
    for host in sub.hosts:
        slots = [s for s in sub.slots if s.host == host]
        mine = [r for s in slots for r in s.records]
        parts = accounting.account(slots, [host], sub.start, sub.staged, sub.ranks_done, sub.end)
        started = [s.started_at for s in slots if s.started_at is not None]
        ready = [s.ready_at for s in slots if s.ready_at is not None]
        events = {
            "engine_started": min(started, default=None),
            "engine_ready": max(ready, default=None),
            "first_rank_sent": min((rank_record.began(r) for r in mine), default=None),
            "last_rank_written": max((r[rank_record.END_KEY] for r in mine), default=None),
        }
        nodes[host] = {
            "events": since(events, zero),
            "engines": {
                s.name: since({"started": s.started_at, "ready": s.ready_at}, zero) for s in slots
            },
            "ranks": len(mine),
            "requests": sum(int(r["prompts"]) for r in mine),
            "stage_s": staging.get(host),
            "node_s": sub.end - sub.start,
            "parts_s": parts,
        }
    return {
        "submission": sub.id,
        "name": sub.name,
        "walltime": sub.walltime,
        "estimated": sub.estimated,
        "zero": zero,
        "job": since(job, zero),
        "nodes": nodes,
        "parts_s": dict(sub.parts),
        "node_s": sub.used_s,
    }


# scripts/model/stage.py's line when a node has checked itself and has its copy
STAGED_LINE = re.compile(r"^stage_model: (\S+): [0-9.]+ MiB to .* in ([0-9.]+) s \(", re.M)


def stage_seconds(job_log: Path) -> dict[str, float]:
    """Host -> seconds its preflight checks and model copy took, from the job's log
    (the line stage.py prints for people; no module reads it); {} without one."""
    try:
        text = job_log.read_text(errors="replace")
    except OSError:
        return {}
    return {host: float(seconds) for host, seconds in STAGED_LINE.findall(text)}


def since(times: Mapping[str, float | None], zero: float) -> dict:
    return {name: None if at is None else at - zero for name, at in times.items()}


def login_events(work: Path, job_id: str, started: float, ended: float) -> dict:
    """The run's login side (epoch seconds): ``snakemake``'s start and exit, rule
    fetch_model (none with echo engines) and rule summary (Snakemake's job metadata),
    and the submission's ``qsub`` (the PBS provider's record of it, pbs/state.py)."""
    from pbs.state import StateStore

    markers = list((work / "results" / "model").glob("*.json"))  # none: echo engines
    fetch = (None, None)
    if markers:
        (marker,) = markers
        fetch = job_window(work, str(marker.relative_to(work))) or fetch
    summary = job_window(work, "results/summary.tsv") or (None, None)
    jobs = StateStore(work / ".snakemake" / "pbs").read()["jobs"]
    return {
        "snakemake_start": started,
        "fetch_model_start": fetch[0],
        "fetch_model_end": fetch[1],
        "qsub": jobs[job_id]["submitted"],
        "summary_start": summary[0],
        "summary_end": summary[1],
        "exit": ended,
    }


# ----------------------------------------------------------------------------- rows


def _at(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def event_rows(runs: Mapping[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the events table: one column per node of each run (``runs``:
    label -> `node_breakdown` with ``login`` and ``pbs_start`` added, from ``qsub``)."""
    columns = [(label, host) for label, run in runs.items() for host in run["nodes"]]
    header = ["event, s from `qsub`"]
    for label, host in columns:
        head = host == next(iter(runs[label]["nodes"]))
        header.append(f"{label}: {host}{' (head)' if head else ''}")
    rows = []
    for kind, key, text in EVENTS:
        row = [text]
        for label, host in columns:
            run = runs[label]
            if kind == "login":
                value = run["login"].get(key)
            elif kind == "job":
                value = run["pbs_start"] if key == "pbs_start" else run["job"].get(key)
            else:
                value = run["nodes"][host]["events"].get(key)
            row.append(_at(value))
        rows.append(row)
    return header, rows


def part_rows(runs: Mapping[str, dict]) -> list[list[str]]:
    """Each node's seconds and their parts (accounting.PARTS) as shares, in the events
    table's columns; then the start a node pays: its job start to its engines ready."""
    from reporting import accounting

    columns = [(label, host) for label, run in runs.items() for host in run["nodes"]]
    used = [f"{runs[label]['nodes'][host]['node_s']:.1f}" for label, host in columns]
    rows = [["node-seconds used (job start to end)", *used]]
    staging = [runs[label]["nodes"][host].get("stage_s") for label, host in columns]
    rows.append(["the node's preflight and model copy (its `stage_model` line), s",
                 *(_at(x) for x in staging)])  # fmt: skip
    for part in accounting.PARTS:
        row = [f"{accounting.PART_NAMES[part]}, node-s (share)"]
        for label, host in columns:
            node = runs[label]["nodes"][host]
            seconds, used = node["parts_s"][part], node["node_s"]
            row.append(f"{seconds:.1f} ({100 * seconds / used:.0f} %)" if used else "-")
        rows.append(row)
    row = ["start paid: job start to the node's engines ready, s (share)"]
    for label, host in columns:
        node = runs[label]["nodes"][host]
        ready = node["events"]["engine_ready"]
        paid = None if ready is None else ready - runs[label]["job"]["start"]
        row.append("-" if paid is None else f"{paid:.1f} ({100 * paid / node['node_s']:.0f} %)")
    rows.append(row)
    served = [runs[label]["nodes"][host] for label, host in columns]
    rows.append(["ranks (requests) served", *(f"{n['ranks']} ({n['requests']})" for n in served)])
    return rows


# ----------------------------------------------------------------------------- runs


def rank_files(count: int) -> dict[str, str]:
    prompts = bench_prompts(count * PROMPTS_PER_RANK)
    return {
        f"{rank}.in": "".join(
            p + "\n" for p in prompts[rank * PROMPTS_PER_RANK : (rank + 1) * PROMPTS_PER_RANK]
        )
        for rank in range(count)
    }


def one(cluster, folder: Path, variant: str, ranks: int) -> dict:
    """One run of ``variant``: ONE submission of NODES hosts, one engine a host."""
    from pbs.parse import pbs_time
    from pbs_runs import delete_our_jobs, output_of, run_aurora, submissions, warm_folder

    work = warm_folder(
        folder,
        rank_files(ranks),
        **VARIANTS[variant],
        tiles={"per_node": 1},
        pbs={"nodes_per_submission": NODES},
        # every rank in the one submission; vLLM may start slowly on 2 shared cores
        warm={"ranks_per_engine": -(-ranks // NODES), "ready_timeout_s": 600},
        sampling={"max_tokens": MAX_TOKENS, "ignore_eos": True},
        weights={"stage_dir": str(folder / "node-local")},
    )
    started = time.time()
    try:
        run = run_aurora(cluster, work)
        ended = time.time()
        if run.returncode != 0:
            raise RuntimeError(f"the {variant} run failed:\n{output_of(run)[-5000:]}")
        (submission,) = submissions(work)
        job = cluster.job(submission["id"]) or {}
    finally:
        delete_our_jobs(cluster, work)
    login = login_events(work, submission["id"], started, ended)
    qsub = login["qsub"]
    logs = work / "logs"
    result = node_breakdown(work / "results", logs / "pbs", logs / "engines", zero=qsub)
    result["login"] = since(login, qsub)
    stime = pbs_time(job.get("stime"))
    result["pbs_start"] = None if stime is None else stime - qsub
    return result


def run(quick: bool = False, repeats: int = 1, shared: dict | None = None) -> dict:
    from pbs_cluster import PbsCluster

    ranks = 4 if quick else 24
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-submission-") as tmp, PbsCluster() as cluster:
        for repeat in range(repeats):
            for variant in VARIANTS:
                log(f"{NAME}: {variant}, {ranks} ranks on {NODES} hosts, run {repeat + 1}")
                folder = Path(tmp) / f"{variant}-{repeat}"
                folder.mkdir()
                runs[variant].append(one(cluster, folder, variant, ranks))
    # the run of median node-seconds of each variant: a real run, its parts whole
    median = {name: sorted(done, key=lambda r: r["node_s"])[len(done) // 2]
              for name, done in runs.items()}  # fmt: skip
    shown = {VARIANT_NAMES[name]: r for name, r in median.items()}
    header, rows = event_rows(shown)
    rows += part_rows(shown)
    notes = [
        "Per node: its engine and ranks; the job's phases (set-up, staged, ranks done, end) "
        "are the job script's, on the head node, and the same for every node. Parts: "
        "reporting/accounting.py's, per node (they add up to the submission's). `qsub` "
        "returns after PBS has started the job at times: PBS's `stime` (whole seconds, "
        "floored) may read before it. With --repeats > 1, the run of median node-seconds "
        "of each variant; all in the JSON."
    ]
    return {
        "name": NAME,
        "title": (
            f"Where one short submission's time goes, per node: {ranks} prompt ranks of "
            f"{PROMPTS_PER_RANK} x {MAX_TOKENS} tokens, ONE submission of {NODES} hosts, one "
            "warm engine a host, profiles/aurora on the OpenPBS test cluster"
        ),
        "table": markdown_table(header, rows),
        "notes": notes,
        "runs": runs,
        # no goal: run_all's goals table lists only figures with one
        "summary": {name: summary_of(r) for name, r in median.items()},
    }


def summary_of(run: Mapping) -> dict:
    """A run's headline figures: its node-seconds, the share its set-up and engine start
    took of them, when its last engine was ready, and the login side's seconds before
    ``qsub`` and after the job's end."""
    parts = run["parts_s"]
    ready = [node["events"]["engine_ready"] for node in run["nodes"].values()]
    return {
        "node_s": run["node_s"],
        "start_share": (parts["setup"] + parts["engine_start"]) / run["node_s"],
        "last_engine_ready_s": max((x for x in ready if x is not None), default=None),
        "login_before_qsub_s": -run["login"]["snakemake_start"],
        "login_after_job_s": run["login"]["exit"] - run["job"]["end"],
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
