"""The node Snakemakes of a warm submission: ONE launcher call (config node_launcher)
runs `ranks-node` on every node; each node's Snakemake runs its share of the
submission's ranks as threads, against that node's engines only, on CPUs no engine
is bound to. The job script runs `python scripts/pbs/node.py ranks SPEC NODES`.

Nothing outlives its submission: each node's Snakemake runs under a watchdog
(engine/watchdog.py) in a session of its own, and its owner (`ranks-node`) ends with
its launcher or its job (watchdog.end_with_job), as the engines' supervisors do.

A node's Snakemake that is killed (SIGKILL, an OOM kill: `died`) is not its ranks'
fault. While the node's engines live, `ranks-node` starts a new one for
the node's unfinished ranks (at most config warm.node_restarts times); otherwise it
reports the node's ranks as cut off by the infrastructure, and `ranks` notes it in the
job's registry (formats/node_report.py): the PBS provider then continues the
submission (pbs.resubmit) as it does one that PBS ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: scripts/, not this file's folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import console
from engine import client, lifecycle
from engine.supervisor import SPEC_VARIABLE, forward_signals, job_hosts
from engine.watchdog import end_with_job, job_gone
from formats import engine_spec, failure_note, faults, node_report
from formats.files import safe_name
from formats.registry import LAUNCHER_EXIT, READY, UP, read_registry, registry_dir
from placement import launcher, tiles
from rank import layout as rank_files

WATCHDOG = Path(lifecycle.__file__).with_name("watchdog.py")
# Seconds a node's Snakemake has to end its ranks after a SIGTERM, before SIGKILL.
STOP_GRACE_S = 20.0
# New Snakemakes for a node whose Snakemake died (config warm.node_restarts).
NODE_RESTARTS = 2


def _log(message: str) -> None:
    console.say(f"engines: {message}")


def cpu_numbers(lists: Sequence[str]) -> set[int]:
    """CPU numbers of config tiles.cpu_bind lists ("1-8", "53-60,61")."""
    found = set()
    for text in lists:
        for part in str(text).split(","):
            first, _, last = part.strip().partition("-")
            if first.isdigit():
                found.update(range(int(first), int(last or first) + 1))
    return found


def cpu_list_text(cpus: set[int]) -> str:
    """ "0,52-60" for {0, 52, ..., 60}."""
    parts, run = [], []
    for cpu in sorted(cpus):
        if run and cpu != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(cpu)
    if run:
        parts.append(run)
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in parts)


def node_share(nodes: Mapping, index: int, count: int) -> list[int]:
    """The ranks of the node at ``index`` of ``count`` (share i goes to node i mod count:
    PBS gave fewer nodes than planned only if the plan was wrong, and no rank is lost)."""
    shares = nodes["shares"]
    return sorted(r for i, share in enumerate(shares) if i % count == index for r in share)


def died(code: int) -> bool:
    """Whether a node's Snakemake was killed (SIGKILL, an OOM kill) rather than ended by
    itself: its watchdog exits with 256 - N for a signal N (a negative status of its own
    when it was killed itself)."""
    return code < 0 or code > 128


def ranks(spec_path: str, nodes_path: str, environ=os.environ) -> int:
    """The job's ranks: ONE launcher call (config node_launcher) runs ``ranks-node`` on
    every node; fails unless every node with ranks reported success."""
    spec_path, nodes_path = os.path.abspath(spec_path), os.path.abspath(nodes_path)
    spec = engine_spec.read_spec(spec_path)
    nodes = json.loads(Path(nodes_path).read_text())
    job_id, hosts = job_hosts(environ)
    registry = registry_dir(spec, job_id)
    done = node_report.reports_dir(registry)
    done.mkdir(parents=True, exist_ok=True)
    for old in done.glob("*.exit"):
        old.unlink()
    runs = node_report.add_run(registry, hosts)
    if len(runs) > 1:
        # PBS requeued the job (a node of it was lost): it runs again from its start.
        before = runs[-2]
        _log(
            f"ranks: this job runs again (start {len(runs)}; PBS requeued it): it ran on "
            f"{', '.join(before['hosts'])} from {time.ctime(before['time'])}; its nodes now: "
            f"{', '.join(hosts)}; only the ranks not yet whole run"
        )
    command = [spec["python"], os.path.abspath(__file__), "ranks-node", spec_path, nodes_path]
    command += [job_id, ",".join(hosts)]
    if nodes["node_launcher"]:
        start = launcher.node_launcher_argv(nodes["node_launcher"], len(hosts))
    elif len(hosts) == 1:
        start = []  # the job's own node is its only one
    else:
        raise SystemExit(
            f"ranks: config key node_launcher is empty but the job has {len(hosts)} nodes: "
            "each node's ranks run on that node, started by one launcher call"
        )
    argv = start + command
    _log(f"ranks: launcher call for {len(hosts)} node Snakemake(s): {json.dumps(argv)}")
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    except OSError as error:
        _log(f"ranks: cannot run the launcher (config key node_launcher): {error}")
        return 1
    forward_signals(process)
    code = process.wait()
    failed, cut_off = [], {}
    for index, host in enumerate(hosts):
        if not node_share(nodes, index, len(hosts)):
            continue
        status = node_report.read_exit(registry, host)
        if status is None:
            # Its owner never ended its Snakemake: the node, or that process, is gone.
            status = f"no report ({node_report.INFRASTRUCTURE}: the node or its owner is gone)"
        if status != "0":
            failed.append(f"{host}: {status}")
        if node_report.INFRASTRUCTURE in status:
            cut_off[host] = status
    if failed:
        _log(f"ranks: launcher exited with status {code}; node Snakemakes failed: {failed}")
        if cut_off and not job_gone(environ):
            # The provider continues the submission's unfinished ranks (pbs.resubmit).
            node_report.write_note(registry, cut_off)
            _log(f"ranks: cut off by the infrastructure, not by their ranks: {sorted(cut_off)}")
        return 1
    _log(f"ranks: every node's Snakemake succeeded (launcher status {code})")
    return 0


def unfinished(share: Sequence[int], nodes: Mapping) -> tuple[list[int], list[int]]:
    """(ranks of ``share`` not whole and not failed by their input, ranks failed by their
    input). Without the run's folders in the nodes file (older submissions): (share, [])."""
    results, notes = nodes.get("results_dir"), nodes.get("failed_dir")
    if not results or not notes:
        return list(share), []
    left, bad = [], []
    for rank in share:
        if rank_files.rank_is_whole(results, str(rank)):
            continue
        if failure_note.cause(notes, rank) == failure_note.INPUT_FAULT:
            bad.append(rank)
        else:
            left.append(rank)
    return left, bad


def engines_alive(spec: Mapping, job_id: str, host: str) -> bool:
    """Whether an engine of ``host`` may still serve ranks: its launcher runs, and one of
    its registry entries is starting or restarting, or ready and answering /health."""
    registry = registry_dir(spec, job_id)
    if (registry / LAUNCHER_EXIT).exists():
        return False
    prefix = f"{safe_name(host)}-tile"
    for name, entry in read_registry(registry).items():
        if not name.startswith(prefix) or entry.get("state") not in UP:  # it may still serve ranks
            continue
        if entry["state"] != READY or client.health(entry.get("url", ""), timeout=5.0):
            return True
    return False


def ranks_node(
    spec_path: str, nodes_path: str, job_id: str, hosts: Sequence[str], environ=os.environ
) -> int:
    """This node's Snakemake: its share of the job's ranks, as threads, against this
    node's engines only, on CPUs no engine is bound to (config tiles.cpu_bind)."""
    spec = engine_spec.read_spec(spec_path)
    nodes = json.loads(Path(nodes_path).read_text())
    host = tiles.this_host(hosts, environ)
    share = node_share(nodes, hosts.index(host), len(hosts))
    registry = registry_dir(spec, job_id)
    if not share:
        _log(f"ranks: {host}: no ranks")
        node_report.write_exit(registry, host, 0)
        return 0
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
    free = cpus - cpu_numbers(spec["tiles"]["cpu_bind"])
    pin = None
    if free and free != cpus:
        # In the child before it runs: every thread of its Snakemake stays off the
        # engines' cores.
        def pin():
            os.sched_setaffinity(0, free)

    rules = nodes.get("rules", {})  # infer_jsonl for a .jsonl rank
    env = {**environ, SPEC_VARIABLE: spec_path, lifecycle.NODE_VARIABLE: host, "PBS_JOBID": job_id}
    on = f"CPUs {cpu_list_text(free)}" if pin else "all its CPUs"
    _log(f"ranks: {host}: {len(share)} rank(s) in one Snakemake on {on}")
    job_environ = {**environ, "PBS_JOBID": job_id}
    end_with_job(job_environ)
    stopping: list[int] = []  # a signal to this process: the job or its launcher ends
    restarts = int(spec.get("node_restarts", NODE_RESTARTS))
    targets, deaths = share, 0
    if len(node_report.read_runs(registry)) > 1:
        # The job runs again (PBS requeued it): its whole ranks are kept, not redone.
        targets, bad = unfinished(share, nodes)
        _log(f"ranks: {host}: the job runs again: {len(share) - len(targets)} rank(s) kept")
        if not targets:
            code = 1 if bad else 0
            node_report.write_exit(registry, host, code)
            return code
    while True:
        argv = nodes["argv"] + [
            "--target-jobs",
            *(f"{rules.get(str(r), 'infer')}:rank={r}" for r in targets),
        ]
        code = _watched_snakemake(argv, nodes["workdir"], env, pin, stopping)
        if job_gone(job_environ):  # nothing of a job writes into the run folder after its end
            _log(f"ranks: {host}: its Snakemake ended with the job (status {code})")
            return code
        if not died(code) or stopping:
            break  # its own verdict on its ranks, or this process was told to stop
        # Killed (SIGKILL, an OOM kill): not its ranks' doing.
        deaths += 1
        left, bad = unfinished(share, nodes)
        why = f"its Snakemake died (status {code})"
        with contextlib.suppress(OSError):  # for the run summary
            log_dir = Path(nodes_path).parent
            name = Path(nodes_path).name.removesuffix(".nodes.json")
            what = f"{why}; {len(left)} of its {len(share)} rank(s) unfinished"
            faults.append_fault(log_dir, job_id, name, faults.NODE_SNAKEMAKE, [host], what)
        if not left:
            _log(f"ranks: {host}: {why} after all its ranks had ended")
            code = 1 if bad else 0
            break
        if deaths > restarts or not engines_alive(spec, job_id, host):
            cause = (
                f"{deaths} time(s), more than warm.node_restarts {restarts}"
                if deaths > restarts
                else "and its engines are gone"
            )
            _log(f"ranks: {host}: {why} {cause}; {len(left)} rank(s) left to the continuation")
            node_report.write_exit(registry, host, code, f"{why} {cause}, {len(left)} left")
            return code
        _log(
            f"ranks: {host}: {why}; a new Snakemake for its {len(left)} unfinished rank(s) "
            f"(restart {deaths} of warm.node_restarts {restarts})"
        )
        targets = left
    if code == 0 and unfinished(share, nodes)[1]:
        code = 1  # ranks that failed by their input before a restart
    node_report.write_exit(registry, host, code)
    _log(f"ranks: {host}: its Snakemake exited with status {code}")
    return code


def _watched_snakemake(argv, workdir, env, pin, stopping: list[int]) -> int:
    """One node Snakemake in a session of its own under a watchdog that ends it and its
    ranks (SIGTERM, then SIGKILL after the grace) when asked, or when this process goes
    (its pipe closes); SIGTERM, SIGINT and SIGHUP of this process go on to it and are
    noted in ``stopping``."""
    watched = [sys.executable, "-I", str(WATCHDOG), "watch", "--grace", str(STOP_GRACE_S)]
    process = subprocess.Popen(
        [*watched, "--", *argv],
        cwd=workdir,
        env=env,
        stdin=subprocess.PIPE,  # the lifeline: EOF tells the watchdog we are gone
        preexec_fn=pin,
        start_new_session=True,
    )

    def forward(signum, _frame):
        stopping.append(signum)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    if stopping:  # told before this Snakemake started
        forward(stopping[-1], None)
    code = process.wait()
    with contextlib.suppress(OSError):
        process.stdin.close()
    # A watchdog that was killed itself left its session behind: none of it may run on
    # beside a new Snakemake, nor outlive the job.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    return code


USAGE = "usage: node.py ranks SPEC NODES | ranks-node SPEC NODES JOB_ID HOST,HOST,..."


def main(argv: Sequence[str]) -> int:
    if len(argv) == 3 and argv[0] == "ranks":
        return ranks(argv[1], argv[2])
    if len(argv) == 5 and argv[0] == "ranks-node":
        return ranks_node(argv[1], argv[2], argv[3], argv[4].split(","))
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
