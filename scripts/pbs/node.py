"""The node Snakemakes of a warm submission: ONE launcher call (config node_launcher)
runs `ranks-node` on every node; each node's Snakemake runs its share of the
submission's ranks as threads, against that node's engines only, on CPUs no engine
is bound to. The job script runs `python scripts/pbs/node.py ranks SPEC NODES`.

Nothing outlives its submission: each node's Snakemake runs under a watchdog
(engine/watchdog.py) in a session of its own, and its owner (`ranks-node`) ends with
its launcher or its job (watchdog.end_with_job), as the engines' supervisors do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: scripts/, not this file's folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from engine import lifecycle
from engine.supervisor import SPEC_VARIABLE, forward_signals, job_hosts
from engine.watchdog import end_with_job, job_gone
from formats.files import safe_name, write_atomic
from formats.registry import registry_dir
from placement import launcher, tiles
from reporting import console

WATCHDOG = Path(lifecycle.__file__).with_name("watchdog.py")
# Seconds a node's Snakemake has to end its ranks after a SIGTERM, before SIGKILL.
STOP_GRACE_S = 20.0


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


def ranks_dir(spec: Mapping, job_id: str) -> Path:
    """Where each node's Snakemake leaves its exit status (``<host>.exit``)."""
    return registry_dir(spec, job_id) / "ranks"


def ranks(spec_path: str, nodes_path: str, environ=os.environ) -> int:
    """The job's ranks: ONE launcher call (config node_launcher) runs ``ranks-node`` on
    every node; fails unless every node with ranks reported success."""
    spec_path, nodes_path = os.path.abspath(spec_path), os.path.abspath(nodes_path)
    spec = json.loads(Path(spec_path).read_text())
    nodes = json.loads(Path(nodes_path).read_text())
    job_id, hosts = job_hosts(environ)
    done = ranks_dir(spec, job_id)
    done.mkdir(parents=True, exist_ok=True)
    for old in done.glob("*.exit"):
        old.unlink()
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
    failed = []
    for index, host in enumerate(hosts):
        if not node_share(nodes, index, len(hosts)):
            continue
        try:
            status = (done / f"{safe_name(host)}.exit").read_text().strip()
        except OSError:
            status = "no report (its Snakemake never ended)"
        if status != "0":
            failed.append(f"{host}: {status}")
    if failed:
        _log(f"ranks: launcher exited with status {code}; node Snakemakes failed: {failed}")
        return 1
    _log(f"ranks: every node's Snakemake succeeded (launcher status {code})")
    return 0


def ranks_node(
    spec_path: str, nodes_path: str, job_id: str, hosts: Sequence[str], environ=os.environ
) -> int:
    """This node's Snakemake: its share of the job's ranks, as threads, against this
    node's engines only, on CPUs no engine is bound to (config tiles.cpu_bind)."""
    spec = json.loads(Path(spec_path).read_text())
    nodes = json.loads(Path(nodes_path).read_text())
    host = tiles.this_host(hosts, environ)
    share = node_share(nodes, hosts.index(host), len(hosts))
    report = ranks_dir(spec, job_id) / f"{safe_name(host)}.exit"
    if not share:
        _log(f"ranks: {host}: no ranks")
        write_atomic(report, "0\n")
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
    argv = nodes["argv"] + [
        "--target-jobs",
        *(f"{rules.get(str(r), 'infer')}:rank={r}" for r in share),
    ]
    env = {**environ, SPEC_VARIABLE: spec_path, lifecycle.NODE_VARIABLE: host, "PBS_JOBID": job_id}
    on = f"CPUs {cpu_list_text(free)}" if pin else "all its CPUs"
    _log(f"ranks: {host}: {len(share)} rank(s) in one Snakemake on {on}")
    # The Snakemake and its ranks in a session of their own under a watchdog that ends
    # them all (SIGTERM, then SIGKILL after the grace) when asked, or when this process
    # goes (its pipe closes); this process ends with its launcher or its job (lifeline).
    job_environ = {**environ, "PBS_JOBID": job_id}
    end_with_job(job_environ)
    watched = [sys.executable, "-I", str(WATCHDOG), "watch", "--grace", str(STOP_GRACE_S)]
    process = subprocess.Popen(
        [*watched, "--", *argv],
        cwd=nodes["workdir"],
        env=env,
        stdin=subprocess.PIPE,  # the lifeline: EOF tells the watchdog we are gone
        preexec_fn=pin,
        start_new_session=True,
    )
    forward_signals(process)
    code = process.wait()
    if job_gone(job_environ):  # nothing of a job writes into the run folder after its end
        _log(f"ranks: {host}: its Snakemake ended with the job (status {code})")
        return code
    write_atomic(report, f"{code}\n")
    _log(f"ranks: {host}: its Snakemake exited with status {code}")
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
