"""benchmarks/submission_breakdown.py's reading of one submission, per node, and its
table, on the recorded warm submission of tests/data/accounting/ (2 hosts x 4 echo
engines on the OpenPBS test cluster; see tests/test_accounting.py). File reading only:
no PBS, no engine."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import submission_breakdown as breakdown  # noqa: E402
from reporting import accounting  # noqa: E402

DATA = Path(__file__).parent / "data" / "accounting"
PHASES = json.loads((DATA / "pbs" / "1.pbs-head.phases.json").read_text())


def recorded(zero=None) -> dict:
    return breakdown.node_breakdown(DATA, DATA / "pbs", DATA / "engines", zero=zero)


def test_each_node_has_its_own_events_and_parts_that_add_up_to_the_submission():
    run = recorded()
    marks = PHASES["phases"]
    assert list(run["nodes"]) == PHASES["hosts"] == ["node1", "node2"]
    assert run["job"]["start"] == 0
    assert math.isclose(run["job"]["setup"], marks["setup"] - marks["start"])
    assert math.isclose(run["job"]["end"], marks["end"] - marks["start"])
    assert run["job"]["ranks_step"] is None  # recorded before the job noted its ranks' starts
    for part in accounting.PARTS:  # each node alone, added up: the submission's
        per_node = sum(node["parts_s"][part] for node in run["nodes"].values())
        assert math.isclose(per_node, run["parts_s"][part], abs_tol=1e-6), part
    for host, node in run["nodes"].items():
        assert math.isclose(sum(node["parts_s"].values()), node["node_s"])
        assert math.isclose(node["node_s"], marks["end"] - marks["start"])
        assert sorted(node["engines"]) == [f"{host}/tile{t}" for t in range(4)]
        events = node["events"]
        job = run["job"]
        order = [job["staged"], events["engine_started"], events["engine_ready"],
                 events["last_rank_written"], job["ranks_done"], job["end"]]  # fmt: skip
        assert order == sorted(order), (host, order)
        assert events["engine_ready"] == max(e["ready"] for e in node["engines"].values())
        assert events["first_rank_sent"] < events["last_rank_written"]
    assert sum(node["ranks"] for node in run["nodes"].values()) == 30


def test_times_from_another_zero_move_by_the_difference():
    start = PHASES["phases"]["start"]
    moved, kept = recorded(zero=start - 5.0), recorded()
    assert math.isclose(moved["job"]["staged"], kept["job"]["staged"] + 5.0)
    node, other = moved["nodes"]["node2"], kept["nodes"]["node2"]
    for name, at in other["events"].items():
        assert math.isclose(node["events"][name], at + 5.0), name
    assert node["parts_s"] == other["parts_s"]


def test_table_has_a_column_per_node_and_a_row_per_event_and_part():
    login = {"qsub": 0.0, "snakemake_start": -12.5, "exit": 40.0}
    run = recorded() | {"login": login, "pbs_start": 1.0}
    header, rows = breakdown.event_rows({"echo": run})
    assert header == ["event, s from `qsub`", "echo: node1 (head)", "echo: node2"]
    assert [row[0] for row in rows] == [text for _, _, text in breakdown.EVENTS]
    cells = {row[0]: row[1:] for row in rows}
    assert cells["login: `snakemake` starts"] == ["-12.5", "-12.5"]
    assert cells["login: rule summary ends"] == ["-", "-"]  # not in the recorded run
    assert cells["PBS starts the job (`stime`, whole seconds)"] == ["1.0", "1.0"]
    node1 = run["nodes"]["node1"]["events"]["engine_ready"]
    assert cells["the node's engine(s) ready (the last)"][0] == f"{node1:.1f}"
    parts = {row[0]: row[1:] for row in breakdown.part_rows({"echo": run})}
    used = run["nodes"]["node2"]["node_s"]
    assert parts["node-seconds used (job start to end)"][1] == f"{used:.1f}"
    serving = run["nodes"]["node2"]["parts_s"]["serving"]
    share = f"{serving:.1f} ({100 * serving / used:.0f} %)"
    assert parts["serving, node-s (share)"][1] == share
    assert parts["ranks (requests) served"] == [
        f"{n['ranks']} ({n['requests']})" for n in run["nodes"].values()
    ]
    figures = breakdown.summary_of(run)
    parts = run["parts_s"]
    assert figures["start_share"] == (parts["setup"] + parts["engine_start"]) / run["node_s"]
    assert (figures["login_before_qsub_s"], figures["login_after_job_s"]) == (
        12.5, 40.0 - run["job"]["end"])  # fmt: skip
    assert figures["last_engine_ready_s"] == max(
        node["events"]["engine_ready"] for node in run["nodes"].values()
    )


def test_stage_seconds_reads_each_nodes_line_of_the_job_log(tmp_path):
    log = tmp_path / "r0-3.log"
    log.write_text(  # as scripts/model/stage.py prints them (node_step)
        'stage_model: prepare on 2 node(s): ["/opt/pbs/bin/pbsdsh", "--"]\n'
        "preflight: node1: vLLM 0.32.0, XPU devices None\n"
        "stage_model: node1: 2.7 MiB to /tmp/m/node1/tiny-opt in 4.2 s (read from the shared "
        "file system)\n"
        "stage_model: node2: 2.7 MiB to /tmp/m/node2/tiny-opt in 5.0 s (broadcast from node1)\n"
        "stage_model: node1: removed /tmp/m/node1\n"
    )
    assert breakdown.stage_seconds(log) == {"node1": 4.2, "node2": 5.0}
    assert breakdown.stage_seconds(tmp_path / "none.log") == {}
    assert [node["stage_s"] for node in recorded()["nodes"].values()] == [None, None]
