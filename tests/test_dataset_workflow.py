"""A dataset through the real workflow (profiles/local): 20,000 requests in 1,000 ranks
on echo engines cut, answered and merged in order; killed mid-run and rerun with nothing
redone; lines appended and only the changed and new ranks answered. (The issue asked for
a million requests: that takes 5 minutes on a quiet 2-core machine and over 30 on a
loaded one, so the million runs in benchmarks/datasets.py; the rank count, which is what
Snakemake and the cut's bookkeeping see, is the same here, with 20 requests a rank.) A
Hugging Face datasets folder answered in results/<name>.parquet beside its carried
columns, and saved again with one row changed: only that row's rank answered again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from workflow import (
    REPO,
    SNAKEMAKE,
    local_config,
    make_workdir,
    numbers_table,
    planned_ranks,
    snakemake,
    write_datasets_folder,
)

UNLOCK_STALE = REPO / "scripts" / "tools" / "unlock_stale.py"
REQUESTS, RANK_SIZE = 20_000, 20
APPENDED = RANK_SIZE * 3 // 2  # a full rank and half of one


def write_requests(path: Path, start: int, stop: int, mode="w") -> None:
    with open(path, mode) as handle:
        handle.writelines(
            json.dumps(
                {"custom_id": f"r{i}", "url": "/v1/completions", "body": {"prompt": f"q {i}"}}
            )
            + "\n"
            if i % 3 == 0
            else json.dumps({"prompt": f"q {i}"}) + "\n"
            for i in range(start, stop)
        )


def assert_merged_in_order(answers: Path, count: int) -> None:
    with open(answers) as handle:
        for i, raw in enumerate(handle):
            line = json.loads(raw)
            text = line["response"]["body"]["choices"][0]["text"] if i % 3 == 0 else line["text"]
            assert text == f"q {i}", (i, line)
            assert line.get("custom_id", line.get("id")) == (f"r{i}" if i % 3 == 0 else i + 1)
    assert i + 1 == count


def test_a_dataset_of_1000_ranks_killed_rerun_and_appended(tmp_path):
    work = make_workdir(tmp_path, {})
    (work / "inputs").mkdir()
    dataset = work / "inputs" / "million.jsonl"
    write_requests(dataset, 0, REQUESTS)
    config = local_config(
        work, engine="echo", dataset={"input": "inputs/million.jsonl", "rank_size": RANK_SIZE}
    )
    ranks, results = work / "data" / "million", work / "results" / "million"
    run = snakemake(work, configfiles=config, popen=True)
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline and len(list(results.glob("*.jsonl"))) < 100:
            assert run.poll() is None, run.stdout.read()[-3000:]
            time.sleep(0.2)
    finally:
        run.kill()
        run.wait()
    cut_at = {p.name: p.stat().st_mtime_ns for p in ranks.glob("*.jsonl")}
    assert len(cut_at) == REQUESTS // RANK_SIZE
    done = {p.name: p.stat().st_mtime_ns for p in results.glob("*.jsonl")}
    assert 100 <= len(done) < len(cut_at)
    unlock = subprocess.run(
        [sys.executable, str(UNLOCK_STALE), "profiles/local", *SNAKEMAKE,
         "--configfile", *map(str, config)],
        cwd=work, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert unlock.returncode == 0, unlock.stderr
    rerun = snakemake(work, configfiles=config)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    # nothing cut again, no finished rank answered again
    assert "cut_dataset" not in rerun.stdout + rerun.stderr
    assert {p.name: p.stat().st_mtime_ns for p in ranks.glob("*.jsonl")} == cut_at
    assert all(results.joinpath(n).stat().st_mtime_ns == t for n, t in done.items())
    assert len(planned_ranks(rerun.stdout + rerun.stderr)) == len(cut_at) - len(done)
    answers = work / "results" / "million.jsonl"
    assert_merged_in_order(answers, REQUESTS)

    # lines more: the last rank was full, so two new ranks and nothing else
    write_requests(dataset, REQUESTS, REQUESTS + APPENDED, mode="a")
    again = snakemake(work, configfiles=config)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert planned_ranks(again.stdout + again.stderr) == ["1000", "1001"]
    assert_merged_in_order(answers, REQUESTS + APPENDED)
    # and once more, 10 lines: only the partly filled last rank
    write_requests(dataset, REQUESTS + APPENDED, REQUESTS + APPENDED + 10, mode="a")
    last = snakemake(work, configfiles=config)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert planned_ranks(last.stdout + last.stderr) == ["1001"]
    assert_merged_in_order(answers, REQUESTS + APPENDED + 10)
    assert "1,002 of 1,002 ranks done" in last.stderr
    assert snakemake(work, "-n", configfiles=config).stdout.count("rule infer") == 0


def test_a_datasets_folder_answered_beside_its_carried_columns(tmp_path):
    work = make_workdir(tmp_path, {})
    rows = 13
    table = numbers_table(rows)
    shards = write_datasets_folder(work / "inputs" / "numbers", table, shards=2, batch_rows=4)
    dataset = {"input": "inputs/numbers", "rank_size": 5, "carry": ["label", "meta"]}
    config = local_config(work, engine="echo", dataset=dataset)
    result = snakemake(work, configfiles=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    answers = work / "results" / "numbers.parquet"
    got = pq.read_table(answers)
    assert got.column_names == ["label", "meta", "id", "text", "finish_reason",
                                "prompt_tokens", "output_tokens", "error"]  # fmt: skip
    assert got.schema.field("meta").type == table.schema.field("meta").type
    assert got.column("label").to_pylist() == table.column("label").to_pylist()
    assert got.column("meta").to_pylist() == table.column("meta").to_pylist()
    assert got.column("id").to_pylist() == [str(i) for i in range(rows)]
    assert got.column("text").to_pylist() == table.column("prompt").to_pylist()  # echoed
    assert sorted(p.name for p in (work / "data" / "numbers").glob("*.jsonl")) == [
        "0.jsonl", "1.jsonl", "2.jsonl"
    ]  # fmt: skip
    again = snakemake(work, configfiles=config)
    assert "Nothing to be done" in again.stdout + again.stderr
    # saved again with the last prompt changed: its shard (only) differs, and only the
    # last rank is answered again
    prompts = table.column("prompt").to_pylist()[:-1] + ["The last number is"]
    changed = table.set_column(0, "prompt", pa.array(prompts))
    shutil.rmtree(work / "inputs" / "numbers")
    assert write_datasets_folder(work / "inputs" / "numbers", changed, 2, 4) == shards
    third = snakemake(work, configfiles=config)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "cut_dataset" in third.stdout + third.stderr
    assert planned_ranks(third.stdout + third.stderr) == ["2"]
    now = pq.read_table(answers)
    assert now.column("text").to_pylist() == prompts
    assert now.column("label").to_pylist() == table.column("label").to_pylist()
