"""Benchmark 4: how hard does a run poll the scheduler? Calls per interval and per submission.

The real OpenPBS test cluster (tests/pbs_cluster.py, four hosts) runs the workflow
with profiles/aurora: the echo engine, one rank per submission (``tiles.per_node`` 1,
``pbs.nodes_per_submission`` 1, ``--group-components node=1``) to a queue without
per-user limits, so ``ranks`` ranks are ``ranks`` submissions, all in flight at once.

Scheduler calls are counted, not faked: a folder first on PATH holds one wrapper
per PBS command (qsub, qstat, qdel, pbs_tmrsh, pbsdsh) that appends a line to a log
and execs the real command by its absolute path.

Status queries (qstat) are then bucketed into polling
intervals (``pbs.status_interval`` seconds, from the first submission); the goal
is at most one status query per interval however many submissions are in flight.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import tempfile
import time
from pathlib import Path

import yaml

from common import PYTHON, REPO, log, markdown_table, run_folder, run_timed

NAME = "scheduler_load"
COMMANDS = ("qsub", "qstat", "qdel", "pbs_tmrsh", "pbsdsh")
STATUS_COMMANDS = ("qstat",)
LAUNCHERS = ("pbs_tmrsh", "pbsdsh")
QUEUE = "bench"  # no per-user limits: every submission may be in the system at once


def write_wrappers(folder: Path, call_log: Path, path: str) -> dict[str, str]:
    """Counting wrappers for the scheduler commands found on ``path``."""
    folder.mkdir(parents=True, exist_ok=True)
    real = {}
    for name in COMMANDS:
        found = shutil.which(name, path=path)
        if not found:
            continue
        real[name] = found
        script = folder / name
        # One line per call (time, command, arguments), then the real command.
        line = f'printf "%s\\t%s\\t%s\\n" "$(date +%s.%N)" {name} "$*"'
        script.write_text(
            f'#!/bin/sh\n{line} >> {shlex.quote(str(call_log))}\nexec {shlex.quote(found)} "$@"\n'
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return real


def read_calls(call_log: Path) -> list[tuple[float, str, str]]:
    if not call_log.exists():
        return []
    calls = []
    for line in call_log.read_text().splitlines():
        stamp, name, args = (line.split("\t", 2) + ["", ""])[:3]
        calls.append((float(stamp), name, args))
    return sorted(calls)


def test_config(interval: int) -> dict:
    """Config for the test cluster: the echo engine, pbs_tmrsh as launcher, one rank per
    submission (per-rank engines: a warm submission carries ranks_per_engine ranks)."""
    return {
        "engine": "echo",
        "warm_engines": False,
        "model": "facebook/opt-125m",  # never loaded by the echo engine
        "python": "",  # the Python running Snakemake
        "task_env": {},
        "launcher": ["pbs_tmrsh", "{host}"],
        "tiles": {"per_node": 1, "per_job": 1, "cpu_bind": []},
        "runtime_minutes": 10,
        "pbs": {
            "account": "test",
            "queue": QUEUE,
            "nodes_per_submission": 1,
            "setup": [],
            "status_interval": interval,
        },
    }


def in_flight_at(t: float, starts: list[float], ends: list[float]) -> int:
    """Submissions made and not yet finished at time ``t``."""
    return sum(1 for s in starts if s <= t) - sum(1 for e in ends if e <= t)


def run(quick: bool = False, repeats: int = 3, shared: dict | None = None) -> dict:
    from pbs_cluster import PbsCluster

    if not (REPO / "profiles" / "aurora" / "config.yaml").is_file():
        raise RuntimeError("profiles/aurora is missing")
    ranks = 6 if quick else 24
    profile = yaml.safe_load((REPO / "profiles" / "aurora" / "config.yaml").read_text())
    interval = int(profile.get("seconds-between-status-checks", 10))
    with (
        tempfile.TemporaryDirectory(prefix="bench-scheduler-") as tmp,
        PbsCluster() as cluster,
    ):
        cluster.add_queue(QUEUE)
        root = Path(tmp)
        call_log = root / "calls.tsv"
        env = cluster.env
        real = write_wrappers(root / "bin", call_log, env["PATH"])
        env["PATH"] = f"{root / 'bin'}{os.pathsep}{env['PATH']}"
        work = run_folder(root / "run", {f"{r}.in": f"prompt {r}\n" for r in range(ranks)})
        config = work / "scheduler-test.yaml"
        config.write_text(yaml.safe_dump(test_config(interval)))
        argv = [
            PYTHON,
            "-m",
            "snakemake",
            "--profile",
            "profiles/aurora",
            "--configfile",
            str(REPO / "profiles" / "aurora" / "aurora.yaml"),
            str(config),
            "--group-components",
            "node=1",
            "--jobs",
            str(ranks + 5),
            "--cores",
            "1",
        ]
        log(f"scheduler: {ranks} submissions on the test cluster, status every {interval} s")
        t0 = time.time()
        timed = run_timed(argv, cwd=work, env=env, timeout=1800, check=False)
        t1 = time.time()
        if timed.returncode != 0:
            raise RuntimeError(
                f"the run failed ({timed.returncode}):\n{timed.stdout[-3000:]}\n"
                f"{timed.stderr[-5000:]}\n{cluster.logs()}"
            )
        ids = [line.split("\t")[1] for line in (work / "logs/pbs/submissions.tsv").open()]
        jobs = [cluster.job(job_id) or {} for job_id in ids]
        all_calls = read_calls(call_log)
    calls = [c for c in all_calls if t0 <= c[0] <= t1]
    outside = [c for c in calls if c[1] not in LAUNCHERS]
    submits = [c for c in calls if c[1] == "qsub"]
    status = [c for c in calls if c[1] in STATUS_COMMANDS]
    submissions = len([c for c in calls if c[1] == "qsub"]) or len(submits)
    # In flight: from the qsub call to the job's end (its last change, whole seconds).
    ends = [time.mktime(time.strptime(j["mtime"], "%a %b %d %H:%M:%S %Y")) + 1 for j in jobs]
    starts = [c[0] for c in calls if c[1] == "qsub"]
    first = starts[0] if starts else t0
    # A round: status calls less than a second apart (on OpenPBS the first round with
    # several jobs asks twice: the JSON form lists one job, the text form the rest;
    # later rounds ask the text form only).
    rounds: list[list] = []
    for call in status:
        if rounds and call[0] - rounds[-1][-1][0] < 1.0:
            rounds[-1].append(call)
        else:
            rounds.append([call])
    windows: dict[int, list] = {}
    for group in rounds:
        windows.setdefault(int((group[0][0] - first) // interval), []).append(group)
    busy = max(1, ranks // 2)
    busy_windows = {
        w: groups
        for w, groups in windows.items()
        if in_flight_at(first + (w + 0.5) * interval, starts, ends) >= busy
    }
    max_per_window = max((len(groups) for groups in windows.values()), default=0)
    max_busy = max((len(groups) for groups in busy_windows.values()), default=0)
    max_calls_per_round = max((len(group) for group in rounds), default=0)
    per_command = {name: sum(1 for c in calls if c[1] == name) for name in COMMANDS}
    peak_in_flight = max((in_flight_at(s, starts, ends) for s in starts), default=0)
    rows = [
        ["submissions (qsub calls)", submissions],
        ["peak submissions in flight", peak_in_flight],
        ["polling interval, s", interval],
        ["polling intervals with status queries", len(windows)],
        [
            f"status query rounds per interval, max (goal <= 1) with >= {busy} in flight",
            f"**{max_busy}**",
        ],
        ["status query rounds per interval, max over the whole run", max_per_window],
        ["qstat calls per round, max (JSON, then text for the rest)", max_calls_per_round],
        ["status queries (qstat calls) per submission", f"{len(status) / max(1, submissions):.2f}"],
        [
            "scheduler calls per submission (all but the launchers)",
            f"{len(outside) / max(1, submissions):.2f}",
        ],
        ["calls by command", ", ".join(f"{k} {v}" for k, v in per_command.items() if v)],
        ["wall time of the run, s", f"{timed.wall_s:.0f}"],
    ]
    return {
        "name": NAME,
        "title": (
            f"Scheduler load: {ranks} one-rank submissions (echo engine) with profiles/aurora "
            "on the OpenPBS test cluster (4 hosts); every scheduler call counted"
        ),
        "table": markdown_table(["measure", "value"], rows),
        "real_commands": real,
        "calls": [{"t": c[0] - first, "command": c[1], "args": c[2]} for c in calls],
        "summary": {
            "submissions": submissions,
            "max_status_queries_per_interval_in_flight": max_busy,
            "status_queries_per_submission": len(status) / max(1, submissions),
            "goal_met": max_busy <= 1,
            "goal": [
                f"status query rounds per polling interval, {peak_in_flight} submissions in flight",
                f"{max_busy} ({len(status) / max(1, submissions):.2f} per submission)",
                "<= 1",
            ],
        },
    }
