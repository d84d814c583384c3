"""Benchmark: a dataset in, one answer file out (scripts/dataset/).

* cut and merge: one JSONL dataset of ``count`` short lines cut into ranks of 1,000 by
  the checkpoint's code (every line checked) and the ranks' files merged back; against
  GNU ``split -l 1000`` and ``cat`` of the same files. Seconds per million requests and
  peak RSS (GNU time), and their ratio;
* end to end: the same requests on echo engines (``profiles/local``) given as one
  dataset against given as rank files of 1,000 (the same requests, ids and all), the
  dataset's cut and merge included; wall-time ratio (goal <= 1.05);
* ``snakemake -n`` of a dataset of ``big`` requests (10 million at full size): before
  its cut (the bill counts its lines) and after it (the DAG of all its ranks); time and
  peak RSS, with the cut's own.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from common import (
    PYTHON,
    REPO,
    fmt,
    local_argv,
    log,
    markdown_table,
    median,
    run_folder,
    run_timed,
)

NAME = "datasets"
GOAL = 1.05
RANK_SIZE = 1000

CUT = """
import sys
sys.path.insert(0, {scripts!r})
from dataset import cut, source
cut.cut(source.Dataset({source!r}, {size}, "prompt", (), False), {folder!r})
"""
MERGE = """
import sys
sys.path.insert(0, {scripts!r})
from dataset import merge
merge.merge_jsonl([f"{folder}/{{r}}.jsonl" for r in range({ranks})], {target!r})
"""


def write_dataset(path: Path, count: int) -> None:
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(json.dumps({"id": i + 1, "prompt": f"The capital of country {i} is"}))
            handle.write("\n")


def python(code: str, cwd: Path):
    return run_timed([PYTHON, "-c", code], cwd=cwd, timeout=7200)


def cut_and_merge(root: Path, count: int, repeats: int) -> dict:
    source = root / "cut.jsonl"
    write_dataset(source, count)
    ranks = -(-count // RANK_SIZE)
    runs = {"cut": [], "split": [], "merge": [], "cat": []}
    scripts = str(REPO / "scripts")
    for i in range(repeats):
        log(f"datasets: cut and merge {count:,} lines, run {i + 1}/{repeats}")
        folder = root / f"cut-{i}"
        runs["cut"].append(
            python(
                CUT.format(scripts=scripts, source=str(source), size=RANK_SIZE, folder=str(folder)),
                root,
            )
        )
        split = root / f"split-{i}"
        split.mkdir()
        runs["split"].append(
            run_timed(
                ["split", "-l", str(RANK_SIZE), "-d", "-a", "6", str(source), f"{split}/"], cwd=root
            )
        )
        target = root / f"merged-{i}.jsonl"
        runs["merge"].append(
            python(
                MERGE.format(scripts=scripts, folder=str(folder), ranks=ranks, target=str(target)),
                root,
            )
        )
        parts = sorted(str(p) for p in folder.glob("*.jsonl"))
        parts.sort(key=lambda p: int(Path(p).stem))
        runs["cat"].append(
            run_timed(["sh", "-c", 'cat "$@" > ' + str(root / f"cat-{i}"), "cat", *parts], cwd=root)
        )
        assert target.read_bytes() == source.read_bytes()  # ids given: the cut keeps lines
    per_million = 1e6 / count
    out = {}
    for name, timed in runs.items():
        out[name] = {
            "wall_s": [t.wall_s for t in timed],
            "s_per_million": median([t.wall_s for t in timed]) * per_million,
            "max_rss_mb": median([t.max_rss_mb or 0 for t in timed]),
        }
    return out


def end_to_end(root: Path, count: int, repeats: int) -> dict:
    """Wall time of the same requests as a dataset and as rank files, interleaved."""
    lines = [json.dumps({"id": i + 1, "prompt": f"q {i}"}) + "\n" for i in range(count)]
    ranks = {
        f"{r}.jsonl": "".join(lines[r * RANK_SIZE : (r + 1) * RANK_SIZE])
        for r in range(-(-count // RANK_SIZE))
    }
    runs = {"dataset": [], "rank files": []}
    for i in range(repeats):
        for name in runs:
            log(f"datasets: end to end {count:,} requests as {name}, run {i + 1}/{repeats}")
            work = run_folder(
                root / f"e2e-{name.replace(' ', '-')}-{i}", {} if name == "dataset" else ranks
            )
            config = {"engine": "echo"}
            if name == "dataset":
                (work / "inputs").mkdir()
                (work / "inputs" / "e2e.jsonl").write_text("".join(lines))
                config["dataset"] = {"input": "inputs/e2e.jsonl", "rank_size": RANK_SIZE}
            runs[name].append(run_timed(local_argv(work, config), cwd=work, timeout=7200))
    return {
        name: {
            "wall_s": [t.wall_s for t in timed],
            "median_wall_s": median([t.wall_s for t in timed]),
        }
        for name, timed in runs.items()
    }


def dry_runs(root: Path, count: int) -> dict:
    work = run_folder(root / "big", {})
    (work / "inputs").mkdir()
    log(f"datasets: writing {count:,} lines")
    write_dataset(work / "inputs" / "big.jsonl", count)
    config = {"engine": "echo", "dataset": {"input": "inputs/big.jsonl", "rank_size": RANK_SIZE}}
    argv = local_argv(work, config)
    log("datasets: snakemake -n before the cut")
    before = run_timed([*argv, "-n"], cwd=work, timeout=7200)
    log("datasets: the cut alone (snakemake --until cut_dataset)")
    cut = run_timed([*argv, "--until", "cut_dataset"], cwd=work, timeout=7200)
    log("datasets: snakemake -n after the cut")
    after = run_timed([*argv, "-n"], cwd=work, timeout=7200)
    jobs = sum(1 for line in after.stdout.splitlines() if line.startswith("rule infer_jsonl"))
    return {
        name: {"wall_s": t.wall_s, "max_rss_mb": t.max_rss_mb}
        for name, t in (("before the cut", before), ("the cut", cut), ("after the cut", after))
    } | {"rank_jobs_after": jobs}


def run(quick: bool = False, repeats: int = 3, shared: dict | None = None) -> dict:
    count = 20_000 if quick else 1_000_000
    big = 50_000 if quick else 10_000_000
    with tempfile.TemporaryDirectory(prefix="bench-datasets-") as tmp:
        root = Path(tmp)
        cm = cut_and_merge(root, count, repeats)
        e2e = end_to_end(root, count, repeats)
        dry = dry_runs(root, big)
    cut_ratio = cm["cut"]["s_per_million"] / cm["split"]["s_per_million"]
    merge_ratio = cm["merge"]["s_per_million"] / cm["cat"]["s_per_million"]
    ratio = e2e["dataset"]["median_wall_s"] / e2e["rank files"]["median_wall_s"]
    rows = [[name, fmt(v["s_per_million"]), fmt(v["max_rss_mb"])] for name, v in cm.items()] + [
        ["cut / split", f"**{cut_ratio:.1f}**", ""],
        ["merge / cat", f"**{merge_ratio:.1f}**", ""],
    ]
    table = markdown_table(["step", "s per million requests", "peak MB"], rows)
    table += "\n\n" + markdown_table(
        ["end to end, echo engines", f"{count:,} requests: wall s", "ratio"],
        [
            ["as rank files", fmt(e2e["rank files"]["median_wall_s"]), ""],
            [
                "as one dataset (cut + merge included)",
                fmt(e2e["dataset"]["median_wall_s"]),
                f"**{ratio:.3f}**",
            ],
        ],
    )
    table += "\n\n" + markdown_table(
        [f"{big:,}-request dataset", "wall s", "peak MB"],
        [
            [name, fmt(v["wall_s"]), fmt(v["max_rss_mb"])]
            for name, v in dry.items()
            if isinstance(v, dict)
        ],
    )
    return {
        "name": NAME,
        "title": (
            f"Datasets: cut and merge against split and cat ({count:,} lines), end to end as "
            f"one dataset against rank files, `snakemake -n` at {big:,} requests; median of "
            f"{repeats} runs"
        ),
        "table": table,
        "notes": [f"{dry['rank_jobs_after']:,} rank jobs in the dry run after the cut."],
        "results": {"cut_and_merge": cm, "end_to_end": e2e, "dry_runs": dry},
        "summary": {
            "ratio": ratio,
            "goal_met": ratio <= GOAL,
            "goal": [
                f"end to end, dataset / rank files, {count:,} echo requests",
                f"{ratio:.3f}",
                f"<= {GOAL}",
            ],
        },
    }
