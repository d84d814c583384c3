"""Whole ``snakemake --profile profiles/aurora`` runs through the real PBS server that
finish: per-rank engines on 48 tiles of one 4-node submission, real vLLM on node-local
model copies, warm engines (one launcher call, 480 ranks; real vLLM), progress lines,
and the preflight that ends a submission before its engines start. Helpers:
tests/pbs_runs.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import workflow as wf
from pbs_runs import (
    ECHO_SERVER,
    PROGRESS,
    aurora_folder,
    delete_our_jobs,
    engine_states,
    engine_urls,
    installed_vllm,
    launcher_calls,
    logged_argv,
    loopback_of,
    node_list,
    output_of,
    preflight_run,
    probing_python,
    processes_running,
    progress_lines,
    python_wrapper,
    run_aurora,
    submissions,
    warm_folder,
)


@pytest.mark.pbs
def test_workflow_runs_48_ranks_on_48_tiles_of_one_4_node_submission(pbs_cluster, tmp_path):
    prompts = {i: [f"rank {i} prompt {j}" for j in range(2)] for i in range(48)}
    notes = tmp_path / "notes"
    notes.mkdir()
    # All 48 ranks wait for each other before their task starts: each then holds its
    # tile at the same time as the others, so their 48 (host, tile) slots must differ.
    wrapper = python_wrapper(tmp_path / "python", notes=notes, barrier=48)
    work = aurora_folder(
        tmp_path,
        {f"{i}.in": "\n".join(lines) + "\n" for i, lines in prompts.items()},
        python=str(wrapper),
        tiles={"per_node": 12},
        pbs={"nodes_per_submission": 4},
    )
    try:
        res = run_aurora(pbs_cluster, work)  # profile: group-components node=48
    finally:
        delete_our_jobs(pbs_cluster, work)
    assert res.returncode == 0, output_of(res)
    (submission,) = submissions(work)
    assert (submission["name"], submission["nodes"]) == ("r0-47", "4")
    hosts = node_list(pbs_cluster, submission["id"])
    assert sorted(hosts) == ["node1", "node2", "node3", "node4"]
    slots = []
    for rank, lines in prompts.items():
        assert wf.read_records(work / "results" / f"{rank}.out") == [(p, p) for p in lines]
        record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
        slots.append((record["host"], record["tiles"]))
        argv = logged_argv(work / "logs" / "infer" / f"{rank}.log")
        assert argv[:2] == ["/opt/pbs/bin/pbs_tmrsh", record["host"]]
        # the task's own lines reach the rank's log, though pbs_tmrsh sends its output
        # to the submission's output file
        assert f"rank {rank}: 2 prompts" in (work / "logs" / "infer" / f"{rank}.log").read_text()
        # pbs_tmrsh started the task on the host placement chose, in $HOME
        node_number, host, cwd = (notes / str(rank)).read_text().split()
        assert hosts[int(node_number)] == host == record["host"]
        assert cwd == os.path.expanduser("~") != str(work)
    assert sorted(slots) == sorted((f"node{n}", str(t)) for n in range(1, 5) for t in range(12))


@pytest.mark.pbs
@pytest.mark.vllm
def test_workflow_runs_vllm_through_the_scheduler_on_node_local_model_copies(pbs_cluster, tmp_path):
    prompts = {i: [f"Rank {i} says hello", f"The capital of rank {i} is"] for i in range(2)}
    work = aurora_folder(
        tmp_path,
        {f"{i}.in": "\n".join(lines) + "\n" for i, lines in prompts.items()},
        engine="vllm",
        model=str(wf.TINY_MODEL),
        # profiles/local/local.yaml's CPU settings
        vllm={"dtype": "bfloat16", "enforce_eager": True, "cpu_kv_cache_gib": 1},
        task_env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"},
        tiles={"per_node": 1},
        pbs={"nodes_per_submission": 2},
        weights={"stage_dir": str(tmp_path / "node-local")},
    )
    # 2 nodes x 1 tile: 2 engines in one submission on this machine's 2 cores (more
    # tiles a node: the echo runs).
    try:
        res = run_aurora(pbs_cluster, work, "--group-components", "node=2", "--cores", "2")
    finally:
        delete_our_jobs(pbs_cluster, work)
    assert res.returncode == 0, output_of(res)
    (submission,) = submissions(work)
    assert submission["nodes"] == "2"
    job_id = submission["id"]
    hosts = node_list(pbs_cluster, job_id)
    for rank, lines in prompts.items():
        records = wf.read_records(work / "results" / f"{rank}.out")
        assert [p for p, _ in records] == lines
        assert all(generated.strip() for _, generated in records), records
        record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
        assert (record["engine"], record["output_tokens"] > 0) == ("vllm", True)
        # the engine loaded its node's copy
        copy = tmp_path / "node-local" / f"model-{job_id}" / record["host"] / "tiny-opt"
        assert record["model"] == str(copy)
    # one copy per node, by one pbsdsh call, and gone when the submission ended
    log = (work / "logs" / "pbs" / "r0-1.log").read_text()
    assert log.count("stage_model: prepare on 2 node(s)") == 1
    # preflight: each node's vLLM imported, no XPU here
    assert sorted(re.findall(r"preflight: (node\d): tile check skipped", log)) == sorted(hosts)
    assert sorted(re.findall(r"stage_model: (node\d): [\d.]+ MiB to", log)) == sorted(hosts)
    # one read of the shared file system; the other node's copy came from the first node,
    # every file's size checked (scripts/model/stage.py), and its engines loaded it
    how = sorted(re.findall(r"MiB to \S+ in [\d.]+ s \((.*)\)", log))
    assert how == [f"broadcast from {hosts[0]}", "read from the shared file system"]
    assert sorted(re.findall(r"stage_model: (node\d): removed", log)) == sorted(hosts)
    assert list((tmp_path / "node-local").iterdir()) == []


@pytest.mark.pbs
def test_warm_engines_one_launcher_call_starts_48_engines_that_serve_480_ranks(
    pbs_cluster, tmp_path
):
    prompts = {i: [f"rank {i} prompt {j}" for j in range(2)] for i in range(480)}
    work = warm_folder(
        tmp_path,
        {f"{i}.in": "\n".join(lines) + "\n" for i, lines in prompts.items()},
        tiles={"per_node": 12},
        pbs={"nodes_per_submission": 4},
        # 2 s a request: the first engines up do not serve every rank alone
        task_env={"ECHO_SERVER_DELAY_S": "2"},
    )
    try:
        res = run_aurora(pbs_cluster, work)  # group-components node=480
    finally:
        delete_our_jobs(pbs_cluster, work)
    assert res.returncode == 0, output_of(res)
    (submission,) = submissions(work)
    assert (submission["name"], submission["nodes"]) == ("r0-479", "4")
    # walltime: engine start 1 min + 10 ranks per engine x 1 min + the 10 min margin
    assert submission["walltime"] == "00:21:00"
    engines_used, clients = set(), {}
    for rank, lines in prompts.items():
        assert wf.read_records(work / "results" / f"{rank}.out") == [(p, p) for p in lines]
        record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
        engines_used.add((record["host"], record["tiles"], record["engine_name"]))
        # no rank request crosses nodes: its node's Snakemake, its node's engine
        assert record["client_node"] == record["host"], record
        clients.setdefault(record["client_node"], set()).add(record["client_pid"])
    # 48 distinct (host, tile) engines served ranks, from ONE process per node: each
    # node's Snakemake runs its share of the ranks as threads, no interpreter per rank
    assert sorted((h, t) for h, t, _ in engines_used) == sorted(
        (f"node{n}", str(t)) for n in range(1, 5) for t in range(12)
    )
    assert sorted(clients) == [f"node{n}" for n in range(1, 5)]
    assert all(len(pids) == 1 for pids in clients.values()), clients
    assert len(set().union(*clients.values())) == 4
    job_log = (work / "logs" / "pbs" / "r0-479.log").read_text()
    # two launcher calls in all: the engines, and the node Snakemakes
    assert launcher_calls(job_log) == [("48", "4")]
    assert re.findall(r"ranks: launcher call for (\d+) node Snakemake", job_log) == ["4"]
    # no line per rank from the node Snakemakes (480 ranks: 1,440 lines before)
    assert "steps (" not in job_log and "Finished jobid" not in job_log
    nodes = json.loads((work / "logs" / "pbs" / "r0-479.nodes.json").read_text())
    assert [len(share) for share in nodes["shares"]] == [120] * 4
    # 12 engines x 4 ranks in flight per node's Snakemake
    at = nodes["argv"].index("--force-use-threads")
    assert nodes["argv"][at:] == [
        "--force-use-threads", "--keep-going", "--cores", "48", "--scheduler", "greedy",
        "--max-jobs-per-timespan", "100000/1s", "--scheduler-subsample", "48",
        "--default-resources", "mem_mb=0", "disk_mb=0", "--quiet", "progress", "rules",
        "--mode", "remote",
    ]  # fmt: skip
    states = engine_states(work, submission["id"])
    assert len(states) == 48 and set(states.values()) == {"stopped"}, states
    # each engine listened on its host's loopback address only (the test cluster's
    # node<N> is 127.0.0.1<N>)
    for name, url in engine_urls(work, submission["id"]).items():
        host = name.split("-")[0]
        assert url.startswith(f"http://127.0.0.1{host[-1]}:"), (name, url)
    # the submission's key: in one 0600 file, in no log, record or registry entry
    key_file = work / "logs" / "pbs" / "r0-479.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip().encode()
    assert len(key) >= 32
    leaked = [
        path
        for folder in (work / "logs", work / "results")
        for path in folder.rglob("*")
        if path.is_file() and path != key_file and key in path.read_bytes()
    ]
    assert not leaked, leaked
    assert not processes_running(ECHO_SERVER)


@pytest.mark.pbs
@pytest.mark.vllm
def test_warm_vllm_engines_through_the_scheduler_on_node_local_model_copies(pbs_cluster, tmp_path):
    prompts = {i: [f"Rank {i} says hello", f"The capital of rank {i} is"] for i in range(12)}
    work = warm_folder(
        tmp_path,
        {f"{i}.in": "\n".join(lines) + "\n" for i, lines in prompts.items()},
        engine="vllm",
        # profiles/local/local.yaml's CPU settings
        vllm={"dtype": "bfloat16", "enforce_eager": True, "cpu_kv_cache_gib": 1},
        task_env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"},
        warm={"ranks_per_engine": 3, "ready_timeout_s": 600},
        tiles={"per_node": 2},
        pbs={"nodes_per_submission": 2},
        weights={"stage_dir": str(tmp_path / "node-local")},
    )
    # 2 nodes x 2 tiles: 4 vLLM servers for the 12 ranks of one submission.
    try:
        res = run_aurora(pbs_cluster, work)
    finally:
        delete_our_jobs(pbs_cluster, work)
    assert res.returncode == 0, output_of(res)
    (submission,) = submissions(work)
    assert (submission["name"], submission["nodes"]) == ("r0-11", "2")
    job_id = submission["id"]
    hosts = node_list(pbs_cluster, job_id)
    served = set()
    for rank, lines in prompts.items():
        records = wf.read_records(work / "results" / f"{rank}.out")
        assert [p for p, _ in records] == lines
        assert all(generated.strip() for _, generated in records), records
        record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
        assert (record["engine"], record["output_tokens"] > 0) == ("vllm", True)
        served.add(record["engine_name"])
        # each engine loaded its node's copy of the model
        engine_log = Path(record["engine_log"]).read_text()
        copy = tmp_path / "node-local" / f"model-{job_id}" / record["host"] / "tiny-opt"
        address = loopback_of(record["host"])
        assert f"--model {copy} --host {address}" in engine_log
    # All four were started by the one launcher call, each on its host with that
    # host's copy. Ranks start on the first engine ready, and these 12 short ranks may
    # all be done before the others are up (seen on a loaded machine: one was stopped
    # while it started), so which engines came up and served is timing; the spread
    # over engines is checked with 48 echo engines above.
    registry = work / "logs" / "engines" / job_id
    for host in hosts:
        copy = tmp_path / "node-local" / f"model-{job_id}" / host / "tiny-opt"
        for tile in range(2):
            engine_log = (registry / f"{host}-tile{tile}.log").read_text()
            address = loopback_of(host)
            assert f"--model {copy} --host {address} --port {30500 + tile}" in engine_log
    assert served and served <= {f"{h}/tile{t}" for h in hosts for t in range(2)}
    log = (work / "logs" / "pbs" / "r0-11.log").read_text()
    assert launcher_calls(log) == [("4", "2")]
    assert set(engine_states(work, job_id).values()) == {"stopped"}
    assert list((tmp_path / "node-local").iterdir()) == []
    # the versions rule fetch_model found, in every registry entry and record
    for entry in registry.glob("*.json"):
        assert json.loads(entry.read_text())["versions"]["vllm"] == installed_vllm()
    for rank in prompts:
        record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
        assert record["versions"]["vllm"] == installed_vllm()


@pytest.mark.pbs
@pytest.mark.vllm
def test_preflight_too_little_room_for_the_model_ends_the_submission_naming_node(
    pbs_cluster, tmp_path
):
    small = tmp_path / "small-tmpfs"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        res, submission, log = preflight_run(
            pbs_cluster, tmp_path, weights={"stage_dir": str(small)}
        )
    finally:
        subprocess.run(["umount", str(small)], check=True)
    cause = re.compile(
        rf"node (node\d): {re.escape(str(small))} has 16.0 MiB free, the model needs [\d.]+ MiB "
        r"\([\d.]+ MiB and a margin; config weights.stage_dir\)"
    )
    assert len(set(cause.findall(log))) == 2  # both nodes, in the PBS log
    terminal = res.stdout + res.stderr
    assert (
        f"Submission {submission['name']} (job {submission['id']}) ended before any engine"
        in terminal
    )
    assert cause.search(terminal)


@pytest.mark.pbs
def test_preflight_a_node_with_another_vllm_ends_the_submission(pbs_cluster, tmp_path):
    python = probing_python(tmp_path, vllm="0.15.0")
    res, submission, log = preflight_run(pbs_cluster, tmp_path, python=str(python))
    cause = (
        f"vLLM 0.15.0 here, but rule fetch_model checked the engines against vLLM "
        f"{installed_vllm()} (config python, pbs.setup)"
    )
    assert re.search(rf"preflight: node node\d: {re.escape(cause)}", log)
    assert re.search(rf"node node\d: {re.escape(cause)}", res.stdout + res.stderr)
    marker = json.loads(next((tmp_path / "run" / "results" / "model").glob("*.json")).read_text())
    assert marker["versions"]["vllm"] == installed_vllm()


@pytest.mark.pbs
def test_preflight_a_node_that_sees_too_few_tiles_ends_the_submission(pbs_cluster, tmp_path):
    python = probing_python(tmp_path, vllm=installed_vllm(), xpu_devices=1)
    res, submission, log = preflight_run(pbs_cluster, tmp_path, python=str(python))
    cause = re.compile(r"node (node\d): 1 of 2 tiles visible \(ZE_AFFINITY_MASK unset\)")
    assert len(set(cause.findall(log))) == 2
    assert cause.search(res.stdout + res.stderr)


@pytest.mark.pbs
def test_warm_submission_shows_progress_lines_that_grow_to_the_total(pbs_cluster, tmp_path):
    ranks = {f"{i}.in": f"rank {i} prompt a\nrank {i} prompt b\n" for i in range(48)}
    # 2 nodes x 4 echo engines, one rank at a time each, 1 s a request: 6 ranks per
    # engine, several status rounds while it runs
    config = {
        "tiles": {"per_node": 4},
        "warm": {"ranks_per_engine": 6, "ranks_in_flight": 1},
        "task_env": {"ECHO_SERVER_DELAY_S": "1"},
        "pbs": {"nodes_per_submission": 2},
    }
    work = warm_folder(tmp_path, ranks, **config)
    try:
        res = run_aurora(pbs_cluster, work, "--group-components", "node=48", "--cores", "48")
    finally:
        delete_our_jobs(pbs_cluster, work)
    assert res.returncode == 0, output_of(res)
    (submission,) = submissions(work)
    # what the terminal showed: Snakemake's stderr, where the status command's goes
    shown = [p for p in progress_lines(res.stderr) if p["id"] == submission["id"]]
    assert len(shown) >= 3, res.stderr[-4000:]
    assert {p["name"] for p in shown} == {"r0-47"} and {p["total"] for p in shown} == {"48"}
    done = [int(p["done"]) for p in shown]
    assert done == sorted(done) and done[-1] == 48, done
    assert any(0 < d < 48 for d in done), done  # seen while it ran
    assert shown[-1]["phase"] == "finished" and shown[-1]["failed"] is None
    assert shown[-1]["stopped"] == "8"  # the job script stopped its engines
    ready = [int(p["ready"]) for p in shown if p["ready"] is not None]
    assert {p["engines"] for p in shown if p["engines"]} == {"8"} and 8 in ready, shown
    # the same lines, with their times, in the progress log the README names
    logged = progress_lines(
        "\n".join(
            line.split(" ", 2)[2]
            for line in (work / "logs" / "progress.log").read_text().splitlines()
        )
    )
    assert logged == progress_lines(
        "\n".join(line for line in res.stderr.splitlines() if PROGRESS.match(line))
    )
