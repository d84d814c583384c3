"""Benchmark 3: does the workflow scale to many ranks? ``snakemake -n`` time and memory.

For each rank count, a scratch run folder with that many ``data/<rank>.in`` files:

* project: the repo's Snakefile, ``snakemake -n --profile profiles/local``;
* minimal: a one-rule Snakefile (data/{rank}.in -> results/{rank}.out, plus the
  target rule) with the same job count, the same command;
* aurora (largest count): the repo's Snakefile, ``snakemake -n --profile
  profiles/aurora``, which also packs the jobs into PBS submissions (group jobs).

Wall time and peak RSS (GNU time) per run, medians of ``repeats`` runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from common import (
    PYTHON,
    REPO,
    fmt,
    log,
    markdown_table,
    median,
    run_folder,
    run_timed,
)

NAME = "dag_scale"
GOAL = 1.25

MINIMAL_SNAKEFILE = """\
import os

RANKS = [name[: -len(".in")] for name in os.listdir("data") if name.endswith(".in")]


rule all:
    input:
        expand("results/{rank}.out", rank=RANKS),


rule infer:
    input:
        "data/{rank}.in",
    output:
        "results/{rank}.out",
    shell:
        "cp {input} {output}"
"""


PROMPT = "The capital of France is\n"


def make_data(folder: Path, ranks: int) -> None:
    data = folder / "data"
    data.mkdir(parents=True)
    for rank in range(ranks):
        (data / f"{rank}.in").write_text(PROMPT)


def project_folder(root: Path, ranks: int) -> Path:
    return run_folder(root / f"project-{ranks}", {f"{r}.in": PROMPT for r in range(ranks)})


def minimal_folder(root: Path, ranks: int) -> Path:
    folder = root / f"minimal-{ranks}"
    folder.mkdir()
    (folder / "Snakefile").write_text(MINIMAL_SNAKEFILE)
    (folder / "profiles").symlink_to(REPO / "profiles")
    make_data(folder, ranks)
    return folder


def aurora_argv(folder: Path) -> list[str]:
    """Dry run with profiles/aurora: its own config plus a test account."""
    test_config = folder / "aurora-test.yaml"
    test_config.write_text(yaml.safe_dump({"pbs": {"account": "test"}}))
    return [
        PYTHON,
        "-m",
        "snakemake",
        "-n",
        "--profile",
        "profiles/aurora",
        "--configfile",
        str(REPO / "profiles" / "aurora" / "aurora.yaml"),
        str(test_config),
    ]


VARIANTS = {
    "project": lambda folder: [PYTHON, "-m", "snakemake", "-n", "--profile", "profiles/local"],
    # The same profile: only the Snakefile differs.
    "minimal": lambda folder: [PYTHON, "-m", "snakemake", "-n", "--profile", "profiles/local"],
    "aurora": aurora_argv,
}


def run(quick: bool = False, repeats: int = 3, shared: dict | None = None) -> dict:
    counts = [48, 200] if quick else [48, 1000, 10000]
    has_aurora = (REPO / "profiles" / "aurora" / "config.yaml").is_file()
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-dag-") as tmp:
        root = Path(tmp)
        for count in counts:
            folders = {
                "project": project_folder(root, count),
                "minimal": minimal_folder(root, count),
            }
            if has_aurora and count == counts[-1]:
                folders["aurora"] = folders["project"]
            results[count] = {}
            # Interleave the variants run by run: load spikes hit all of them alike.
            runs = {name: [] for name in folders}
            for i in range(repeats):
                for name, folder in folders.items():
                    log(f"dag: {count} ranks, {name}, run {i + 1}/{repeats}")
                    runs[name].append(run_timed(VARIANTS[name](folder), cwd=folder, timeout=1800))
            for name, timed in runs.items():
                results[count][name] = {
                    "wall_s": [r.wall_s for r in timed],
                    "max_rss_mb": [r.max_rss_mb for r in timed],
                    "cpu_s": [r.cpu_s for r in timed],
                    "median_wall_s": median([r.wall_s for r in timed]),
                    "median_cpu_s": median([r.cpu_s or 0 for r in timed]),
                    "median_max_rss_mb": median([r.max_rss_mb or 0 for r in timed]),
                }

    rows = []
    for count, data in results.items():
        p, m = data["project"], data["minimal"]
        ratio = p["median_wall_s"] / m["median_wall_s"]
        data["ratio"] = ratio
        # CPU seconds suffer less from other load on a shared machine: a cross-check.
        data["cpu_ratio"] = p["median_cpu_s"] / m["median_cpu_s"] if m["median_cpu_s"] else None
        aurora = data.get("aurora")
        rows.append(
            [
                f"{count:,}",
                fmt(p["median_wall_s"]),
                fmt(p["median_max_rss_mb"]),
                fmt(m["median_wall_s"]),
                fmt(m["median_max_rss_mb"]),
                f"**{ratio:.2f}**" if count == counts[-1] else f"{ratio:.2f}",
                fmt(data["cpu_ratio"]),
                fmt(aurora["median_wall_s"]) if aurora else "-",
                fmt(aurora["median_max_rss_mb"]) if aurora else "-",
            ]
        )
    table = markdown_table(
        [
            "ranks",
            "project `-n` s",
            "project MB",
            "minimal `-n` s",
            "minimal MB",
            f"time ratio (goal <= {GOAL} at {counts[-1]:,})",
            "CPU-time ratio",
            "aurora profile `-n` s",
            "aurora MB",
        ],
        rows,
    )
    final = results[counts[-1]]["ratio"]
    notes = []
    if not has_aurora:
        notes.append("profiles/aurora was not present: its dry run was not measured.")
    return {
        "name": NAME,
        "title": (
            f"DAG scale: `snakemake -n` wall time and peak RSS, project Snakefile vs. a "
            f"minimal one-rule Snakefile with the same jobs; median of {repeats} runs"
        ),
        "table": table,
        "notes": notes,
        "results": {str(k): v for k, v in results.items()},
        "summary": {
            "ratio_at_largest": final,
            "goal_met": final <= GOAL,
            "goal": [
                f"`snakemake -n` time, project / minimal, {counts[-1]:,} ranks",
                f"{final:.2f}",
                f"<= {GOAL}",
            ],
        },
    }
