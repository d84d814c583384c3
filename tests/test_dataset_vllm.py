"""A Parquet dataset through the tiny model (profiles/local, warm engines): its prompt
column answered in results/<name>.parquet, in row order, beside the carried columns."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from workflow import local_config, make_workdir, numbers_table, snakemake


@pytest.mark.vllm
def test_a_parquet_dataset_round_trip_with_carried_columns(tmp_path):
    work = make_workdir(tmp_path, {})
    (work / "inputs").mkdir()
    rows = 13
    table = numbers_table(rows)
    pq.write_table(table, work / "inputs" / "numbers.parquet", row_group_size=4)
    dataset = {"input": "inputs/numbers.parquet", "rank_size": 5, "carry": ["label", "meta"]}
    config = local_config(work, dataset=dataset, sampling={"max_tokens": 4, "seed": 7})
    result = snakemake(work, configfiles=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got = pq.read_table(work / "results" / "numbers.parquet")
    assert got.column_names == ["label", "meta", "id", "text", "finish_reason",
                                "prompt_tokens", "output_tokens", "error"]  # fmt: skip
    assert got.schema.field("meta").type == table.schema.field("meta").type
    answers = got.to_pylist()
    assert [a["label"] for a in answers] == table.column("label").to_pylist()
    assert [a["meta"] for a in answers] == table.column("meta").to_pylist()
    assert [a["id"] for a in answers] == [str(i) for i in range(rows)]
    # each row's answer is its rank's answer line, in order
    lines = [
        json.loads(line)
        for rank in range(3)
        for line in (work / "results" / "numbers" / f"{rank}.jsonl").read_text().splitlines()
    ]
    assert [(a["text"], a["output_tokens"]) for a in answers] == [
        (x["text"], x["output_tokens"]) for x in lines
    ]
    assert all(a["error"] is None and a["prompt_tokens"] > 0 for a in answers)
    assert all(0 < a["output_tokens"] <= 4 for a in answers)
    # a rerun redoes nothing
    again = snakemake(work, configfiles=config)
    assert "Nothing to be done" in again.stdout + again.stderr
