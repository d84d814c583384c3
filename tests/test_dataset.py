"""A dataset cut into ranks and answered in one file (scripts/dataset/): deterministic
cuts that rewrite only the ranks whose bytes change, bad lines named by dataset and line
with nothing half-written, the merge in input order, Parquet with carried columns, a
Hugging Face datasets folder read as the same rows in Parquet, and folders that are none
named."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from dataset import cut, merge, source  # noqa: E402
from rank.jsonl import RequestFileError  # noqa: E402
from workflow import write_datasets_folder  # noqa: E402


def dataset(path: Path, rank_size: int = 10, **kw) -> source.Dataset:
    fields = {"column": "prompt", "carry": (), "embed": False} | kw
    return source.Dataset(str(path), rank_size, **fields)


def write_lines(path: Path, items, mode="w") -> None:
    with open(path, mode) as handle:
        for item in items:
            handle.write(item if isinstance(item, str) else json.dumps(item) + "\n")


def stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.jsonl")}


def test_the_same_dataset_cuts_into_the_same_ranks_and_appending_rewrites_only_the_tail(tmp_path):
    source_file, ranks = tmp_path / "ds.jsonl", tmp_path / "ranks"
    write_lines(source_file, [{"prompt": f"p{i}"} for i in range(25)])
    manifest = cut.cut(dataset(source_file), ranks)
    assert manifest["sizes"] == [10, 10, 5] and manifest["requests"] == 25
    # a short line without id is named by its line in the dataset, not in its rank
    assert json.loads((ranks / "2.jsonl").read_text().splitlines()[0]) == {
        "id": 21,
        "prompt": "p20",
    }
    before = stamps(ranks)
    assert cut.cut(dataset(source_file), ranks)["changed"] == []
    assert stamps(ranks) == before
    write_lines(source_file, ["\n", *[{"prompt": f"q{i}"} for i in range(8)]], mode="a")
    manifest = cut.cut(dataset(source_file), ranks)
    assert manifest["changed"] == [2, 3] and manifest["sizes"] == [10, 10, 10, 3]
    after = stamps(ranks)
    assert {n: after[n] for n in ("0.jsonl", "1.jsonl")} == {
        n: before[n] for n in ("0.jsonl", "1.jsonl")
    }
    # the blank line is skipped but counted: line 27 is q0
    assert json.loads((ranks / "2.jsonl").read_text().splitlines()[5]) == {"id": 27, "prompt": "q0"}
    # a larger rank size cuts anew and drops the ranks past the end
    manifest = cut.cut(dataset(source_file, rank_size=20), ranks)
    assert manifest["sizes"] == [20, 13] and sorted(p.name for p in ranks.glob("*.jsonl")) == [
        "0.jsonl", "1.jsonl"]  # fmt: skip


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_bad_line_of_a_large_dataset_is_named_and_nothing_is_half_written(tmp_path, where):
    source_file, ranks = tmp_path / "big.jsonl", tmp_path / "ranks"
    count = 100_000
    good = [json.dumps({"custom_id": f"c{i}", "url": "/v1/completions",
                        "body": {"prompt": f"p{i}"}}) + "\n" for i in range(count)]  # fmt: skip
    write_lines(source_file, good)
    cut.cut(dataset(source_file, rank_size=5000), ranks)
    before = {p.name: p.read_bytes() for p in ranks.iterdir()}
    bad_at = {"start": 0, "middle": count // 2, "end": count - 1}[where]
    good[bad_at] = '{"custom_id": "x", "url": "/v1/completions", "body": {"prompt": 7}}\n'
    good.append('{"prompt": "one more"}\n')  # and an appended rank, never written
    write_lines(source_file, good)
    with pytest.raises(RequestFileError) as error:
        cut.cut(dataset(source_file, rank_size=5000), ranks)
    assert str(error.value) == f"{source_file}: line {bad_at + 1}: prompt must be a string, not 7"
    assert {p.name: p.read_bytes() for p in ranks.iterdir()} == before


def test_a_dataset_holds_one_kind_and_ids_repeat_nowhere_in_a_rank(tmp_path):
    source_file = tmp_path / "ds.jsonl"
    write_lines(source_file, [{"prompt": "a"}, {"input": "embed me"}])
    with pytest.raises(
        RequestFileError,
        match=r"line 2: a pooling \(embeddings, .*\) request in a rank of generation",
    ):
        cut.cut(dataset(source_file), tmp_path / "ranks")
    write_lines(source_file, [{"id": "a", "prompt": "a"}, {"id": "a", "prompt": "b"}])
    with pytest.raises(RequestFileError, match="line 2: id 'a' repeats line 1's"):
        cut.cut(dataset(source_file), tmp_path / "ranks")


def test_the_merge_keeps_input_order_and_error_lines_in_their_places(tmp_path):
    answers = []
    for rank in range(3):
        path = tmp_path / f"{rank}.jsonl"
        write_lines(
            path,
            [{"id": rank * 2 + 1, "text": "t"}, {"id": rank * 2 + 2, "error": {"message": "no"}}],
        )
        answers.append(path)
    target = tmp_path / "out" / "ds.jsonl"
    merge.merge_jsonl(answers, target)
    ids = [json.loads(x)["id"] for x in target.read_text().splitlines()]
    assert ids == [1, 2, 3, 4, 5, 6]
    assert "error" in json.loads(target.read_text().splitlines()[3])
    # a merge that fails leaves the old file and no temporary one
    with pytest.raises(FileNotFoundError):
        merge.merge_jsonl([answers[0], tmp_path / "missing.jsonl"], target)
    assert len(target.read_text().splitlines()) == 6
    assert os.listdir(target.parent) == ["ds.jsonl"]


def test_parquet_cut_and_merge_carry_columns_beside_the_answers(tmp_path):
    table = pa.table({
        "prompt": [f"question {i}" for i in range(23)],
        "label": list(range(23)),
        "extra": [{"k": i} for i in range(23)],
    })  # fmt: skip
    path = tmp_path / "qa.parquet"
    pq.write_table(table, path, row_group_size=7)
    data = dataset(path, rank_size=10, carry=("label", "extra"))
    ranks = tmp_path / "ranks"
    manifest = cut.cut(data, ranks)
    assert manifest["sizes"] == [10, 10, 3]
    assert json.loads((ranks / "1.jsonl").read_text().splitlines()[0]) == {
        "id": 10,
        "prompt": "question 10",
    }
    answers = []
    for rank in range(3):
        lines = [json.loads(x) for x in (ranks / f"{rank}.jsonl").read_text().splitlines()]
        out = tmp_path / f"a{rank}.jsonl"
        write_lines(out, [{"id": x["id"], "text": x["prompt"].upper(), "finish_reason": "length",
                           "prompt_tokens": 2, "output_tokens": 2} for x in lines])  # fmt: skip
        answers.append(out)
    target = tmp_path / "qa.out.parquet"
    merge.merge_parquet(str(path), answers, target, data.carry)
    got = pq.read_table(target).to_pylist()
    assert [r["label"] for r in got] == list(range(23))
    assert got[22] == {"label": 22, "extra": {"k": 22}, "id": "22", "text": "QUESTION 22",
                       "finish_reason": "length", "prompt_tokens": 2, "output_tokens": 2,
                       "error": None}  # fmt: skip
    with pytest.raises(ValueError, match="fewer answers than rows"):
        merge.merge_parquet(str(path), answers[:2], tmp_path / "short.parquet", data.carry)
    assert not (tmp_path / "short.parquet").exists()


def test_a_parquet_column_that_is_missing_is_named_with_the_config_key(tmp_path):
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"question": ["a"]}), path)
    with pytest.raises(
        source.DatasetError, match="no column 'prompt' \\(config key dataset.column"
    ):
        cut.cut(dataset(path), tmp_path / "ranks")


def test_embedding_vectors_in_rank_npy_files_merge_into_one_with_their_rows_renumbered(tmp_path):
    import numpy as np

    from rank.jsonl import npy_bytes

    answers = []
    for rank, count in enumerate([2, 0, 3]):
        vectors = [[rank + i / 10, -rank - i / 10] for i in range(count)]
        (tmp_path / f"{rank}.npy").write_bytes(npy_bytes(vectors))
        lines = [
            {"id": f"{rank}-{i}", "object": "list", "data": [
                {"object": "embedding", "index": 0, "embedding": None, "npy_row": i}]}
            for i in range(count)
        ]  # fmt: skip
        path = tmp_path / f"{rank}.jsonl"
        write_lines(path, lines)
        answers.append(path)
    merge.merge_jsonl(answers, tmp_path / "out" / "emb.jsonl")
    merged = np.load(tmp_path / "out" / "emb.npy")
    assert merged.shape == (5, 2)
    lines = [json.loads(x) for x in (tmp_path / "out" / "emb.jsonl").read_text().splitlines()]
    for line in lines:
        rank, i = map(int, line["id"].split("-"))
        row = line["data"][0]["npy_row"]
        assert merged[row].tolist() == pytest.approx([rank + i / 10, -rank - i / 10])
    assert [line["data"][0]["npy_row"] for line in lines] == [0, 1, 2, 3, 4]


def qa_table(rows: int = 23):
    return pa.table({
        "prompt": [f"question {i}" for i in range(rows)],
        "label": list(range(rows)),
        "extra": [{"k": i} for i in range(rows)],
    })  # fmt: skip


def test_a_datasets_folder_cuts_and_merges_as_the_same_rows_in_parquet(tmp_path):
    table = qa_table()
    pq.write_table(table, tmp_path / "qa.parquet", row_group_size=7)
    folder = tmp_path / "inputs" / "qa"
    shards = write_datasets_folder(folder, table, shards=2, batch_rows=5)
    as_parquet = dataset(tmp_path / "qa.parquet", carry=("label", "extra"))
    as_folder = dataset(folder, carry=("label", "extra"))
    assert as_folder.folder and as_folder.table and as_folder.name == "qa"
    assert source.answer_file({"results_dir": "results"}, as_folder) == "results/qa.parquet"
    assert cut.cut(as_folder, tmp_path / "f")["sizes"] == [10, 10, 3]
    cut.cut(as_parquet, tmp_path / "p")
    for rank in range(3):  # rank 1 holds the end of the first shard and the second's start
        assert (tmp_path / "f" / f"{rank}.jsonl").read_bytes() == (
            tmp_path / "p" / f"{rank}.jsonl"
        ).read_bytes()
    assert cut.count_requests(as_folder) == 23
    answers = []
    for rank in range(3):
        lines = [json.loads(x) for x in (tmp_path / "f" / f"{rank}.jsonl").read_text().splitlines()]
        answers.append(tmp_path / f"a{rank}.jsonl")
        write_lines(answers[-1], [{"id": x["id"], "text": x["prompt"][::-1]} for x in lines])
    merge.merge(as_folder, answers, tmp_path / "from-folder.parquet")
    merge.merge(as_parquet, answers, tmp_path / "from-parquet.parquet")
    got = pq.read_table(tmp_path / "from-folder.parquet")
    assert got.equals(pq.read_table(tmp_path / "from-parquet.parquet"))
    assert got.column("label").to_pylist() == list(range(23))
    assert got.column("text").to_pylist()[14] == "41 noitseuq"
    # the manifest is stale once any shard changes (or state.json)
    assert cut.current_manifest(as_folder, tmp_path / "f") is not None
    later = (tmp_path / "f" / cut.MANIFEST).stat().st_mtime + 10
    os.utime(folder / shards[1], (later, later))
    assert cut.current_manifest(as_folder, tmp_path / "f") is None


def test_a_datasets_folder_given_by_the_config_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_datasets_folder(tmp_path / "inputs" / "qa", qa_table(), shards=2)
    config = {"dataset": {"input": "inputs/qa/", "rank_size": 4, "column": "prompt"}}
    found = source.dataset_of(config)
    assert (found.name, found.rank_size, found.table) == ("qa", 4, True)
    assert source.folders({"data_dir": "data", "results_dir": "r"}, found) == ("data/qa", "r/qa")
    (tmp_path / "inputs" / "empty").mkdir()
    with pytest.raises(
        source.DatasetError, match="config key dataset.input: no inputs/empty/state"
    ):
        source.dataset_of({"dataset": {"input": "inputs/empty"}})


def broken_folders(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Folders that are no datasets folder, and what the error must say."""
    made = {}
    for case in ("no state", "no shard", "bad state", "not arrow", "other columns", "dict"):
        folder = tmp_path / case.replace(" ", "-")
        names = write_datasets_folder(folder, qa_table(), shards=2)
        made[case] = folder
    (made["no state"] / "state.json").unlink()
    (made["no shard"] / names[1]).unlink()
    (made["bad state"] / "state.json").write_text('{"_data_files": "data.arrow"}')
    (made["not arrow"] / names[1]).write_bytes(b"PAR1 not a stream")
    other = pa.schema([("prompt", pa.int64())])
    with (
        pa.OSFile(str(made["other columns"] / names[1]), "wb") as sink,
        pa.ipc.new_stream(sink, other) as writer,
    ):
        writer.write_batch(pa.record_batch({"prompt": [1]}))
    os.rename(made["dict"], tmp_path / "train")
    made["dict"].mkdir()
    os.rename(tmp_path / "train", made["dict"] / "train")
    write_datasets_folder(made["dict"] / "test", qa_table(3), shards=1)
    (made["dict"] / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    return {
        "no state": (made["no state"], f"no {made['no state']}/state.json"),
        "no shard": (made["no shard"], f"no shard {made['no shard']}/{names[1]} \\(listed in"),
        "bad state": (made["bad state"], "not a state.json of save_to_disk"),
        "not arrow": (made["not arrow"], f"{made['not arrow']}/{names[1]}: not an Arrow stream"),
        "other columns": (made["other columns"], f"{names[1]}: its columns differ"),
        "dict": (made["dict"], f"a DatasetDict .*'{made['dict']}/train', '{made['dict']}/test'"),
    }


@pytest.mark.parametrize(
    "case", ["no state", "no shard", "bad state", "not arrow", "other columns", "dict"]
)
def test_a_folder_that_is_no_datasets_folder_is_named_and_nothing_is_written(tmp_path, case):
    folder, message = broken_folders(tmp_path)[case]
    ranks = tmp_path / "ranks"
    with pytest.raises(source.DatasetError, match=message) as error:
        cut.cut(dataset(folder, rank_size=4), ranks)
    assert "config key dataset.input" in str(error.value)
    assert os.listdir(ranks) == []
    if case not in ("not arrow", "other columns"):  # the config key finds these when loaded
        with pytest.raises(source.DatasetError, match=message):
            source.dataset_of({"dataset": {"input": str(folder)}})
    answers = tmp_path / "answers.jsonl"
    write_lines(answers, [{"id": i, "text": "a"} for i in range(23)])
    with pytest.raises(source.DatasetError, match=message):
        merge.merge(dataset(folder), [answers], tmp_path / "out.parquet")
    assert not [p for p in os.listdir(tmp_path) if "out.parquet" in p]


def test_a_datasets_folder_without_the_column_is_named_with_the_config_keys(tmp_path):
    folder = tmp_path / "qa"
    write_datasets_folder(folder, pa.table({"question": ["a", "b"]}), shards=1)
    with pytest.raises(
        source.DatasetError, match="no column 'prompt' \\(config key dataset.column"
    ):
        cut.cut(dataset(folder), tmp_path / "ranks")
    with pytest.raises(source.DatasetError, match="no column\\(s\\) \\['label'\\] \\(config key"):
        merge.merge(dataset(folder, carry=("label",)), [], tmp_path / "out.parquet")
