"""Benchmark 9: a local run of thousands of ranks. Ranks per second, profiles/local as it
is against the same run without its scheduler subsample.

A scratch run folder with ``count`` ranks of four prompts, ``snakemake --profile
profiles/local`` on echo engines (scripts/engine/echo_server.py: vLLM's API, no model), so
the run's time is the workflow's own. The baseline adds ``--scheduler-subsample 0``
(Snakemake's default: every ready rank considered for every pick). Runs alternate
between the two, a fresh folder each; medians of ``repeats`` runs.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml

from common import PYTHON, fmt, log, markdown_table, median, run_folder, run_timed

NAME = "local_scale"
GOAL = 1.2  # at the largest count: the subsample must be worth its line in the profile
PROMPTS = "one\ntwo\nthree\nfour\n"
VARIANTS = {"profile": (), "without subsample": ("--scheduler-subsample", "0")}


def one_run(root: Path, count: int, extra: tuple[str, ...], name: str) -> dict:
    folder = run_folder(root / name, {f"{r}.in": PROMPTS for r in range(count)})
    config = folder / "bench.yaml"
    config.write_text(yaml.safe_dump({"engine": "echo"}))
    argv = [PYTHON, "-m", "snakemake", "--profile", "profiles/local", *extra]
    argv += ["--configfile", "profiles/local/local.yaml", str(config)]
    timed = run_timed(argv, cwd=folder, timeout=1800)
    written = len(list((folder / "results").glob("*.out")))
    shutil.rmtree(folder)
    if written != count:
        raise RuntimeError(f"{name}: {written} of {count} ranks written")
    return {"wall_s": timed.wall_s, "cpu_s": timed.cpu_s}


def run(quick: bool = False, repeats: int = 3, shared: dict | None = None) -> dict:
    counts = [200] if quick else [768, 4096]
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-local-") as tmp:
        for count in counts:
            runs = {name: [] for name in VARIANTS}
            for i in range(repeats):
                for name, extra in VARIANTS.items():
                    log(f"local_scale: {count} ranks, {name}, run {i + 1}/{repeats}")
                    label = f"{count}-{name.replace(' ', '-')}-{i}"
                    runs[name].append(one_run(Path(tmp), count, extra, label))
            results[count] = {
                name: {
                    "wall_s": [r["wall_s"] for r in timed],
                    "cpu_s": [r["cpu_s"] for r in timed],
                    "ranks_per_s": count / median([r["wall_s"] for r in timed]),
                }
                for name, timed in runs.items()
            }
            results[count]["ratio"] = (
                results[count]["profile"]["ranks_per_s"]
                / results[count]["without subsample"]["ranks_per_s"]
            )
    rows = [
        [
            f"{count:,}",
            fmt(data["profile"]["ranks_per_s"]),
            fmt(data["without subsample"]["ranks_per_s"]),
            f"**{data['ratio']:.2f}**" if count == counts[-1] else f"{data['ratio']:.2f}",
        ]
        for count, data in results.items()
    ]
    table = markdown_table(
        ["ranks", "profiles/local ranks/s", "without subsample ranks/s",
         f"ratio (goal >= {GOAL} at {counts[-1]:,})"],
        rows,
    )  # fmt: skip
    final = results[counts[-1]]["ratio"]
    return {
        "name": NAME,
        "title": (
            "Local scale: a local run on echo engines, profiles/local against the same run "
            f"without its scheduler subsample; median of {repeats} alternated runs"
        ),
        "table": table,
        "results": {str(k): v for k, v in results.items()},
        "summary": {
            "ratio_at_largest": final,
            "goal_met": final >= GOAL,
            "goal": [
                f"local run ranks/s, profile / without subsample, {counts[-1]:,} ranks",
                f"{final:.2f}",
                f">= {GOAL}",
            ],
        },
    }
