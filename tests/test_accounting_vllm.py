"""Where the node-hours of a local run on real vLLM engines went
(scripts/reporting/accounting.py): the engines' start and ready times from their
registry. The accounting's unit tests: tests/test_accounting.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import workflow as wf
from formats import registry as registry_format
from reporting import accounting, summary, timeline
from test_accounting import ROUNDING_H, panel_title

pytestmark = pytest.mark.vllm


def test_local_warm_vllm_engines_start_and_ready_times_from_their_registry(tmp_path):
    ranks = {f"{i}.in": f"Rank {i} says hello\nThe sky is\n" for i in range(4)}
    work = wf.make_workdir(tmp_path, ranks)
    sampling = {"max_tokens": 4}
    # ports of their own: other sessions on this machine may run engines on the default
    config = wf.local_config(work, sampling=sampling, tiles={"base_port": 33500})
    result = wf.snakemake(work, configfiles=config)
    assert result.returncode == 0, result.stderr[-4000:]
    results = work / "results"
    records = summary.read_records((results / "records").glob("*.json"))
    engines = accounting.parse_tsv((results / "engines.tsv").read_text())
    # the run's two engines (profiles/local), each started once, as the run's engine
    # registry has them (the supervisor of a local run, supervisor.node); ranks start on the
    # first engine ready, and four tiny ranks may all be done before the other one is
    folder = Path(records[0]["engine_log"]).parent
    registry = {e["name"]: e for e in registry_format.read_registry(folder).values()}
    assert sorted(e["engine"] for e in engines) == sorted(registry) and len(engines) == 2
    for engine in engines:
        mine = [r for r in records if r["engine_name"] == engine["engine"]]
        entry = registry[engine["engine"]]
        assert engine["restarts"] == "0" and int(engine["ranks"]) == len(mine)
        if entry["ready_at"] is None:  # stopped at the run's end before it was ready
            assert engine["ready_s"] == "" and not mine
            continue
        ready = entry["ready_at"] - entry["started_at"]
        # ready_s is the supervisor's own wait, a few ms after the engine's start
        assert math.isclose(float(engine["ready_s"]), ready, abs_tol=0.05) and ready > 0
    assert any(registry[e["engine"]]["ready_at"] for e in engines)
    (row,) = accounting.parse_tsv((results / "submissions.tsv").read_text())
    parts = {p: float(row[f"{p}_node_hours"]) for p in accounting.PARTS}
    assert abs(sum(parts.values()) - float(row["node_hours_used"])) <= ROUNDING_H
    # loading the model is most of a tiny run
    assert parts["engine_start"] > parts["serving"] > 0
    assert "wait for an engine" in panel_title((results / "summary.png").read_bytes())
    assert timeline.png_rows((results / "timeline.png").read_bytes()) == [
        e["engine"] for e in engines
    ]
