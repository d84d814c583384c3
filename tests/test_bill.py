"""The bill before the qsub (scripts/dataset/bill.py): an estimate from the history of an
earlier run of the same settings, the walltimes it gives, hand-set keys overriding it,
the budget's stop, and what is said with no history."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from dataset import bill
from formats import history
from formats.settings import from_config
from pbs import plan, provider_settings
from pbs.settings import RunInfo
from reporting import accounting
from workflow import REPO, aurora_config, deep_merge


def history_line(tmp_path, config, **fields) -> Path:
    path = tmp_path / "history.jsonl"
    entry = {
        "settings": history.settings_key(config, "m", "pbs"), "model": "m", "engine": "vllm",
        "where": "pbs", "requests": 12_000, "ranks": 12, "output_tokens": 1_200_000,
        "prompt_tokens": 0, "nodes": 1, "node_s": 1000.0, "work_node_s": 600.0, "fixed_s": 400.0,
    } | fields  # fmt: skip
    history.append(entry, path)
    return path


def test_no_history_says_so_and_how_to_get_one(tmp_path):
    config = aurora_config()
    assert bill.estimate_of(config, "m", "pbs", tmp_path / "none.jsonl") is None
    settings = provider_settings(bill.run_config(from_config(config), "d", "r", None, 1000))
    assert (settings["start_minutes"], settings["rank_minutes"]) == (15, 1)  # as before
    text, hours = bill.bill(2000, 2, [1000, 1000], settings, None, pbs=True)
    assert "No estimate: no earlier run of this model and these engine settings" in text
    assert "run a small sample first" in text
    # a sample as busy as a node of this run: 2 ranks at once here (2 pending)
    assert "(e.g. the first 2,000 lines as a dataset of their own: 2 ranks, as many" in text
    # what the walltimes ask for is what a budget is held against
    assert hours == pytest.approx(1 * (15 + 1 + 10) / 60)


def test_the_estimate_rests_on_the_history_and_sets_the_walltimes(tmp_path):
    config = aurora_config(pbs={"nodes_per_submission": 2, "estimate_margin_percent": 50})
    path = history_line(tmp_path, config)
    other = aurora_config(sampling={"max_tokens": 999})
    assert bill.estimate_of(other, "m", "pbs", path) is None  # other settings: not this one
    estimate = bill.estimate_of(config, "m", "pbs", path)
    assert estimate.node_s_per_request == pytest.approx(0.05)
    resolved = bill.run_config(from_config(config), "d", "r", estimate, 1000)
    assert (resolved.data_dir, resolved.results_dir) == ("d", "r")  # the rank folders
    # start: 400 s x 1.5 = 10 min; a rank: 1000 requests x 0.05 node-s x 12 engines x 1.5
    assert resolved.warm.start_minutes == 10
    assert resolved.warm.rank_minutes == pytest.approx(1000 * 0.05 * 12 * 1.5 / 60)
    settings = provider_settings(resolved)
    # 480 ranks of 1000 requests: 240 ranks per submission (2 nodes x 12 engines x 10)
    pending = [1000] * 480
    text, hours = bill.bill(480_000, 480, pending, settings, estimate, pbs=True, margin_percent=50)
    # each submission: 400 s + 240,000 requests x 0.05 node-s / 2 nodes = 6,400 s on 2 nodes
    assert hours == pytest.approx(2 * 2 * 6400 / 3600)
    # walltime: 10 + ceil(10 ranks per engine x 15 min) + 10 = 170 min, the estimate's 107
    # min plus 50% plus the margin
    assert plan.submission_minutes(settings, 240, 2) == 10 + 150 + 10
    assert "2 submission(s) (2 x 2 node(s)), walltime 02:50:00" in text
    assert "resting on the run of" in text and "12,000 requests" in text
    assert "walltimes are the estimate + 50% + 10 min" in text
    # hand-set keys still win
    hand_set = deep_merge(config, {"warm": {"rank_minutes": 3}})
    hand = bill.run_config(from_config(hand_set), "d", "r", estimate, 1000)
    assert hand.warm.rank_minutes == 3 and hand.warm.start_minutes == 10


def test_a_run_busier_than_its_sample_is_told_the_estimate_is_likely_high(tmp_path):
    config = aurora_config(pbs={"nodes_per_submission": 2})
    settings = provider_settings(from_config(config))
    pending = [1000] * 480  # 240 ranks a submission of 2 nodes: 120 at once on a node
    for at_once, told in ((2, True), (100, False), (None, False)):
        fields = {} if at_once is None else {"ranks_at_once": at_once}
        path = history_line(tmp_path / str(at_once), config, **fields)
        estimate = bill.estimate_of(config, "m", "pbs", path)
        text, _ = bill.bill(480_000, 480, pending, settings, estimate, pbs=True)
        note = "ranks at once on a node, this one up to 120: engines answer more per second"
        assert (note in text) is told, text
    # a submission of fewer ranks than the engines' slots: that many at once
    assert bill.at_once([1000] * 7, settings, [(7, 1)]) == 7
    assert bill.at_once([1000] * 7, settings) == 7  # local: one node


def test_ranks_at_once_of_a_run_are_its_fullest_nodes_ranks_up_to_their_slots():
    config = aurora_config(warm={"ranks_per_engine": 2})
    settings = provider_settings(from_config(config))  # 24 slots

    def sub(ranks: int, nodes: int) -> accounting.Submission:
        slots = [accounting.Slot(f"e{i}", "h", str(i), records=[{}]) for i in range(ranks)]
        return accounting.Submission("1", "r", nodes, "01:00:00", [], 0, 1, 2, 3, slots, {})

    assert bill.ranks_at_once([sub(2, 1)], settings) == 2
    assert bill.ranks_at_once([sub(30, 2), sub(5, 1)], settings) == 15
    assert bill.ranks_at_once([sub(100, 1)], settings) == 24


def test_a_bill_above_the_budget_stops_saying_by_how_much(tmp_path):
    assert bill.budget_problem(4.0, None, 0.0) is None
    assert bill.budget_problem(4.0, 10.0, 5.0) is None
    problem = bill.budget_problem(4.0, 10.0, 7.5)
    assert problem.startswith("the estimate of 4.000 node-hours is above the budget left ")
    assert "(2.500 of 10 node-hours, config key pbs.budget_node_hours) by 1.500" in problem


def test_engines_that_served_no_request_are_not_a_request_s_cost():
    # one node, 4 warm engines ready 10 s after set-up, 100 s to the last rank: two
    # served the sample's two ranks, two had nothing to do the whole time
    low, high = 1000.0, 1100.0

    def engine(tile: int, busy: list) -> accounting.Slot:
        return accounting.Slot(f"n0-tile{tile}", "n0", str(tile), ready_at=low + 10,
                               records=[{}] * len(busy), busy_intervals=busy)  # fmt: skip

    slots = [engine(0, [(1010.0, 1100.0)]), engine(1, [(1010.0, 1050.0)]), engine(2, []),
             engine(3, [])]  # fmt: skip
    times = (low, low, high, high)  # start, staged, ranks done, end
    sub = accounting._submission("1.pbs", "r0-1", "00:10:00", ["n0"], slots, times, None)
    # each engine counts a quarter of the node: 90 s idle each for tiles 2 and 3
    assert bill.unused_node_s(sub, None) == pytest.approx(2 * 90 / 4)
    work = sub.parts["serving"] + sub.parts["idle"] - bill.unused_node_s(sub, None)
    assert work == pytest.approx((90 + 40 + 50) / 4)  # tile 1's tail stays a cost
    # per-rank engines: 4 tile slots, ranks on 2 of them; the other two are unused
    ranks = [engine(0, [(1000.0, 1100.0)]), engine(1, [(1000.0, 1060.0)])]
    sub = accounting._submission("2.pbs", "r0-1", "00:10:00", ["n0"], ranks, times, 4)
    assert bill.unused_node_s(sub, 4) == pytest.approx(2 * 100 / 4)


def test_rank_files_are_billed_too_and_their_mean_size_sets_the_walltime(tmp_path, monkeypatch):
    # rank files, not a dataset: a .in (blank lines and CRLF ends are no requests) and
    # a .jsonl; rank 1 already answered
    data, results = tmp_path / "data", tmp_path / "results"
    data.mkdir()
    (data / "0.in").write_bytes(b"one\r\n\r\ntwo\r\nthree\n  \n")
    (data / "1.in").write_text("a\nb\n")
    (data / "2.jsonl").write_text('{"prompt": "x"}\n\n{"prompt": "y"}\n{"prompt": "z"}\n')
    for name in ("1.out", "records/1.json"):
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / name).write_text("{}")
    ranks = ["0", "1", "2"]
    assert bill._pending_requests(None, str(data), str(results), ranks, ()) == (8, 3, [3, 3])
    # the PBS profile with a history of these settings: the bill and the walltime of a
    # rank from the mean of the ranks to run (3 requests)
    config = aurora_config(pbs={"estimate_margin_percent": 50})
    run = from_config(config)
    monkeypatch.chdir(tmp_path)
    history_line(tmp_path, config)
    (tmp_path / history.PATH).parent.mkdir()
    (tmp_path / "history.jsonl").rename(tmp_path / history.PATH)
    aurora = RunInfo(configfiles=(str(REPO / "profiles" / "aurora" / "aurora.yaml"),))
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        resolved = bill.prepare(aurora, run, None, str(data), str(results), "m", ranks, ())
    assert resolved.warm.rank_minutes == pytest.approx(3 * 0.05 * 12 * 1.5 / 60)
    text = said.getvalue()
    assert text.startswith("Bill: 8 requests in 3 ranks; to run: 6 requests in 2 ranks; 1 ")
    assert "Estimate " in text and "resting on the run of" in text
    # no history: said, with a sample of rank files as the way to get one
    (tmp_path / history.PATH).unlink()
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        resolved = bill.prepare(aurora, run, None, str(data), str(results), "m", ranks, ())
    assert resolved.warm.rank_minutes is None  # pbs/settings.py's 1 min
    # 2 ranks to run: as many as a node has at once here
    assert "No estimate" in said.getvalue() and "a data_dir of 2 of the rank files: 2 ranks" in (
        said.getvalue()
    )
