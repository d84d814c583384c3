"""Where the node-hours went (scripts/reporting/accounting.py): results/submissions.tsv,
results/engines.tsv and results/timeline.png.

The unit tests read tests/data/accounting/, the records, engine registry, phases file
and submission index of a real warm submission on the OpenPBS test cluster (the run of
tests/test_accounting_pbs.py's `test_warm_submission_accounts_for_every_node_second`,
copied as it was), and local echo runs. Real vLLM: `assert_local_warm_vllm_accounting`,
called on the first run of test_workflow_local.py's seeded test (one run of real engines).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

import workflow as wf
from formats import registry as registry_format
from formats.files import safe_name
from reporting import accounting, summary, timeline

DATA = Path(__file__).parent / "data" / "accounting"
# submissions.tsv's node-hours have 6 decimals: each of the 5 parts may be off by half
# of the last one.
ROUNDING_H = 5 * 0.5e-6 + 1e-9


def recorded_run():
    records = summary.read_records(sorted((DATA / "records").glob("*.json")))
    return records, dict(pbs_logs=DATA / "pbs", engine_logs=DATA / "engines")


def test_recorded_submission_parts_add_up_to_its_node_seconds():
    records, logs = recorded_run()
    (sub,) = accounting.submissions(records, **logs)
    (row,) = accounting.read_index(DATA / "pbs")
    phases = json.loads(accounting.phases_path(DATA / "pbs", row["id"]).read_text())
    marks = phases["phases"]
    assert sub.id == row["id"] and not sub.estimated
    assert sub.nodes == len(phases["hosts"]) == row["nodes"]
    assert math.isclose(sub.used_s, sub.nodes * (marks["end"] - marks["start"]))
    assert math.isclose(sum(sub.parts.values()), sub.used_s)
    assert all(seconds > 0 for seconds in sub.parts.values()), sub.parts
    # set-up and stop: every node, from the phases the job script noted
    assert math.isclose(sub.parts["setup"], sub.nodes * (marks["staged"] - marks["start"]))
    assert math.isclose(sub.parts["stop"], sub.nodes * (marks["end"] - marks["ranks_done"]))
    # every rank on one of the registry's engines, each engine a quarter of its node
    registry = accounting.read_registry(DATA / "engines" / safe_name(row["id"]))
    assert sorted(s.name for s in sub.slots) == sorted(e["name"] for e in registry)
    per_node = len(registry) // sub.nodes
    assert sum(len(s.records) for s in sub.slots) == len(records)
    # one rank in flight per engine: serving is the sum of the requests
    requests = sum(r["request_s"] for r in records)
    assert math.isclose(sub.parts["serving"], requests / per_node, rel_tol=1e-6)
    starting = sum(e["ready_at"] - marks["staged"] for e in registry) / per_node
    assert math.isclose(sub.parts["engine_start"], starting, rel_tol=1e-6)


def test_recorded_tables_and_timeline(tmp_path):
    records, logs = recorded_run()
    subs = summary.write_accounting(
        records, tmp_path / "s.tsv", tmp_path / "e.tsv", tmp_path / "t.png", **logs
    )
    (row,) = accounting.parse_tsv((tmp_path / "s.tsv").read_text())
    parts = [float(row[f"{p}_node_hours"]) for p in accounting.PARTS]
    assert abs(sum(parts) - float(row["node_hours_used"])) <= ROUNDING_H
    assert float(row["node_hours_used"]) < float(row["node_hours_requested"])
    engines = accounting.parse_tsv((tmp_path / "e.tsv").read_text())
    assert [e["engine"] for e in engines] == [s.name for s in subs[0].slots]
    assert sum(int(e["ranks"]) for e in engines) == len(records)
    assert sum(int(e["output_tokens"]) for e in engines) == sum(r["output_tokens"] for r in records)
    for engine in engines:
        assert engine["host"] and engine["tile"] and float(engine["ready_s"]) > 0
        assert engine["restarts"] == "0" and 0 < float(engine["busy_fraction"]) <= 1
    png = (tmp_path / "t.png").read_bytes()
    assert timeline.png_rows(png) == [f"{row['submission']} {e['engine']}" for e in engines]
    paragraph = accounting.paragraph(subs)
    assert paragraph.startswith(f"Node-hours, {row['name']} ({row['submission']}, 2 node(s)")


def test_a_record_written_after_its_submission_ended_is_local():
    records, logs = recorded_run()
    later = dict(records[0], _end=records[0]["_end"] + 3600)
    subs = accounting.submissions([later, *records[1:]], **logs)
    assert [s.id for s in subs] == [subs[0].id, accounting.LOCAL]
    assert [len(s.records) for s in subs[1].slots] == [1]


def test_phases_file_is_written_atomically_and_names_bad_phases(tmp_path):
    nodes = tmp_path / "nodes"
    nodes.write_text("node2\nnode2\nnode1\n")
    env = {"PBS_JOBID": "12.server", "PBS_NODEFILE": str(nodes)}
    path = accounting.record_phases(tmp_path, ["setup", "start=100.5"], env, now=lambda: 200.0)
    assert path == tmp_path / "12.server.phases.json"
    accounting.record_phases(tmp_path, ["staged"], env, now=lambda: 300.0)
    data = json.loads(path.read_text())
    assert data == {
        "job_id": "12.server",
        "hosts": ["node2", "node1"],
        "phases": {"setup": 200.0, "start": 100.5, "staged": 300.0},
    }
    with pytest.raises(SystemExit, match="unknown phase 'later'"):
        accounting.record_phases(tmp_path, ["later"], env)
    with pytest.raises(SystemExit, match="not a time"):
        accounting.record_phases(tmp_path, ["end=soon"], env)
    assert json.loads(path.read_text()) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["nodes", path.name])


def slot(name, host, busy=(), ready_at=None, restart_s=0.0, registered=True):
    return accounting.Slot(
        name=name,
        host=host,
        tile="0",
        ready_at=ready_at,
        restart_s=restart_s,
        registered=registered,
        records=[{}] * len(busy),
        busy_intervals=list(busy),
    )


def test_engines_that_never_came_up_restarted_or_are_missing_are_counted():
    # window: start 0, staged 10, ranks done 110, end 120; 3 nodes
    ok = slot("a/tile0", "a", busy=[(20, 50), (40, 60)], ready_at=20, restart_s=5)
    failed = slot("a/tile1", "a")  # never ready: starting all along
    parts = accounting.account([ok, failed], ["a", "b", "c"], 0, 10, 110, 120)
    assert parts["setup"] == 30 and parts["stop"] == 30
    # a: busy 20-60 (40 s), start 10-20 plus 5 s of restart, idle the rest; tile1 all
    # start; b and c have no engine: idle
    assert parts["serving"] == 40 / 2
    assert parts["engine_start"] == (15 + 100) / 2
    assert parts["idle"] == (100 - 40 - 15) / 2 + 200
    assert math.isclose(sum(parts.values()), 3 * 120)


def test_many_engines_get_one_timeline_row_per_node():
    hosts = [f"x{n}" for n in range(10)]
    slots = [
        slot(f"{h}/tile{t}", h, busy=[(10 + t, 20 + t)], ready_at=5)
        for h in hosts
        for t in range(12)
    ]
    parts = accounting.account(slots, hosts, 0, 5, 40, 41)
    sub = accounting.Submission("1.s", "r0-119", 10, "00:10:00", hosts, 0, 5, 40, 41, slots, parts)
    assert timeline.row_names([sub]) == [f"1.s {h}" for h in hosts]
    shares = timeline.busy_shares(sub, bins=35)  # 1 s bins
    assert len(shares) == 10 and all(0 <= x <= 1 for row in shares for x in row)
    # each node: 12 engines x 10 s of requests
    assert all(math.isclose(sum(row) * 12, 120) for row in shares)
    assert shares[0][:5] == [0] * 5 and shares[0][5] == 1 / 12
    assert timeline.png_rows(timeline.timeline_png([sub])) == [f"1.s {h}" for h in hosts]


# --- the summary plot fits the mode ----------------------------------------------------


def panel_title(png: bytes) -> str:
    import PIL.Image

    return PIL.Image.open(io.BytesIO(png)).text["Description"]


@pytest.mark.parametrize("warm", [True, False], ids=["warm-engines", "per-rank-engines"])
def test_local_echo_run_writes_engines_submission_and_timeline(tmp_path, warm):
    ranks = {f"{i}.in": "".join(f"rank {i} line {j}\n" for j in range(1 + i % 3)) for i in range(6)}
    work = wf.make_workdir(tmp_path, ranks)
    result = wf.snakemake(work, configfiles=wf.local_config(work, engine="echo", warm_engines=warm))
    assert result.returncode == 0, result.stderr[-4000:]
    results = work / "results"
    records = summary.read_records((results / "records").glob("*.json"))
    (row,) = accounting.parse_tsv((results / "submissions.tsv").read_text())
    assert (row["submission"], row["name"], row["nodes"]) == ("local", "one local node", "1")
    assert row["ranks"] == "6" and row["node_hours_requested"] == ""
    parts = [float(row[f"{p}_node_hours"]) for p in accounting.PARTS]
    assert abs(sum(parts) - float(row["node_hours_used"])) <= ROUNDING_H
    engines = accounting.parse_tsv((results / "engines.tsv").read_text())
    hosts = {r["host"] for r in records}
    if warm:  # the run's echo servers, one per tile slot (profiles/local: 2), as registered
        (host,) = hosts
        assert [e["engine"] for e in engines] == [f"{host}/tile0", f"{host}/tile1"]
        assert all(float(e["ready_s"]) > 0 for e in engines)
    else:  # one engine per rank on each tile slot (profiles/local: 2)
        assert sorted(e["engine"] for e in engines) == sorted(
            f"{r['host']}/tile{r['tiles']}" for r in {r["tiles"]: r for r in records}.values()
        )
        assert all(float(e["ready_s"]) > 0 for e in engines)
    assert sum(int(e["ranks"]) for e in engines) == 6
    assert sum(int(e["prompts"]) for e in engines) == sum(r["prompts"] for r in records)
    picture = (results / "timeline.png").read_bytes()
    assert timeline.png_rows(picture) == [e["engine"] for e in engines]
    title = panel_title((results / "summary.png").read_bytes())
    if warm:
        assert "wait for an engine" in title and "request time" in title
    else:
        assert title.startswith("model load time per rank")
    assert "Node-hours, one local node" in result.stderr


def test_per_rank_tiles_no_rank_used_are_idle():
    used = accounting.Slot(
        name="a/tile0",
        host="a",
        tile="0",
        records=[{}],
        start_intervals=[(10, 30)],
        busy_intervals=[(30, 50)],
    )
    parts = accounting.account([used], ["a"], 0, 10, 110, 110, tile_slots=4)
    assert parts == {
        "setup": 10,
        "engine_start": 20 / 4,
        "serving": 20 / 4,
        "idle": 60 / 4 + 3 * 100 / 4,
        "stop": 0,
    }
    assert accounting.tile_slots({"warm_engines": True}) is None
    assert (
        accounting.tile_slots({"warm_engines": False, "tiles": {"per_node": 12, "per_job": 2}}) == 6
    )


def assert_local_warm_vllm_accounting(work: Path) -> None:
    """A local run of warm vLLM engines (profiles/local) on a few short ranks: the engines'
    start and ready times come from their registry, and the node-hours add up. (Called by
    test_workflow_local.test_sampling_seed_makes_reruns_identical on its first run: one
    run of real engines for both.)"""
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
