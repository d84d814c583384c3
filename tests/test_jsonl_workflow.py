"""JSONL ranks in the real workflow (profiles/local, echo engines): mixed with .in ranks
in one run, a bad line failing its rank alone, a rank given twice stopping the dry run."""

from __future__ import annotations

import json

from workflow import local_config, make_workdir, read_records, snakemake

BATCH = {
    "custom_id": "c-1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "m", "messages": [{"role": "user", "content": "Hello there"}]},
}


def lines(*items) -> str:
    return "".join(json.dumps(x) + "\n" for x in items)


def test_mixed_in_and_jsonl_ranks_in_one_run(tmp_path):
    work = make_workdir(
        tmp_path,
        {
            "0.in": "one\ntwo\n",
            "1.jsonl": lines({"prompt": "three four", "id": "x"}, BATCH),
            "2.jsonl": lines({"messages": [{"role": "user", "content": "five"}]}),
        },
    )
    # the batch line names model "m": the name the engines answer to (vllm.served_model_name)
    config = local_config(work, engine="echo", vllm={"served_model_name": "m"})
    result = snakemake(work, configfiles=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = work / "results"
    # the .in rank as the seed writes it, byte for byte
    assert read_records(results / "0.out") == [("one", "one"), ("two", "two")]
    first, second = [json.loads(x) for x in (results / "1.jsonl").read_text().splitlines()]
    assert first == {"id": "x", "text": "three four", "finish_reason": "length",
                     "prompt_tokens": 2, "output_tokens": 2}  # fmt: skip
    assert second["custom_id"] == "c-1"
    body = second["response"]["body"]
    assert body["choices"][0]["message"]["content"] == "<|user|> Hello there\n<|assistant|>"
    (only,) = [json.loads(x) for x in (results / "2.jsonl").read_text().splitlines()]
    assert only["id"] == 1 and only["text"] == "<|user|> five\n<|assistant|>"
    # records and summary count requests and tokens the same way for both kinds
    records = {r: json.loads((results / "records" / f"{r}.json").read_text()) for r in "012"}
    assert [records[r]["prompts"] for r in "012"] == [2, 2, 1]
    assert [records[r]["output_tokens"] for r in "012"] == [2, 2 + 4, 3]
    rows = (results / "summary.tsv").read_text().splitlines()
    assert [row.split("\t")[:3] for row in rows[1:]] == [
        ["0", "2", "2"], ["1", "2", "6"], ["2", "1", "3"]]  # fmt: skip
    assert "3 of 3 ranks done" in result.stderr and "5 prompts, 11 output tokens" in result.stderr
    assert not (results / ".partial").exists() or not any((results / ".partial").iterdir())


def test_a_bad_jsonl_line_fails_its_rank_alone(tmp_path):
    work = make_workdir(
        tmp_path,
        {
            "0.in": "one\n",
            "1.jsonl": lines({"prompt": "fine"}, {"messages": [{"role": "robot", "content": "x"}]}),
            "2.jsonl": lines({"prompt": "also fine"}),
        },
    )
    result = snakemake(work, "--keep-going", configfiles=local_config(work, engine="echo"))
    assert result.returncode != 0
    log = (work / "logs" / "infer" / "1.log").read_text()
    assert "ERROR: data/1.jsonl: line 2: message 1: unknown role 'robot'" in log
    results = work / "results"
    assert (results / "0.out").exists() and (results / "2.jsonl").exists()
    assert not (results / "1.jsonl").exists() and not (results / "records" / "1.json").exists()
    assert "rank 1: " in result.stderr and "1 rank(s) failed" in result.stderr


def test_a_rank_as_both_in_and_jsonl_fails_the_dry_run_naming_both(tmp_path):
    work = make_workdir(tmp_path, {"7.in": "a\n", "7.jsonl": lines({"prompt": "a"})})
    result = snakemake(work, "-n", configfiles=local_config(work, engine="echo"))
    assert result.returncode != 0
    assert "several files for one rank: 7.in and 7.jsonl" in result.stdout + result.stderr


def test_a_missing_chat_template_file_fails_the_dry_run_naming_the_key(tmp_path):
    chat = lines({"messages": [{"role": "user", "content": "a"}]})
    work = make_workdir(tmp_path, {"0.jsonl": chat})
    config = local_config(work, engine="echo", vllm={"chat_template": "missing.jinja"})
    result = snakemake(work, "-n", configfiles=config)
    assert result.returncode != 0
    assert "config key 'vllm.chat_template': no such file 'missing.jinja'" in result.stdout
