"""The workflow end to end with profiles/local, as a user runs it, with the tiny model on
real vLLM (marked `vllm`): the sample ranks on warm and per-rank engines, SIGKILL and
Ctrl-C then the rerun, an engine killed mid-run, the model caches. On echo engines:
tests/test_workflow_local.py, whose helpers this file uses."""

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_accounting import assert_local_warm_vllm_accounting
from test_workflow_local import FOUR, assert_ok, metric, processes_in, prompts_of
from workflow import (
    REPO,
    SNAKEMAKE,
    assert_checked_in_an_engine,
    assert_engines_loaded_no_model,
    local_config,
    make_workdir,
    planned_ranks,
    read_records,
    snakemake,
    wait_until,
)

UNLOCK_STALE = REPO / "scripts" / "tools" / "unlock_stale.py"


def sample_ranks() -> dict[str, str]:
    return {p.name: p.read_text() for p in (REPO / "data").glob("*.in")}


# --- runs -------------------------------------------------------------------


def the_engine_log(work: Path, host: str, tile: int) -> Path:
    """The log of a warm engine of the run (logs/engines/<run>/<host>-tile<N>.log)."""
    (log,) = (work / "logs" / "engines").glob(f"local-*/{host}-tile{tile}.log")
    return log


@pytest.mark.vllm
@pytest.mark.parametrize("warm", [True, False], ids=["warm-engines", "per-rank-engines"])
def test_the_sample_ranks_with_the_tiny_model(tmp_path, warm):
    ranks = sample_ranks()
    assert len(ranks) == 48
    if not warm:
        # Per-rank engines: each rank loads the model itself, so 48 ranks cost 48 engine
        # starts (about 4 of this test's 5 minutes on 2 cores) and show nothing 4 ranks on
        # the 2 tiles do not (two waves, each rank its own engine); the warm run reads all 48.
        ranks = {name: ranks[name] for name in sorted(ranks, key=lambda n: int(n[:-3]))[::12]}
    work = make_workdir(tmp_path, ranks)
    assert_ok(snakemake(work, configfiles=local_config(work, warm_engines=warm)))
    (marker,) = (work / "results" / "model").glob("*.json")
    versions = json.loads(marker.read_text())["versions"]
    assert versions["vllm"] and versions["torch"] and "ipex" in versions
    if warm:
        assert_checked_in_an_engine(work, status=0)
    served_by = set()
    for name in ranks:
        rank = name.removesuffix(".in")
        records = read_records(work / "results" / f"{rank}.out")
        assert [prompt for prompt, _ in records] == prompts_of(work / "data" / name)
        assert all(generated for _, generated in records)
        record = json.loads((work / "results" / "records" / f"{rank}.json").read_text())
        assert record["prompts"] == len(records) and record["output_tokens"] > 0
        # what generated it: the engine's vLLM and torch (per-rank: the task's own)
        for package in ("vllm", "torch"):
            assert record["versions"][package] == versions[package]
        log = (work / "logs" / "infer" / f"{rank}.log").read_text()
        if warm:  # served by one of the run's two engines, named in the record
            served_by.add((record["engine_name"], record["mask"]))
            assert Path(record["engine_log"]).is_file()
            assert f"rank {rank}: 4 prompts" in log
        else:
            assert "placement: " in log
    if warm:
        # by the run's two engines (ranks start once the first is ready: the other may
        # come up when they are done), each named with its tile's mask
        engines = {(f"{os.uname().nodename}/tile{t}", str(t)) for t in (0, 1)}
        assert served_by and served_by <= engines, served_by
        # each engine started once for the whole run
        for tile in (0, 1):
            engine_log = the_engine_log(work, os.uname().nodename, tile)
            assert engine_log.read_text().count("Application startup complete") == 1
    summary = (work / "results" / "summary.tsv").read_text().splitlines()
    assert len(summary) == 1 + len(ranks)
    assert processes_in(work) == []


@pytest.mark.vllm
def test_an_engine_option_this_vllm_lacks_stops_the_run_before_any_rank(tmp_path):
    work = make_workdir(tmp_path, {"0.in": FOUR, "1.in": FOUR})
    extra = ["--max-num-seqs", "8", "--no-such-option", "1"]
    result = snakemake(work, configfiles=local_config(work, vllm={"engine_args": extra}))
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "does not accept the engines' command line (warm.server: inprocess)" in text
    assert "--no-such-option comes from config key vllm.engine_args" in text
    assert re.search(r"vLLM \d+\.\d+\S* does not accept", text)
    assert not (work / "logs" / "infer").exists()  # no rank started
    assert_engines_loaded_no_model(work)  # nor any engine a model
    assert processes_in(work) == []


@pytest.mark.vllm
def test_sampling_seed_makes_reruns_identical(tmp_path):
    work = make_workdir(tmp_path, {"0.in": FOUR, "1.in": "Hello there\nThe sky is\n"})
    seeded = dict(temperature=0.8, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=False)
    config = local_config(work, sampling=seeded)
    assert_ok(snakemake(work, configfiles=config))
    # the same run's engines in its accounting (test_accounting)
    assert_local_warm_vllm_accounting(work)
    first = {p.name: p.read_text() for p in (work / "results").glob("*.out")}
    assert_ok(snakemake(work, "--forceall", configfiles=config))
    assert {p.name: p.read_text() for p in (work / "results").glob("*.out")} == first


@pytest.mark.vllm
def test_prompt_longer_than_the_context_fails_naming_line_and_tokens(tmp_path):
    long_prompt = " ".join(["word"] * 2000)
    work = make_workdir(tmp_path, {"0.in": f"short\n{long_prompt}\n", "1.in": FOUR})
    result = snakemake(work, configfiles=local_config(work))
    assert result.returncode != 0
    log = (work / "logs/infer/0.log").read_text()
    assert "0.in" in log and "line 2" in log and "token" in log
    assert not (work / "results/0.out").exists()
    assert (work / "results/1.out").exists()


def marked_incomplete(work: Path) -> set[str]:
    """Outputs Snakemake marked as being written (.snakemake/incomplete/<base64 path>)."""
    folder = work / ".snakemake" / "incomplete"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return {
        base64.urlsafe_b64decode(name).decode() for name in names if name != "migration_underway"
    }


def mark_unrecorded(work: Path, rank: str) -> None:
    """Mark a finished rank's outputs as Snakemake leaves them when it is killed between
    the rank's last write and its record of the job (.snakemake/incomplete/<base64 path>,
    as Snakemake's file persistence writes them)."""
    folder = work / ".snakemake" / "incomplete"
    for output in (f"results/{rank}.out", f"results/records/{rank}.json"):
        name = base64.urlsafe_b64encode(output.encode()).decode()
        (folder / name).write_text(json.dumps({"external_jobid": None}))


@pytest.mark.vllm
@pytest.mark.parametrize("warm", [True, False], ids=["warm-engines", "per-rank-engines"])
def test_sigkill_then_rerun_incomplete_reruns_only_unfinished_ranks(tmp_path, warm):
    # two rank jobs at a time, so that the kill lands mid-run (warm engines: profiles/local
    # runs 32 at once, and 96 ranks can be done before a loaded machine's test looks);
    # per-rank engines: five ranks, so that one is still to start when the two in flight
    # have finished
    ranks = 96 if warm else 5
    work = make_workdir(tmp_path, {f"{r}.in": FOUR for r in range(ranks)})
    results = work / "results"
    config = local_config(work, warm_engines=warm)
    run = snakemake(work, "--cores", "2", configfiles=config, popen=True)
    seen_partial, deadline = [], time.monotonic() + 900
    try:
        while time.monotonic() < deadline:
            done = sorted(results.glob("*.out"))
            for out in done:  # every .out that exists is whole, at every moment
                if len(read_records(out)) != 4:
                    seen_partial.append(out.name)
            incomplete = marked_incomplete(work)
            recorded = sum(f"results/{out.name}" not in incomplete for out in done)
            # Snakemake has recorded two ranks as finished (per-rank engines: and a
            # rank's task is running)
            if recorded >= 2 and (warm or any("task.py" in p for p in processes_in(work))):
                break
            assert run.poll() is None, run.stdout.read()
            time.sleep(0.2)
        if not warm:
            # Per-rank engines: the ranks' tasks are processes of their own. Snakemake
            # stopped, they finish and Snakemake cannot record them: the kill below lands
            # between their last write and Snakemake's record, as it can by chance.
            run.send_signal(signal.SIGSTOP)
            assert wait_until(lambda: not any("task.py" in p for p in processes_in(work)), 900)
    finally:
        run.kill()  # Snakemake alone, as the kernel's OOM killer would
        run.wait()
    # its engines (and whatever it started) end without it
    deadline = time.monotonic() + 30
    while processes_in(work) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_in(work) == []
    assert not seen_partial
    # Every .out that exists is whole (atomic writes) and finished, including those that
    # Snakemake had not yet recorded (still marked incomplete) when it was killed.
    finished = {p.name: p.stat().st_mtime_ns for p in results.glob("*.out")}
    assert 2 <= len(finished) < ranks
    unrecorded = {o for o in marked_incomplete(work) if o.endswith(".out")} & {
        f"results/{name}" for name in finished
    }
    if warm:
        # A warm-engine rank is a thread of Snakemake: only a kill landing by chance in
        # the sub-second between its last write and the record leaves it unrecorded.
        # Leave one such rank whatever the kill's moment.
        rank = min(name.removesuffix(".out") for name in finished)
        mark_unrecorded(work, rank)
        unrecorded.add(f"results/{rank}.out")
    assert unrecorded

    # A SIGKILLed Snakemake leaves its lock behind, as after a node crash: `make run`
    # removes it when no Snakemake of the folder is alive.
    unlock = subprocess.run(
        [sys.executable, str(UNLOCK_STALE), "profiles/local", *SNAKEMAKE],
        cwd=work, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert unlock.returncode == 0, unlock.stderr
    assert "No Snakemake is alive" in unlock.stderr
    assert not list((work / ".snakemake" / "locks").glob("*"))  # Snakemake drops the folder
    # profiles/local reruns incomplete ranks by itself
    rerun = snakemake(work, configfiles=config)
    assert_ok(rerun)
    assert planned_ranks(rerun.stdout + rerun.stderr) == [
        str(r) for r in range(ranks) if f"{r}.out" not in finished
    ]
    # said by the first Snakemake to load the workflow: the --unlock
    assert f"Kept {len(unrecorded)} rank(s) that an interrupted run had finished" in (
        unlock.stderr + rerun.stderr
    )
    for name, mtime in finished.items():
        assert (results / name).stat().st_mtime_ns == mtime
    assert all(len(read_records(results / f"{r}.out")) == 4 for r in range(ranks))


def engines_in(work: Path) -> list[str]:
    """Command lines of the live engines started in ``work``: per-rank infer.py
    processes, or warm vLLM servers."""
    return [p for p in processes_in(work) if "task.py" in p or "_server" in p]


@pytest.mark.vllm
@pytest.mark.parametrize("warm", [True, False], ids=["warm-engines", "per-rank-engines"])
def test_ctrl_c_stops_the_engines_keeps_whole_outputs_and_the_rerun_finishes(tmp_path, warm):
    # Ctrl-C stops new rank jobs and lets the running ones end whole. Warm engines'
    # rank jobs are threads (profiles/local: 32 at once, and 96 ranks were done in 1.5 s,
    # before a loaded machine's signal); two at a time here, so most are left to the
    # rerun.
    ranks = 96 if warm else 4
    work = make_workdir(tmp_path, {f"{r}.in": FOUR for r in range(ranks)})
    logs, results = work / "logs" / "infer", work / "results"
    config = local_config(work, warm_engines=warm)
    run = snakemake(work, "--cores", "2", configfiles=config, popen=True)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:  # until engines run (warm: and serve ranks)
            if warm:
                started = list(results.glob("*.out"))
            else:
                started = [p for p in logs.glob("*.log") if "argv:" in p.read_text()]
            if len(started) >= 2 and engines_in(work):
                break
            assert run.poll() is None, run.stdout.read()
            time.sleep(0.2)
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode != 0, output[-3000:]
    assert processes_in(work) == []  # no engine (nor anything else) left running
    done = sorted(results.glob("*.out"))
    assert len(done) < ranks, "the run was not interrupted"
    assert all(len(read_records(out)) == 4 for out in done)  # whole files only
    # Finished: every .out that exists, also those Snakemake had not yet recorded
    # (see the SIGKILL test).
    mtimes = {o.name: o.stat().st_mtime_ns for o in done}

    rerun = snakemake(work, "--rerun-incomplete", configfiles=config)
    assert_ok(rerun)
    assert planned_ranks(rerun.stdout + rerun.stderr) == [
        str(r) for r in range(ranks) if f"{r}.out" not in mtimes
    ]
    assert all(len(read_records(results / f"{r}.out")) == 4 for r in range(ranks))
    assert {name: (results / name).stat().st_mtime_ns for name in mtimes} == mtimes


def cmdline_of(proc: Path) -> bytes:
    """A process's command line; empty if it ended while /proc was being read."""
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.vllm
def test_an_engine_killed_mid_run_retries_its_in_flight_ranks_and_comes_back(tmp_path):
    ranks = 240  # work for the other engine alone for ~90 s, twice a restart's time
    work = make_workdir(tmp_path, {f"{r}.in": FOUR for r in range(ranks)})
    results = work / "results"
    # long requests (~1 s): a rank is surely in flight on the engine when it is killed
    sampling = dict(temperature=0.8, top_p=0.95, max_tokens=200, seed=None, ignore_eos=True)
    # 4 in flight per engine (the local profile has 16): tile 1 alone then takes longer
    # for the ranks left than tile 0 takes to restart (~45 s), so tile 0 serves some
    config = local_config(work, sampling=sampling, warm={"ranks_in_flight": 4})
    host = os.uname().nodename
    url = "http://127.0.0.1:30500"  # tile 0: tiles.base_port 29500 + 1000
    run = snakemake(work, configfiles=config, popen=True)
    try:
        deadline = time.monotonic() + 900
        while True:  # until tile 0's engine is generating for a rank
            assert run.poll() is None, run.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the engine never served a rank"
            with contextlib.suppress(OSError, ValueError):
                if len(list(results.glob("*.out"))) >= 2 and metric(
                    url, "vllm:num_requests_running"
                ):
                    break
            time.sleep(0.05)
        (server,) = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit()
            and b"--port\x0030500" in (argv := cmdline_of(p))
            and b"watchdog.py" not in argv
            and cwd_of(p) == work.resolve()  # not another run's engine on this machine
        ]
        killed_at = time.time()
        os.kill(server, signal.SIGKILL)
        output, _ = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    # The ranks in flight on tile 0 were sent again to a healthy engine: none failed.
    assert run.returncode == 0, output[-3000:]
    assert all(len(read_records(results / f"{r}.out")) == 4 for r in range(ranks))
    engine_log = the_engine_log(work, host, 0)
    records = [json.loads(p.read_text()) for p in (results / "records").glob("*.json")]
    retried = [r for r in records if r["engine_deaths"]]
    assert retried, "no rank was in flight on the killed engine"
    assert all(r["engine_deaths"] == [f"{host}/tile0"] for r in retried)
    later_on_tile0 = [
        r for r in records
        if r["engine_name"] == f"{host}/tile0" and r["wait_s"] >= 0 and
        (results / f"{r['rank']}.out").stat().st_mtime > killed_at + 1
    ]  # fmt: skip
    assert later_on_tile0, "tile 0's engine was not restarted for the ranks after"
    assert engine_log.read_text().count("Application startup complete") == 2
    assert processes_in(work) == []


def cwd_of(process: Path) -> Path | None:
    try:
        return (process / "cwd").resolve()
    except OSError:
        return None


def hub_cache(root: Path, repo_id: str, model_dir: Path) -> Path:
    """A Hugging Face cache holding ``model_dir`` as ``repo_id``, laid out as the hub lays it."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in model_dir.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return root


@pytest.mark.vllm
def test_hub_model_comes_from_the_shared_cache_and_engines_use_the_model_info_cache(tmp_path):
    work = make_workdir(tmp_path / "run", {"0.in": "Hello there\nThe sky is\n"})
    shared = hub_cache(tmp_path / "shared", "testorg/tiny-opt", REPO / "models" / "tiny-opt")
    weights = {"shared_hf_home": str(shared), "hf_home": str(tmp_path / "project-hf")}
    weights |= {"stage": False, "stage_dir": "/tmp"}
    # per-rank engines: each rank's log shows the engine's command and environment
    config = local_config(work, model="testorg/tiny-opt", weights=weights, warm_engines=False)

    dry = snakemake(work, "-n", configfiles=config)
    assert_ok(dry)
    assert "rule fetch_model" in dry.stdout and planned_ranks(dry.stdout) == ["0"]

    marker_path = work / "results/model/testorg--tiny-opt.json"
    assert_ok(snakemake(work, str(marker_path.relative_to(work)), configfiles=config))
    marker = json.loads(marker_path.read_text())
    assert marker["how"] == f"shared cache {shared}" and marker["path"].startswith(str(shared))
    assert marker["vllm_cache_root"] == str(work / "cache" / "vllm")
    (modelinfo,) = (work / "cache" / "vllm" / "modelinfos").glob("*OPTForCausalLM.json")
    built = modelinfo.stat().st_mtime_ns

    assert_ok(snakemake(work, configfiles=config))
    assert [p for p, _ in read_records(work / "results/0.out")] == ["Hello there", "The sky is"]
    log = (work / "logs/infer/0.log").read_text()
    for setting in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"):
        assert setting in log
    assert f"VLLM_CACHE_ROOT={work / 'cache' / 'vllm'}" in log
    # the engine read the cache rule fetch_model built, it did not build its own
    assert modelinfo.stat().st_mtime_ns == built
    assert not (tmp_path / "project-hf").exists()  # nothing downloaded

    again = snakemake(work, "-n", configfiles=config)
    assert "rule fetch_model" not in again.stdout and planned_ranks(again.stdout) == []


@pytest.mark.vllm
def test_hub_model_in_the_project_cache_when_the_shared_one_lacks_it(tmp_path):
    work = make_workdir(tmp_path / "run", {"0.in": "Hello there\n"})
    project = hub_cache(tmp_path / "project", "testorg/tiny-opt", REPO / "models" / "tiny-opt")
    (tmp_path / "empty-shared").mkdir()
    weights = {"shared_hf_home": str(tmp_path / "empty-shared"), "hf_home": str(project)}
    weights |= {"stage": False, "stage_dir": "/tmp"}
    config = local_config(work, model="testorg/tiny-opt", weights=weights)
    marker_path = work / "results/model/testorg--tiny-opt.json"
    assert_ok(snakemake(work, str(marker_path.relative_to(work)), configfiles=config))
    assert json.loads(marker_path.read_text())["how"] == f"project cache {project}"
