"""The on-disk formats of scripts/formats/: each writer sets its format field, each
reader reads what it writes and files written before the field existed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from formats import failure_note, marker, partial, record, registry
from pbs import state


def test_a_record_written_is_read_back_with_its_format_and_digest(tmp_path):
    path = record.record_file(tmp_path, 7)
    path.parent.mkdir()
    answers = {0: partial.Answer("x", "stop", 3, 2)}
    result = {"generate_s": 0.5, "answers": answers, "load_s": 1.0, "import_s": 0.1}
    result["truncated"] = 0
    built = record.build_record(7, {"model": "m", "engine": "echo"}, ["p"], result, None, {})
    record.write_record(path, built, "the answers\n")
    read = record.read_record(path)
    assert read["format"] == record.FORMAT and read["output_tokens"] == 2
    assert read[record.END_KEY] == read["written_at"]
    assert record.describes(record.load(path), b"the answers\n")
    assert not record.describes(record.load(path), b"the answers")


def test_a_record_without_format_still_reads(tmp_path):
    """Records written before the format field (2026-12-05) are format 1."""
    old = {"rank": 3, "prompts": 1, "output_tokens": 4, "load_s": 1.0, "generate_s": 2.0}
    old |= {"tokens_per_s": 2.0, "host": "h", "mask": "", "written_at": 100.0}
    path = tmp_path / "3.json"
    path.write_text(json.dumps(old))
    assert record.read_record(path)[record.END_KEY] == 100.0
    assert record.began(record.load(path)) == 98.0


def test_a_file_that_is_not_a_record_is_named(tmp_path):
    path = tmp_path / "3.json"
    path.write_text(json.dumps({"rank": 3}))
    with pytest.raises(record.RecordError, match=r"3\.json: not a rank record \(missing"):
        record.read_record(path)
    assert record.load(tmp_path / "missing.json") is None


def test_a_registry_entry_written_and_an_old_one_read(tmp_path):
    engine = SimpleNamespace(
        name="h/tile0",
        url="http://127.0.0.1:1",
        log_path=tmp_path / "h-tile0.log",
        restarts=0,
        env={"ZE_AFFINITY_MASK": "0"},
        started_at=1.0,
        ready_at=2.0,
        restart_s=0.0,
        engine_id="7835037df9491292",
        proof="id",
    )
    registry.write_state(tmp_path / "h-tile0.json", engine, "ready", ready_s=1.0)
    (tmp_path / "h-tile1.json").write_text(json.dumps({"name": "h/tile1", "state": "failed"}))
    (tmp_path / ".h-tile2.json.tmp").write_text("{")  # a write under way: not an entry
    entries = registry.read_registry(tmp_path)
    assert sorted(entries) == ["h-tile0", "h-tile1"]
    assert entries["h-tile0"]["format"] == registry.FORMAT
    assert entries["h-tile0"]["ready_s"] == 1.0
    assert entries["h-tile1"]["state"] == "failed"
    assert registry.launcher_exit(tmp_path) is None
    registry.write_launcher_exit(tmp_path, 3)
    assert registry.launcher_exit(tmp_path) == 3
    slot = SimpleNamespace(host="x1000c0s0b0n0.hsn", tiles=(4, 5))
    assert registry.engine_file(slot) == "x1000c0s0b0n0.hsn-tile4"


def test_a_failure_note_written_read_and_cleared(tmp_path):
    log = tmp_path / "logs" / "infer" / "5.log"
    failure_note.write_failure_note(log, 5, failure_note.INPUT_FAULT, "bad line")
    folder = log.parent / failure_note.FAILED_DIR
    assert failure_note.cause(folder, 5) == failure_note.INPUT_FAULT
    note = failure_note.read_note(folder / "5.json")
    assert note["format"] == failure_note.FORMAT and note["log"] == str(log)
    failure_note.clear_failure_note(log, 5)
    assert failure_note.cause(folder, 5) == ""


def test_a_marker_written_and_its_fields(tmp_path):
    path = tmp_path / "model" / "m.json"
    marker.write_marker(path, {"path": "/models/m", "versions": {"vllm": "0.32.0"}})
    assert marker.read_marker(path)["format"] == marker.FORMAT
    assert marker.marker_field([str(path)], "path") == "/models/m"
    assert marker.marker_versions(str(path)) == {"vllm": "0.32.0"}
    assert marker.marker_versions([]) == {}  # the echo engine has no marker
    assert marker.marker_field(tmp_path / "none.json", "path", quiet=True) is None
    with pytest.raises(OSError):
        marker.marker_field(tmp_path / "none.json", "path")


def test_partial_answers_of_an_older_file_without_format_are_kept(tmp_path):
    output = tmp_path / "results" / "2.out"
    kept = partial.Partial(output, {"input": "abc"})
    kept.path.parent.mkdir(parents=True)
    answer = {"index": 1, "text": "t", "finish_reason": "stop"}
    answer |= {"prompt_tokens": 1, "output_tokens": 1}
    lines = [json.dumps({"key": kept.key}), json.dumps(answer)]
    kept.path.write_text("\n".join(lines) + "\n")
    assert kept.load() == {1: partial.Answer("t", "stop", 1, 1)}
    kept.open({})
    kept.add(0, partial.Answer("u", "length", 1, 1))
    kept.close()
    assert json.loads(kept.path.read_text().splitlines()[0])["format"] == partial.FORMAT


def test_partial_embeddings_read_back_as_written_packed_or_not(tmp_path):
    """Vectors float32 holds exactly (vLLM's) are kept packed as base64; others (0.1 is
    not a float32) stay numbers: either way a resumed rank gets the same numbers back."""
    exact = [0.5, -1.25, 3.0]
    inexact = [0.1, 0.2]
    kept = partial.Partial(tmp_path / "results" / "4.jsonl", {"input": "abc"})
    kept.open({})
    kept.add(0, partial.Answer("", None, 3, 0, embeddings=[exact, exact[::-1]]))
    kept.add(1, partial.Answer("", None, 2, 0, embeddings=[inexact]))
    kept.close()
    lines = [json.loads(x) for x in kept.path.read_text().splitlines()[1:]]
    assert "embeddings_f32" in lines[0] and "embeddings" not in lines[0]
    assert lines[1]["embeddings"] == [inexact] and "embeddings_f32" not in lines[1]
    answers = partial.Partial(kept.path.parent.parent / "4.jsonl", {"input": "abc"}).load()
    assert answers[0].embeddings == [exact, exact[::-1]]
    assert answers[1].embeddings == [inexact]


def test_the_submission_state_gets_its_format_and_reads_old_records(tmp_path):
    store = state.StateStore(tmp_path)
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_text(json.dumps({"jobs": {"1.s": {"name": "r0", "state": "running"}}}))
    with store.locked() as current:
        assert current["jobs"]["1.s"]["attempt"] == 0  # a field older records lack
    assert store.read()["format"] == state.FORMAT
