"""Where the node-hours of submissions on the OpenPBS test cluster went
(scripts/reporting/accounting.py): a warm submission of echo engines and a per-rank one.
The accounting's unit tests: tests/test_accounting.py."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from formats.files import safe_name
from pbs_runs import (
    aurora_folder,
    delete_our_jobs,
    job_seconds,
    output_of,
    run_aurora,
    submissions,
    warm_folder,
)
from reporting import accounting, summary, timeline
from test_accounting import ROUNDING_H

pytestmark = pytest.mark.pbs


def test_warm_submission_accounts_for_every_node_second(pbs_cluster, tmp_path):

    # 32 uneven ranks on 2 nodes x 4 engines, one request per engine at a time: the
    # last ones leave most engines idle. Two are JSONL ranks (short lines, text parts,
    # an OpenAI batch line), served by the same engines and counted alike.
    ranks = {f"{i}.in": "".join(f"rank {i} p{j}\n" for j in range(1 + i % 4)) for i in range(30)}
    text_parts = [{"type": "text", "text": "rank 30"}, {"type": "text", "text": "p1"}]
    batch = {
        "custom_id": "r31",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "rank 31 p0"},
            ],
        },
    }
    jsonl = {"30.jsonl": [{"id": "a", "prompt": "rank 30 p0"},
                          {"messages": [{"role": "user", "content": text_parts}], "max_tokens": 4}],
             "31.jsonl": [batch]}  # fmt: skip
    ranks |= {name: "".join(json.dumps(x) + "\n" for x in lines) for name, lines in jsonl.items()}
    work = warm_folder(
        tmp_path,
        ranks,
        tiles={"per_node": 4},
        pbs={"nodes_per_submission": 2},
        warm={"ranks_per_engine": 4, "ranks_in_flight": 1},
        task_env={"ECHO_SERVER_DELAY_S": "1"},
    )
    try:
        res = run_aurora(pbs_cluster, work)
        assert res.returncode == 0, output_of(res)
        (submission,) = submissions(work)
        pbs_seconds = job_seconds(pbs_cluster, submission["id"])
    finally:
        delete_our_jobs(pbs_cluster, work)
    results = work / "results"
    (row,) = accounting.parse_tsv((results / "submissions.tsv").read_text())
    assert (row["submission"], row["nodes"], row["engines"], row["ranks"]) == (
        submission["id"],
        "2",
        "8",
        "32",
    )
    used = float(row["node_hours_used"])
    parts = {p: float(row[f"{p}_node_hours"]) for p in accounting.PARTS}
    assert abs(sum(parts.values()) - used) <= ROUNDING_H, row
    assert all(hours > 0 for hours in parts.values()), row
    # within what PBS counted (whole seconds) and what was asked for
    assert used * 3600 <= 2 * (pbs_seconds + 1) and used < float(row["node_hours_requested"])
    # the job script noted every phase, in order
    phases_file = accounting.phases_path(work / "logs" / "pbs", submission["id"])
    phases = json.loads(phases_file.read_text())
    times = [phases["phases"][p] for p in accounting.PHASES]
    assert times == sorted(times) and len(phases["hosts"]) == 2
    registry = work / "logs" / "engines" / safe_name(submission["id"])
    names = sorted(json.loads(p.read_text())["name"] for p in registry.glob("*.json"))
    engines = accounting.parse_tsv((results / "engines.tsv").read_text())
    assert sorted(e["engine"] for e in engines) == names and len(names) == 8
    assert sum(int(e["ranks"]) for e in engines) == 32
    assert all(0 < float(e["busy_fraction"]) <= 1 for e in engines)
    rows = timeline.png_rows((results / "timeline.png").read_bytes())
    assert rows == [f"{submission['id']} {e['engine']}" for e in engines]
    assert f"Node-hours, r0-31 ({submission['id']}, 2 node(s), 8 engine(s))" in res.stderr
    # the JSONL ranks' answers (echo engines: the prompt, or the rendered chat, back)
    short, from_parts = [json.loads(x) for x in (results / "30.jsonl").read_text().splitlines()]
    assert short == {"id": "a", "text": "rank 30 p0", "finish_reason": "length",
                     "prompt_tokens": 3, "output_tokens": 3}  # fmt: skip
    # text parts: joined by newlines, as vLLM joins them
    assert from_parts == {"id": 2, "text": "<|user|> rank 30\np1\n<|assistant|>",
                          "finish_reason": "length", "prompt_tokens": 5,
                          "output_tokens": 5}  # fmt: skip
    (line,) = [json.loads(x) for x in (results / "31.jsonl").read_text().splitlines()]
    assert (line["custom_id"], line["error"], line["response"]["status_code"]) == ("r31", None, 200)
    assert line["id"].startswith("batch_req_")
    body = line["response"]["body"]
    # a line naming no model is answered under the served name (config model as given)
    served = json.loads((results / "records" / "31.json").read_text())["served_model_name"]
    assert (body["object"], body["model"]) == ("chat.completion", served) and served
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content":
        "<|system|> Be brief.\n<|user|> rank 31 p0\n<|assistant|>"},
        "finish_reason": "length", "logprobs": None}]  # fmt: skip
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16}
    for rank, prompts, tokens in ((30, 2, 3 + 5), (31, 1, 8)):
        record = json.loads((results / "records" / f"{rank}.json").read_text())
        assert (record["prompts"], record["prompt_tokens"], record["output_tokens"]) == (
            prompts, tokens, tokens)  # fmt: skip
        assert record["engine_name"] and record["client_node"] == record["host"], record
    assert not (results / ".partial").exists() or not any((results / ".partial").iterdir())
    # keep this run for the unit tests above (tests/data/accounting) when asked to
    keep = Path(os.environ.get("KEEP_ACCOUNTING_RUN", ""))
    if keep.name:
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(results / "records", keep / "records")
        shutil.copytree(registry, keep / "engines" / registry.name, ignore=_logs)
        (keep / "pbs").mkdir()
        for path in (work / "logs" / "pbs" / "submissions.tsv", phases_file):
            shutil.copy(path, keep / "pbs" / path.name)


def _logs(_folder, names):
    return [n for n in names if not n.endswith(".json")]


def test_per_rank_submission_accounts_for_every_node_second(pbs_cluster, tmp_path):
    ranks = {f"{i}.in": "".join(f"rank {i} p{j}\n" for j in range(1 + i % 2)) for i in range(8)}
    work = aurora_folder(tmp_path, ranks, tiles={"per_node": 4}, pbs={"nodes_per_submission": 2})
    try:
        res = run_aurora(pbs_cluster, work)
    finally:
        delete_our_jobs(pbs_cluster, work)
    assert res.returncode == 0, output_of(res)
    (row,) = accounting.parse_tsv((work / "results" / "submissions.tsv").read_text())
    # the tiles the ranks used (one echo rank after another may reuse a tile)
    records = summary.read_records((work / "results" / "records").glob("*.json"))
    used = {(r["host"], r["tiles"]) for r in records}
    assert (row["nodes"], row["engines"], row["ranks"]) == ("2", str(len(used)), "8")
    parts = {p: float(row[f"{p}_node_hours"]) for p in accounting.PARTS}
    assert abs(sum(parts.values()) - float(row["node_hours_used"])) <= ROUNDING_H, row
    # each rank's own engine: its interpreter start and (echo: no) model load
    assert parts["engine_start"] > 0 and parts["idle"] > 0, row
    phases_file = accounting.phases_path(work / "logs" / "pbs", row["submission"])
    phases = json.loads(phases_file.read_text())
    assert sorted(phases["phases"]) == sorted(accounting.PHASES)
    engines = accounting.parse_tsv((work / "results" / "engines.tsv").read_text())
    assert sorted(e["engine"] for e in engines) == sorted(f"{h}/tile{t}" for h, t in used)
    assert sum(int(e["ranks"]) for e in engines) == 8
    # 4 tile slots per node: the ones no rank used are idle, not missing
    (sub,) = accounting.submissions(
        records, work / "logs" / "pbs", work / "logs" / "engines", tile_slots=4
    )
    assert math.isclose(sum(sub.parts.values()), sub.used_s)
    starting = sum(b - a for s in sub.slots for a, b in s.start_intervals)
    assert math.isclose(sub.parts["engine_start"], starting / 4, rel_tol=1e-6)
