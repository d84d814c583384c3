"""The workflow end to end with profiles/local, as a user runs it, on echo engines: dry
runs, errors that stop a run before any job starts, failed ranks, progress lines. With the
tiny model on real vLLM: tests/test_workflow_local_vllm.py (it shares this file's
helpers)."""

import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

from model import prepare
from workflow import (
    TINY_MODEL,
    local_config,
    make_workdir,
    planned_ranks,
    read_records,
    snakemake,
)

FOUR = "one\ntwo\nthree\nfour\n"


def prompts_of(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


# --- dry runs and errors that must stop a run before any job starts ---------


def test_dry_run_lists_exactly_the_missing_ranks(tmp_path):
    work = make_workdir(tmp_path, {f"{r}.in": FOUR for r in (0, 1, 2, 5, 12)})
    (work / "results" / "records").mkdir(parents=True)
    for rank in (1, 5):
        (work / "results" / f"{rank}.out").write_text("done\n")
        (work / "results" / "records" / f"{rank}.json").write_text("{}")
    (work / "results" / "records" / "2.json").write_text("{}")  # its .out is missing
    # rule fetch_model's marker, as an earlier run left it (else every rank is pending)
    marker = work / "results" / "model" / f"{prepare.model_slug(str(TINY_MODEL.resolve()))}.json"
    marker.parent.mkdir()
    marker.write_text(json.dumps({"path": str(TINY_MODEL.resolve())}))
    # newer than the outputs: only its existence counts (ancient), not its time
    result = snakemake(work, "-n", configfiles=local_config(work))
    assert_ok(result)
    assert planned_ranks(result.stdout + result.stderr) == ["0", "2", "12"]


@pytest.mark.parametrize(
    "override, key",
    [
        ({"engine": "gpu"}, "engine"),
        ({"sampling": {"top_p": 1.5}}, "top_p"),
        ({"tiles": {"per_node": 0}}, "per_node"),
        ({"vllm": {"long_prompts": "drop"}}, "long_prompts"),
        ({"no_such_key": 1}, "no_such_key"),
    ],
)
def test_bad_config_value_fails_the_dry_run_naming_the_key(tmp_path, override, key):
    work = make_workdir(tmp_path, {"0.in": FOUR})
    result = snakemake(work, "-n", configfiles=local_config(work, **override))
    assert result.returncode != 0
    assert key in result.stdout + result.stderr


@pytest.mark.parametrize(
    "names, expected",
    [
        (["1.in", "x.in", "2b.in"], ["x.in", "2b.in"]),
        (["7.in", "07.in"], ["07.in and 7.in"]),
    ],
)
def test_bad_rank_file_names_fail_the_dry_run(tmp_path, names, expected):
    work = make_workdir(tmp_path, {name: FOUR for name in names})
    result = snakemake(work, "-n", configfiles=local_config(work))
    assert result.returncode != 0
    for text in expected:
        assert text in result.stdout + result.stderr


def test_empty_data_folder_fails_clearly(tmp_path):
    work = make_workdir(tmp_path, {})
    result = snakemake(work, "-n", configfiles=local_config(work))
    assert result.returncode != 0
    assert "has no <rank>.in or <rank>.jsonl files" in result.stdout + result.stderr


def test_missing_local_model_fails_before_any_job(tmp_path):
    work = make_workdir(tmp_path, {"0.in": FOUR})
    result = snakemake(work, configfiles=local_config(work, model="./models/not-built"))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "config key 'model'" in output and "not-built" in output
    assert not (work / "logs").exists()


# --- runs on echo engines -------------------------------------------------


def test_failed_ranks_are_listed_and_the_others_kept(tmp_path):
    work = make_workdir(
        tmp_path,
        {"0.in": FOUR, "1.in": b"fine\n\xff\xfe broken\n", "2.in": FOUR, "3.in": "\n  \n"},
    )
    result = snakemake(work, configfiles=local_config(work, engine="echo"))
    assert result.returncode != 0
    results = work / "results"
    assert read_records(results / "0.out") == [(p, p) for p in prompts_of(work / "data/0.in")]
    assert (results / "2.out").exists()
    assert not (results / "1.out").exists()
    assert "rank 1: logs/infer/1.log" in result.stderr
    # What did finish, from the records, even though the run failed.
    assert "Run summary: 3 of 4 ranks done on 1 host(s): 8 prompts" in result.stderr
    assert not (results / "summary.tsv").exists()  # the table is for complete runs
    assert "1.in" in (work / "logs/infer/1.log").read_text()
    assert "line 2" in (work / "logs/infer/1.log").read_text()
    assert (results / "3.out").read_text() == ""
    assert "WARNING" in (work / "logs/infer/3.log").read_text()


LOCAL_PROGRESS = re.compile(
    r"^progress (?P<clock>[\d:]+)(?: \| [^|]*engines? [^|]*)?"
    r" \| ranks (?P<done>\d+)/(?P<total>\d+) done(?:, (?P<failed>\d+) failed)?"
)


def test_a_local_run_prints_progress_lines_up_to_its_total(tmp_path):
    # per-rank echo engines: a process per rank, two at a time, so the run lasts
    # several progress intervals
    ranks = {f"{i}.in": FOUR for i in range(16)}
    ranks["16.in"] = b"fine\n\xff\xfe broken\n"
    work = make_workdir(tmp_path, ranks)
    config = local_config(work, engine="echo", warm_engines=False, progress_interval_s=0.5)
    result = snakemake(work, "--cores", "2", configfiles=config)
    assert result.returncode != 0  # rank 16
    lines = [m.groupdict() for m in map(LOCAL_PROGRESS.match, result.stderr.splitlines()) if m]
    assert len(lines) >= 2, result.stderr[-3000:]
    assert {line["total"] for line in lines} == {"17"}
    done = [int(line["done"]) for line in lines]
    assert done == sorted(done) and done[-1] == 16, done
    assert lines[-1]["failed"] == "1"
    logged = (work / "logs" / "progress.log").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in logged] == [
        line for line in result.stderr.splitlines() if LOCAL_PROGRESS.match(line)
    ]


def test_no_progress_line_in_a_dry_run(tmp_path):
    work = make_workdir(tmp_path, {f"{i}.in": FOUR for i in range(4)})
    config = local_config(work, engine="echo", progress_interval_s=0.1)
    result = snakemake(work, "-n", configfiles=config)
    assert_ok(result)
    assert not any(LOCAL_PROGRESS.match(line) for line in result.stderr.splitlines())


def processes_in(work: Path) -> list[str]:
    """Command lines of the live processes running in ``work`` (Snakemake, its rank
    tasks, its engines and their workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = (entry / "cwd").resolve()
        except OSError:  # gone, or not a process
            continue
        if cwd == work.resolve() and entry.name != str(os.getpid()):
            found.append(" ".join(a.decode(errors="replace") for a in argv if a))
    return found


def metric(url: str, name: str) -> float:
    """One value of a vLLM server's Prometheus /metrics (summed over its labels)."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"{url}/metrics", timeout=5) as answer:
        lines = answer.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))


def test_a_jobs_snakemake_reads_the_runs_settings_file_not_its_config(tmp_path):
    """The main Snakemake writes the run's settings file (formats/settings.py); the
    Snakemake of a PBS job (here in remote mode, as a job script starts it) reads the file
    its job script exports, whatever its own config files say."""
    from formats import settings as run_settings

    work = make_workdir(tmp_path, {"0.in": FOUR})
    assert_ok(snakemake(work, "-n", configfiles=local_config(work, engine="echo")))
    (path,) = (work / run_settings.FOLDER).glob("*.json")
    assert run_settings.read_settings(path).engine == "echo"
    job = ["--mode", "remote", "--cores", "2", "--target-jobs", "infer:rank=0"]
    vllm = local_config(work, engine="vllm")  # needs rule fetch_model's marker first
    result = snakemake(work, *job, configfiles=vllm, env={run_settings.VARIABLE: str(path)})
    assert_ok(result)
    echoed = [(p, p) for p in prompts_of(work / "data" / "0.in")]
    assert read_records(work / "results" / "0.out") == echoed
    assert list((work / run_settings.FOLDER).glob("*.json")) == [path]
