"""The run report: results/summary.tsv, the plot, the end-of-run paragraph, --report (on
echo runs; of a real engine run: tests/test_summary_vllm.py)."""

import base64
import io
import json
import os
import re
import struct
from pathlib import Path

import pytest

from reporting import summary
from workflow import local_config, make_workdir, snakemake

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(rank, prompts=2, tokens=20, load=1.5, generate=0.5, end=100.0, host="x", mask="0"):
    return {
        "rank": rank,
        "prompts": prompts,
        "output_tokens": tokens,
        "load_s": load,
        "generate_s": generate,
        "tokens_per_s": round(tokens / generate, 1) if generate and tokens else 0.0,
        "host": host,
        "mask": mask,
        summary.END_KEY: end,
    }


def assert_png(data: bytes) -> tuple[int, int]:
    """A whole PNG file that decodes; returns its (width, height)."""
    import matplotlib.image

    assert data.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert data[12:16] == b"IHDR" and width > 100 and height > 100
    assert data.endswith(b"IEND\xaeB`\x82")
    pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert pixels.shape[:2] == (height, width)
    return width, height


# --- pure functions ------------------------------------------------------------------


def test_table_has_one_row_per_record_in_rank_order_and_reads_back_exactly():
    records = summary.read_records([])  # no files: an empty run
    assert records == []
    records = sorted(
        [record(10, load=0.123456, generate=2.5), record(2, mask="1.0"), record(0)],
        key=lambda r: int(r["rank"]),
    )
    text = summary.tsv_text(summary.summary_rows(records))
    lines = text.splitlines()
    assert lines[0].split("\t") == [
        "rank",
        "prompts",
        "output_tokens",
        "load_s",
        "generate_s",
        "tokens_per_s",
        "host",
        "tile_mask",
    ]
    rows = summary.parse_tsv(text)
    assert [row["rank"] for row in rows] == [0, 2, 10]
    for row, rec in zip(rows, records, strict=True):
        assert row["load_s"] == rec["load_s"] and row["generate_s"] == rec["generate_s"]
        assert row["tokens_per_s"] == rec["tokens_per_s"] and row["tile_mask"] == rec["mask"]


def test_cells_never_break_the_table():
    rows = summary.summary_rows([record(0, host="a\tb\nc", mask="")])
    assert summary.tsv_text(rows).splitlines()[1].split("\t")[-2:] == ["a b c", ""]


def test_records_are_read_in_numeric_rank_order_with_the_time_they_were_written(tmp_path):
    for rank in (10, 9, 1):
        (tmp_path / f"{rank}.json").write_text(json.dumps(record(rank)))
    # touched later, as Snakemake touches the outputs of a PBS submission at its end
    os.utime(tmp_path / "9.json", (2e9, 2e9))
    (tmp_path / "10.json").write_text(json.dumps(record(10) | {"written_at": 1.5e9}))
    records = summary.read_records(tmp_path.glob("*.json"))
    assert [r["rank"] for r in records] == [1, 9, 10]
    assert records[0][summary.END_KEY] == (tmp_path / "1.json").stat().st_mtime
    assert records[1][summary.END_KEY] == 2e9  # no written_at: the file's time
    assert records[2][summary.END_KEY] == 1.5e9


@pytest.mark.parametrize("content, message", [("{", "cannot read"), ("{}", "missing rank")])
def test_a_bad_record_is_named(tmp_path, content, message):
    (tmp_path / "3.json").write_text(content)
    with pytest.raises(summary.RecordError, match=rf"3\.json.*{message}"):
        summary.read_records([tmp_path / "3.json"])


def test_busy_time_is_the_union_of_the_generation_intervals():
    assert summary.busy_seconds([]) == 0
    # Two overlapping engines, a gap (queue, model load), then one inside another.
    intervals = [(0.0, 4.0), (1.0, 5.0), (10.0, 12.0), (10.5, 11.0)]
    assert summary.busy_seconds(intervals) == pytest.approx(5.0 + 2.0)


def test_totals_and_paragraph_say_what_the_records_say():
    records = [
        record(0, prompts=3, tokens=300, generate=1.0, end=11.0, host="n1", mask="0"),
        record(1, prompts=4, tokens=200, generate=2.0, end=12.0, host="n1", mask="1"),
        record(2, prompts=5, tokens=100, generate=1.0, end=20.0, host="n2", mask="0"),
        record(3, prompts=0, tokens=0, generate=0.0, end=21.0, host="n2", mask="1"),
    ]
    t = summary.totals(records)
    assert (t["ranks"], t["prompts"], t["output_tokens"], t["hosts"]) == (4, 12, 600, 2)
    # Generating during [10, 12] and [19, 20]: 600 tokens in 3 s.
    assert t["generating_s"] == pytest.approx(3.0)
    assert t["aggregate_tokens_per_s"] == pytest.approx(200.0)
    assert t["per_engine_tokens_per_s"] == pytest.approx(600 / 4.0)
    # A rank without tokens is not "slow": it had nothing to do.
    assert [s["rank"] for s in t["slowest"]] == [1, 2, 0]

    text = summary.paragraph(records, expected=6)
    assert "\n" not in text
    assert "4 of 6 ranks done on 2 host(s): 12 prompts, 600 output tokens" in text
    assert "Aggregate 200 output tok/s" in text
    assert "Slowest ranks: 1 (100 tok/s, n1 tile 1), 2 (100 tok/s, n2 tile 0)" in text


def test_paragraph_of_embedding_ranks_counts_texts_not_output_tokens():
    embedding = [
        record(0, prompts=2, tokens=0, generate=1.0, end=11.0) | {"embedded": 30},
        record(1, prompts=1, tokens=0, generate=1.0, end=11.5) | {"embedded": 10},
    ]
    embedding[0]["prompt_tokens"], embedding[1]["prompt_tokens"] = 300, 100
    text = summary.paragraph(embedding)
    assert "2 ranks done on 1 host(s): 3 requests, 40 texts embedded (400 input tokens)" in text
    assert "26.7 texts/s in the 1.5 s in which some engine was embedding" in text
    assert "output tok" not in text
    # a run of both kinds: the generation sentence, then the embedding ranks
    mixed = summary.paragraph([record(2, prompts=4, tokens=200), embedding[0]])
    assert "6 prompts, 200 output tokens" in mixed
    assert " Embedding ranks: 30 texts embedded (300 input tokens). " in mixed


def test_paragraph_of_a_run_without_records():
    assert "0 of 48 ranks done" in summary.paragraph([], expected=48)


def test_plot_is_a_png_for_small_and_large_runs():
    assert_png(summary.plot_png([record(r, end=100.0 + r) for r in range(3)]))
    width, _ = assert_png(summary.plot_png([record(r, end=float(r)) for r in range(1000)]))
    assert width <= 1600


def test_write_summary_writes_table_plot_and_log(tmp_path):
    paths = []
    for rank in (0, 1):
        path = tmp_path / "records" / f"{rank}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record(rank)))
        paths.append(path)
    out = tmp_path / "out"
    text = summary.write_summary(
        paths, out / "summary.tsv", out / "summary.png", tmp_path / "log" / "s.log", expected=2
    )
    assert [row["rank"] for row in summary.parse_tsv((out / "summary.tsv").read_text())] == [
        0,
        1,
    ]
    assert_png((out / "summary.png").read_bytes())
    assert (tmp_path / "log" / "s.log").read_text() == text + "\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


# --- the workflow: rule summary, onsuccess, --report -----------------------------------

# Uneven prompt counts and a two-digit rank, so sums and order are checked for real.
RANKS = {
    "0.in": "one two three\nfour five\n",
    "1.in": "six\n",
    "2.in": "seven eight\nnine ten eleven twelve\nthirteen\n",
    "10.in": "fourteen fifteen\n",
}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def check_summary(work: Path, stderr: str, ranks: list[str]) -> None:
    """summary.tsv and the paragraph equal what the per-rank records say."""
    records = [read_json(work / "results" / "records" / f"{rank}.json") for rank in ranks]
    rows = summary.parse_tsv((work / "results" / "summary.tsv").read_text())
    assert [row["rank"] for row in rows] == [int(rank) for rank in ranks]
    for row, rec in zip(rows, records, strict=True):
        for name, key in summary.COLUMNS:
            assert row[name] == rec[key], (name, row, rec)
    prompts = sum(r["prompts"] for r in records)
    tokens = sum(r["output_tokens"] for r in records)
    expected = (
        f"Run summary: {len(ranks)} of {len(ranks)} ranks done on 1 host(s): "
        f"{prompts:,} prompts, {tokens:,} output tokens."
    )
    assert expected in stderr
    # The whole paragraph (aggregate rate, slowest ranks) is what the records give.
    paths = [work / "results" / "records" / f"{rank}.json" for rank in ranks]
    paragraph = summary.paragraph(summary.read_records(paths), expected=len(ranks))
    assert paragraph in stderr
    assert (work / "logs" / "summary.log").read_text() == paragraph + "\n"


@pytest.fixture(scope="module")
def echo_run(tmp_path_factory):
    """One small run with the echo engine (no model needed), shared by the tests below."""
    work = make_workdir(tmp_path_factory.mktemp("echo-run"), RANKS)
    config = local_config(work, engine="echo")
    result = snakemake(work, configfiles=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return work, config, result


def test_summary_rule_table_and_paragraph_equal_the_records(echo_run):
    work, _, result = echo_run
    check_summary(work, result.stderr, ["0", "1", "2", "10"])
    rows = summary.parse_tsv((work / "results" / "summary.tsv").read_text())
    assert [row["prompts"] for row in rows] == [2, 1, 3, 1]


def test_summary_plot_is_a_valid_image(echo_run):
    work, _, _ = echo_run
    assert_png((work / "results" / "summary.png").read_bytes())


def test_report_html_contains_the_table_and_the_plot(echo_run):
    work, config, _ = echo_run
    result = snakemake(work, "--report", "report.html", configfiles=config)
    assert result.returncode == 0, result.stderr[-5000:]
    html = (work / "report.html").read_text(encoding="utf-8")
    # Snakemake embeds each file as a data: URI; the table must be the very summary.tsv.
    embedded = re.search(
        r"data:text/tab-separated-values;[^,]*filename=summary\.tsv;base64,([^\"']+)", html
    )
    assert embedded, "summary.tsv is not in the report"
    table = base64.b64decode(embedded.group(1)).decode()
    assert table == (work / "results" / "summary.tsv").read_text()
    assert "Run summary" in html  # the category
    assert re.search(r"data:image/png;[^,]*filename=summary\.png;base64,", html)


def test_infrastructure_failures_are_told_apart_from_the_ranks_own(tmp_path):
    from formats import faults

    logs = tmp_path / "pbs"
    faults.append_fault(logs, "1.pbs", "r0-3", faults.NODE_SNAKEMAKE, ["node2"],
                        "its Snakemake died (status 247)", now=100.0)  # fmt: skip
    faults.append_fault(logs, "2.pbs", "r4-7", faults.NODE_LOST, ["node3"],
                        "PBS requeued it", node_hours=0.25, now=200.0)  # fmt: skip
    lines = summary.infrastructure_failures(str(logs), since=150.0)
    assert lines[0] == (
        "Infrastructure failures, not counted against any rank (their ranks ran again; "
        "logs/pbs/faults.tsv): 1 node lost, 0.250 node-hours of interrupted runs"
    )
    assert lines[1].endswith(" node lost node3 (job 2.pbs r4-7): PBS requeued it")
    assert len(summary.infrastructure_failures(str(logs), since=0.0)) == 3
    assert summary.infrastructure_failures(str(tmp_path / "none"), since=0.0) == []
