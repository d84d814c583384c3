"""Benchmark 6: how fast one submission's Snakemake feeds its warm engines, and what a
rank in flight costs its head node.

One PBS submission on the OpenPBS test cluster (tests/pbs_cluster.py): 4 hosts x 12
echo engines (scripts/echo_server.py: vLLM's API, no model, answers at once), started
by one ``pbsdsh`` call, and 3,072 ranks (64 per engine) run as threads of the
submission's Snakemake (profiles/aurora with warm engines). Measured inside the
submission:

- ranks dispatched per second: ranks / (last rank written - first rank written), by
  the records' ``written_at`` (the main Snakemake touches all outputs of a submission
  when it ends, so their mtimes say nothing of the ranks);
- the submission's Snakemake (found in /proc by its ``--mode remote`` command line),
  sampled every 0.2 s: resident memory before and at its peak, threads, CPU seconds
  between the first and the last output.

A second, wide submission holds as many ranks in flight at once as a 256-node ``prod``
submission has engines (3,072: 64 per echo engine, each request held 40 s by its
engine, 6,144 ranks): its peak memory and threads are what one rank in flight on each
of 3,072 engines costs the head node.

Baseline in the same run: Snakemake alone running as many trivial ``run:`` jobs as
threads (same ``--cores``, greedy scheduler) on this machine, timed the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import yaml
from common import PYTHON, REPO, log, markdown_table, run_folder

NAME = "dispatch"
QUEUE = "bench"
HOSTS, PER_NODE, IN_FLIGHT = 4, 12, 4
# About ranks in flight / dispatch rate (3,072 / ~75 per s): shorter, and fewer are in flight.
WIDE_DELAY_S = 40.0
TICKS = os.sysconf("SC_CLK_TCK")
PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20
TRIVIAL_SNAKEFILE = """
N = {jobs}


rule all:
    input:
        expand("out/{{i}}.txt", i=range(N)),


rule job:
    output:
        "out/{{i}}.txt",
    run:
        with open(output[0], "w") as handle:
            handle.write("x")
"""


def bench_config(per_engine: int, in_flight: int = IN_FLIGHT, delay_s: float = 0.0) -> dict:
    pbsdsh = ["/opt/pbs/bin/pbsdsh", "--"]
    return {
        "engine": "echo",
        "model": "facebook/opt-125m",  # never loaded by the echo engine
        "python": "",
        "task_env": {"ECHO_SERVER_DELAY_S": str(delay_s)} if delay_s else {},
        "warm_engines": True,
        "warm": {
            "ranks_per_engine": per_engine,
            "ranks_in_flight": in_flight,
            "start_minutes": 2,
            "rank_minutes": 1,
            "ready_timeout_s": 300,
        },
        "engine_launcher": pbsdsh,
        "node_launcher": pbsdsh,
        "launcher": ["/opt/pbs/bin/pbs_tmrsh", "{host}"],
        "tiles": {"per_node": PER_NODE, "cpu_bind": []},
        "weights": {"shared_hf_home": "", "stage": False},
        "pbs": {
            "account": "test",
            "queue": QUEUE,
            "nodes_per_submission": HOSTS,
            "setup": [],
            "status_interval": 2,
            "walltime_margin_minutes": 5,
        },
    }


def _stat(pid: int) -> tuple[float, float, int] | None:
    """(resident MiB, CPU seconds, threads) of ``pid``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return None
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    return int(statm[1]) * PAGE_MIB, cpu, int(fields[17])


def _inner_snakemake(work: Path) -> int | None:
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"remote" in argv and b"--mode" in argv and os.readlink(entry / "cwd") == str(work):
                return int(entry.name)
        except OSError:
            continue
    return None


class Sampler(threading.Thread):
    """Samples (time, MiB, CPU s, threads) of the submission's Snakemake."""

    def __init__(self, work: Path):
        super().__init__(daemon=True)
        self.work, self.samples, self.done = work, [], threading.Event()

    def run(self) -> None:
        pid = None
        while not self.done.is_set():
            pid = pid or _inner_snakemake(self.work)
            sample = _stat(pid) if pid else None
            if sample:
                self.samples.append((time.time(), *sample))
            elif pid and self.samples:
                pid = None  # it ended
            self.done.wait(0.2)


def output_span(folder: Path, pattern: str) -> tuple[int, float, float]:
    mtimes = sorted(p.stat().st_mtime for p in folder.glob(pattern))
    return len(mtimes), mtimes[0], mtimes[-1]


def written_span(records: list[dict]) -> tuple[int, float, float]:
    """Ranks and their first and last ``written_at`` (the outputs' mtimes will not do:
    the main Snakemake touches every output of a submission when it ends)."""
    times = sorted(r["written_at"] for r in records)
    return len(times), times[0], times[-1]


def baseline(root: Path, jobs: int, cores: int) -> dict:
    """Snakemake alone: ``jobs`` trivial threaded jobs."""
    work = root / "baseline"
    work.mkdir()
    (work / "Snakefile").write_text(TRIVIAL_SNAKEFILE.format(jobs=jobs))
    argv = [PYTHON, "-m", "snakemake", "--force-use-threads", "--cores", str(cores)]
    argv += ["--scheduler", "greedy", "--quiet", "all"]
    subprocess.run(argv, cwd=work, check=True, capture_output=True, timeout=1800)
    count, first, last = output_span(work / "out", "*.txt")
    return {"jobs": count, "seconds": last - first, "per_s": (count - 1) / (last - first)}


def submission(cluster, root: Path, ranks: int, in_flight: int, delay_s: float) -> dict:
    """One submission of ``ranks`` ranks on the 48 echo engines, ``in_flight`` ranks per
    engine at once, each request taking ``delay_s``; what its Snakemake cost."""
    engines = HOSTS * PER_NODE
    work = run_folder(root, {f"{r}.in": f"rank {r} prompt\n" for r in range(ranks)})
    config = work / "dispatch.yaml"
    config.write_text(yaml.safe_dump(bench_config(ranks // engines, in_flight, delay_s)))
    argv = [PYTHON, "-m", "snakemake", "--profile", "profiles/aurora", "--configfile"]
    argv += [str(REPO / "profiles" / "aurora" / "aurora.yaml"), str(config)]
    argv += ["--group-components", f"node={ranks}", "--cores", str(ranks)]
    argv += ["--seconds-between-status-checks", "2"]
    log(f"dispatch: {ranks} ranks on {engines} echo engines, {in_flight} in flight per engine")
    sampler = Sampler(work)
    sampler.start()
    result = subprocess.run(
        argv, cwd=work, env=cluster.env, capture_output=True, text=True, timeout=3600
    )
    sampler.done.set()
    sampler.join()
    if result.returncode != 0:
        raise RuntimeError(f"the run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(p.read_text()) for p in (work / "results/records").glob("*")]
    count, first, last = written_span(records)
    clients = {r["client_pid"] for r in records}
    served = {r["engine_name"] for r in records}
    if count != ranks or len(clients) != 1:
        raise RuntimeError(f"{count} outputs, {len(clients)} clients, {len(served)} engines")
    samples = sampler.samples
    during = [s for s in samples if first <= s[0] <= last] or samples
    start_mib, peak = samples[0][1], max(samples, key=lambda s: s[1])
    cpu_s = during[-1][2] - during[0][2]
    return {
        "ranks": count,
        "engines": engines,
        "in_flight": engines * in_flight,
        "delay_s": delay_s,
        "clients": len(clients),
        "served": len(served),
        "per_s": (count - 1) / (last - first),
        "cpu_ms_per_rank": cpu_s / count * 1000,
        "start_mib": start_mib,
        "peak_mib": peak[1],
        "peak_threads": max(s[3] for s in samples),
        # upper bound: the DAG of all ranks is built after the first sample
        "mib_per_rank": (peak[1] - start_mib) / (engines * in_flight),
        "samples": samples,
    }


def run(quick: bool = False, repeats: int = 3, shared: dict | None = None) -> dict:
    from pbs_cluster import PbsCluster

    engines = HOSTS * PER_NODE
    ranks = engines * (10 if quick else 64)
    # All of a 256-node submission's engines busy at once, one rank each: 3,072 ranks in
    # flight on this head node, each request held WIDE_DELAY_S by its echo engine.
    wide_in_flight = 4 if quick else 256 * 12 // engines
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp, PbsCluster() as cluster:
        cluster.add_queue(QUEUE)
        root = Path(tmp)
        narrow = submission(cluster, root / "run", ranks, IN_FLIGHT, 0.0)
        wide = submission(cluster, root / "wide", 2 * engines * wide_in_flight, wide_in_flight,
                          WIDE_DELAY_S)  # fmt: skip
        log("dispatch: baseline, Snakemake alone with the same number of threaded jobs")
        base = baseline(root, ranks, engines * IN_FLIGHT)
    count, cores, rate = narrow["ranks"], narrow["in_flight"], narrow["per_s"]
    ratio = rate / base["per_s"]
    mib_per_rank = narrow["mib_per_rank"]
    full_engines = 256 * 12
    rows = [
        ["ranks (outputs written)", f"{count:,}"],
        [
            "engines (one launcher call), ranks in flight (Snakemake's --cores)",
            f"{narrow['engines']}, {cores}",
        ],
        ["processes that served ranks (records' client_pid)", narrow["clients"]],
        ["engines that served ranks (ranks start on the first ready ones)", narrow["served"]],
        ["ranks dispatched per second, first to last output (goal >= 50)", f"**{rate:.0f}**"],
        ["Snakemake alone, trivial threaded jobs per second (baseline)", f"{base['per_s']:.0f}"],
        ["ratio warm / Snakemake alone", f"{ratio:.2f}"],
        ["Snakemake CPU seconds per rank (first to last output)",
         f"{narrow['cpu_ms_per_rank']:.1f} ms"],
        ["its resident memory at its first sample / peak, MiB",
         f"{narrow['start_mib']:.0f} / {narrow['peak_mib']:.0f}"],
        ["its threads at the peak", narrow["peak_threads"]],
        [
            "MiB per rank in flight ((peak - first sample) / ranks in flight, an upper bound)",
            f"{mib_per_rank:.2f}",
        ],
        [
            f"wide: {wide['ranks']:,} ranks, {wide['in_flight']:,} in flight at once (each "
            f"request held {wide['delay_s']:.0f} s by its engine): ranks per second, first "
            "to last written",
            f"{wide['per_s']:.0f}",
        ],
        ["wide: threads at the peak; resident memory first / peak, MiB",
         f"{wide['peak_threads']:,}; {wide['start_mib']:.0f} / {wide['peak_mib']:.0f}"],
        ["wide: MiB per rank in flight (upper bound)", f"{wide['mib_per_rank']:.2f}"],
        ["wide: Snakemake CPU seconds per rank", f"{wide['cpu_ms_per_rank']:.1f} ms"],
    ]  # fmt: skip
    notes = [
        f"What this means for a 256-node prod submission ({full_engines:,} engines): the wide "
        f"run held {wide['in_flight']:,} ranks in flight at once, one per engine of such a "
        f"submission, in one Snakemake of {wide['peak_mib'] / 1024:.1f} GiB at its peak with "
        f"{wide['peak_threads']:,} threads; at warm.ranks_in_flight 4 "
        f"({full_engines * IN_FLIGHT:,} in flight) that is about "
        f"{wide['mib_per_rank'] * full_engines * IN_FLIGHT / 1024:.1f} GiB (an Aurora node "
        f"has 1 TiB). At {rate:.0f} ranks/s each of the {full_engines:,} engines gets a new "
        f"rank every {full_engines / rate:.0f} s, so the engines stay busy when a rank takes "
        "at least that long on its engine (more prompts per rank file, or fewer engines per "
        "submission)."
    ]
    return {
        "name": NAME,
        "title": (
            f"Dispatch inside one PBS submission: {count:,} ranks on {engines} echo engines "
            "(4 hosts x 12, OpenPBS test cluster), ranks as threads of the submission's "
            "Snakemake"
        ),
        "table": markdown_table(["measure", "value"], rows),
        "notes": notes,
        "narrow": narrow,
        "wide": wide,
        "baseline": base,
        "summary": {
            "ranks_per_s": rate,
            "baseline_per_s": base["per_s"],
            "ratio": ratio,
            "mib_per_rank_in_flight": mib_per_rank,
            "cpu_ms_per_rank": narrow["cpu_ms_per_rank"],
            "wide_in_flight": wide["in_flight"],
            "wide_peak_mib": wide["peak_mib"],
            "wide_mib_per_rank_in_flight": wide["mib_per_rank"],
            "goal_met": rate >= 50,
            "goal": [
                f"ranks dispatched per second in one submission ({count:,} ranks, {engines} "
                "engines, no interpreter per rank)",
                f"{rate:.0f} ({ratio:.2f} of Snakemake alone)",
                ">= 50",
            ],
        },
    }
