import base64
import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from rank import layout
from rank.layout import RankFileError, discover_ranks


def touch(folder, *names):
    for name in names:
        (folder / name).write_text("a prompt\n")


def test_ranks_in_numeric_order_and_gaps_allowed(tmp_path):
    touch(tmp_path, "10.in", "2.in", "0.in", "notes.txt")
    assert discover_ranks(tmp_path) == ["0", "2", "10"]


def test_names_that_are_not_ranks_are_listed(tmp_path):
    touch(tmp_path, "1.in", "x.in", "-3.in", "4.5.in")
    with pytest.raises(RankFileError) as error:
        discover_ranks(tmp_path)
    message = str(error.value)
    for name in ("x.in", "-3.in", "4.5.in"):
        assert name in message
    assert "1.in" not in message.replace("-3.in", "").replace("4.5.in", "")


def test_two_names_for_one_rank(tmp_path):
    touch(tmp_path, "7.in", "07.in", "8.in")
    with pytest.raises(RankFileError, match="07.in and 7.in"):
        discover_ranks(tmp_path)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(RankFileError, match="has no <rank>.in or <rank>.jsonl files"):
        discover_ranks(tmp_path)
    with pytest.raises(RankFileError, match="does not exist"):
        discover_ranks(tmp_path / "missing")


def test_pending_ranks_need_both_outputs_newer_than_the_input(tmp_path):

    data, results = tmp_path / "data", tmp_path / "results"
    (results / "records").mkdir(parents=True)
    data.mkdir()
    for rank in range(5):
        (data / f"{rank}.in").write_text("x\n")
    for rank in (0, 1, 3):
        (results / f"{rank}.out").write_text("")
    for rank in (0, 2, 3):
        (results / "records" / f"{rank}.json").write_text("{}")
    os.utime(data / "3.in", (time.time() + 60, time.time() + 60))  # edited after its run
    names = [str(r) for r in range(5)]
    assert layout.pending_ranks(names, str(data), str(results)) == ["1", "2", "3", "4"]
    # A model still to be fetched makes every rank pending.
    missing = [str(tmp_path / "no-marker.json")]
    assert layout.pending_ranks(names, str(data), str(results), missing) == names


def _finished_rank(results, rank: str, text: str) -> None:
    """A rank as the task leaves it: the record (with the .out's digest), then the .out."""
    (results / "records").mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    (results / "records" / f"{rank}.json").write_text(json.dumps({"out_sha256": digest}))
    (results / f"{rank}.out").write_text(text)


def _mark(tmp_path, path: str) -> Path:
    marker = (
        tmp_path / ".snakemake" / "incomplete" / base64.urlsafe_b64encode(path.encode()).decode()
    )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("")
    return marker


def test_marks_of_whole_outputs_are_dropped_the_others_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    _finished_rank(results, "2", "Prompt: 'a', Generated text: 'b'\n\n")
    _finished_rank(results, "3", "whole\n")
    (results / "3.out").write_text("changed after its record\n")  # not what the record says
    (results / "records" / "4.json").write_text("{}")  # record, no .out: still being written
    whole = [_mark(tmp_path, "results/2.out"), _mark(tmp_path, "results/records/2.json")]
    kept = [_mark(tmp_path, f"results/{r}.out") for r in (3, 4, 5)]
    kept.append(_mark(tmp_path, "elsewhere/2.out"))
    (tmp_path / ".snakemake" / "incomplete" / "migration_underway").write_text("")
    assert layout.forget_finished_incomplete("results") == ["2"]
    assert not any(m.exists() for m in whole) and all(m.exists() for m in kept)
    assert layout.forget_finished_incomplete("results") == []
    assert layout.forget_finished_incomplete("results", tmp_path / "no-such-folder") == []


def test_kept_ranks_are_reported(capsys):
    layout.report_kept([])
    assert capsys.readouterr().err == ""
    layout.report_kept([str(r) for r in range(12)])
    err = capsys.readouterr().err
    assert err.startswith("Kept 12 rank(s)") and "0, 1, 2" in err and "and 2 more" in err
