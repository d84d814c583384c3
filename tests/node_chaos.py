"""The chaos soak of issue 34 (tests/test_aurora_node_faults.py; larger: ``make soak``):
a warm profiles/aurora run on the OpenPBS test cluster while faults land at random
moments, each on a random target of its kind:

- ``engine``: SIGKILL of an echo engine (its supervisor restarts it);
- ``node_snakemake``: SIGKILL of a node's Snakemake (brought back on its node);
- ``qdel``: a running submission deleted (continued: pbs.resubmit);
- ``walltime``: a running submission's walltime cut to what it has used, plus 3 s
  (``qalter``: PBS kills it at its walltime; continued);
- ``lost_host``: the second host of a running submission dies (its pbs_mom and all under
  it SIGKILLed: PbsCluster.lose_host; PBS requeues the job onto fresh nodes), and its
  pbs_mom is started again once PBS lists the host down.

It holds when the run ends by itself (exit 0: no run needed a hand), every output is
exact, no rank whole at some moment was written again (ranks redone: 0), and no job,
engine or node Snakemake is left. `soak` returns its figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import workflow as wf
from pbs_runs import (
    ECHO_SERVER,
    aurora_in_background,
    echo_servers,
    finished_rank,
    node_list,
    node_snakemakes,
    nothing_outlives,
    our_job_ids,
    processes_running,
    submissions,
    wait_for,
    warm_folder,
)

KINDS = ("engine", "node_snakemake", "qdel", "walltime", "lost_host")


class Watcher(threading.Thread):
    """Notes each rank's finished state (finished_rank) when first seen whole, and
    which of them changed later: a rank redone."""

    def __init__(self, work: Path):
        super().__init__(daemon=True)
        self.work, self.first, self.redone = work, {}, set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.look()

    def look(self) -> None:
        for path in self.work.glob("results/*.out"):
            rank = int(path.stem)
            with contextlib.suppress(OSError, ValueError, KeyError):
                state = finished_rank(self.work, rank)
                if rank not in self.first:
                    self.first[rank] = state
                elif state[:2] != self.first[rank][:2]:  # its answers or its record's time
                    self.redone.add(rank)


def running_jobs(cluster, work: Path) -> list[dict]:
    """Our submissions PBS runs now, with their attributes."""
    found = []
    for job_id in set(our_job_ids(work)):
        job = cluster.job(job_id)
        if job and job.get("job_state") == "R":
            found.append(job | {"id": job_id})
    return found


def inject(kind: str, cluster, work: Path, rng: random.Random, lost: list) -> str | None:
    """One fault of ``kind`` on a random target; what it hit, or None if nothing fit."""
    if kind == "engine":
        engines = echo_servers(work)
        if not engines:
            return None
        name = rng.choice(sorted(engines))
        os.kill(engines[name], signal.SIGKILL)
        return name
    if kind == "node_snakemake":
        nodes = node_snakemakes()
        if not nodes:
            return None
        host = rng.choice(sorted(nodes))
        os.kill(nodes[host], signal.SIGKILL)
        return host
    jobs = running_jobs(cluster, work)
    if kind == "lost_host":
        jobs = [j for j in jobs if len(node_list(cluster, j["id"])) > 1]
    if not jobs:
        return None
    job = rng.choice(sorted(jobs, key=lambda j: j["id"]))
    if kind in ("qdel", "walltime"):
        argv = ["qdel", job["id"]]
        if kind == "walltime":
            used = job.get("resources_used", {}).get("walltime", "00:00:00")
            h, m, s = map(int, used.split(":"))
            limit = h * 3600 + m * 60 + s + 3
            walltime = f"{limit // 3600:02d}:{limit // 60 % 60:02d}:{limit % 60:02d}"
            argv = ["qalter", "-l", f"walltime={walltime}", job["id"]]
        # PBS refuses one for a job that is ending or starting again: another target
        return job["id"] if cluster.run(argv).returncode == 0 else None
    host = node_list(cluster, job["id"])[1]
    cluster.lose_host(host)
    lost.append(host)
    return f"{host} of {job['id']}"


def soak(cluster, tmp_path: Path, *, ranks: int, faults: dict[str, int], seed: int,
         span_s: float, delay_s: float = 3) -> dict:  # fmt: skip
    """A warm run of ``ranks`` ranks (2 nodes x 2 engines a submission, 4 ranks an engine,
    ``delay_s`` a request) with ``faults`` ({kind: count}) at random moments over the
    first ``span_s`` seconds after the first rank is done (lost hosts first, in its
    first third); returns its figures."""
    rng = random.Random(seed)
    data = {f"{i}.in": f"rank {i} prompt\n" for i in range(ranks)}
    config = {
        "tiles": {"per_node": 2},
        "warm": {"ranks_per_engine": 4, "ranks_in_flight": 1, "max_restarts": 10,
                 "node_restarts": 10},
        "task_env": {"ECHO_SERVER_DELAY_S": str(delay_s)},
        "pbs": {"nodes_per_submission": 2, "resubmit": sum(faults.values()) + 1},
    }  # fmt: skip
    work = warm_folder(tmp_path, data, **config)
    # Lost hosts first, in the first third of the span: one needs a running submission
    # of 2 nodes, which the first submissions are until they end; the continuations
    # after the other faults may have one node, or not have started, until the run is
    # over (seed 1796650058 on a fresh clone of 7fa5317: its lost host, drawn after a
    # qdel and a walltime cut, found no target in 20 s while the last one ran). The
    # others follow at their own moments, or at once when theirs have passed.
    moments = sorted(
        (rng.uniform(0, span_s / 3 if kind == "lost_host" else span_s), kind)
        for kind, count in faults.items()
        for _ in range(count)
    )
    moments.sort(key=lambda moment: moment[1] != "lost_host")
    watcher = Watcher(work)
    injected, missed, lost = [], [], []
    started = time.monotonic()
    try:
        with aurora_in_background(cluster, work) as proc:
            watcher.start()
            wait_for(lambda: list(work.glob("results/*.out")), "no rank done", 600, proc)
            begin = time.monotonic()
            for at, kind in moments:
                while time.monotonic() < begin + at and proc.poll() is None:
                    time.sleep(0.1)
                hit = None
                deadline = time.monotonic() + 20  # a target of its kind may come later
                while proc.poll() is None and time.monotonic() < deadline:
                    if hit := inject(kind, cluster, work, rng, lost):
                        break
                    time.sleep(0.5)
                moment = round(time.monotonic() - begin, 1)
                if hit:
                    injected.append((moment, kind, hit))
                else:  # the run over, or no target of its kind in time
                    missed.append((moment, kind, proc.poll() is not None))
                for host in list(lost):  # back once PBS has seen it down
                    if "down" in str(cluster.nodes().get(host, {}).get("state")):
                        cluster.start_mom(host)
                        lost.remove(host)
            while lost and proc.poll() is None:
                for host in list(lost):
                    if "down" in str(cluster.nodes().get(host, {}).get("state")):
                        cluster.start_mom(host)
                        lost.remove(host)
                time.sleep(0.5)
            output, _ = proc.communicate(timeout=1800)
    finally:
        watcher.stop.set()
        for host in lost:
            with contextlib.suppress(Exception):
                cluster.start_mom(host)
    watcher.join()
    watcher.look()
    exact = all(
        (work / "results" / f"{r}.out").exists()
        and wf.read_records(work / "results" / f"{r}.out") == [(f"rank {r} prompt",) * 2]
        for r in range(ranks)
    )
    for job in submissions(work):
        nothing_outlives(cluster, job["id"], work)
    wait_for(lambda: not node_snakemakes(), "a node Snakemake outlived the run", 30)
    figures = {
        "seed": seed,
        "ranks": ranks,
        "faults injected": len(injected),
        # no target of its kind before the run was over (a lost host needs a running
        # submission of 2 nodes; the last continuations may have one node or none)
        "missed as the run ended": sum(1 for _, _, over in missed if over),
        "faults survived": len(injected) if proc.returncode == 0 and exact else 0,
        "ranks redone": len(watcher.redone),
        "runs needing a hand": 0 if proc.returncode == 0 else 1,
        "outputs exact": exact,
        "submissions": len(submissions(work)),
        "engines left": len(processes_running(ECHO_SERVER)),
        "jobs left": len([i for i in set(our_job_ids(work)) if i in cluster.jobs_in_queue()]),
        "seconds": round(time.monotonic() - started, 1),
        "injected": injected,
        "missed": missed,
        "output": output[-6000:],
    }
    with contextlib.suppress(OSError):
        Path(work / "soak.json").write_text(json.dumps(figures, indent=1))
    return figures
