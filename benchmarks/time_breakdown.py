"""Benchmark 2: where a rank job's time goes, and Snakemake's own share of a run.

One rank (the engine benchmark's prompts and sampling) through the workflow with
the tiny and the 125M-shaped model. The parts:

* Python start (task): scripts/rank/task.py's interpreter start and imports (record
  ``python_start_s``);
* import vllm, model load, generation: the record's ``import_s``, ``load_s``,
  ``generate_s``;
* placement, tokenize, write, exit: the rest of the job's own wall time (from
  Snakemake's job metadata: rule infer's ``run:`` block places the rank and waits
  for scripts/rank/task.py);
* Snakemake outside the job: the rest of the ``snakemake`` command's wall time
  (start, parsing, DAG, scheduling, bookkeeping).

Then the 48 sample ranks with profiles/local (``make run``): Snakemake's overhead
is the share of the run's job slots (``cores`` x wall time) not spent inside jobs,
``1 - sum(job seconds) / (cores x wall)``. Goal: under 10 %.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import (
    PYTHON,
    REPO,
    TINY_MODEL,
    bench_prompts,
    finish_windows,
    job_seconds,
    log,
    markdown_table,
    median,
    run_folder,
    run_timed,
)
from engine_efficiency import bench_config, pipeline_run, sizes

NAME = "time_breakdown"
PER_RANK_CORES = 2  # profiles/local's engines resource: per-rank engines at once
PARTS = (
    ("Python start (task)", "python_start_s"),
    ("import vllm", "import_s"),
    ("model load", "load_s"),
    ("generation", "generate_s"),
    ("placement, tokenize, write, exit", "rest_of_job_s"),
    ("Snakemake outside the job (start, parse, DAG, bookkeeping)", "snakemake_s"),
)


def parts_of(run: dict) -> dict:
    """Seconds per part of one pipeline run (see the module doc)."""
    r = run["record"]
    task = sum(r[key] or 0 for key in ("python_start_s", "import_s", "load_s", "generate_s"))
    job = run["job_s"] if run["job_s"] is not None else task
    return {
        "python_start_s": r["python_start_s"] or 0.0,
        "import_s": r["import_s"],
        "load_s": r["load_s"],
        "generate_s": r["generate_s"],
        "rest_of_job_s": max(0.0, job - task),
        "snakemake_s": max(0.0, run["wall_s"] - job),
        "wall_s": run["wall_s"],
    }


def median_parts(runs: list[dict]) -> dict:
    parts = [parts_of(run) for run in runs]
    return {key: median([p[key] for p in parts]) for key in parts[0]}


def sample_run(folder: Path, ranks: dict[str, str], extra_args: list[str]) -> dict:
    """The sample ranks with profiles/local and the tiny model, one engine per rank on
    2 cores (the warm engines' run is in benchmarks/warm_engines.py)."""
    work = run_folder(folder, ranks)
    per_rank = ["--config", "warm_engines=False", "--cores", str(PER_RANK_CORES)]
    argv = [PYTHON, "-m", "snakemake", "--profile", "profiles/local", *per_rank, *extra_args]
    timed = run_timed(argv, cwd=work, timeout=3600)
    jobs = {}
    for name in ranks:
        rank = name.removesuffix(".in")
        seconds = job_seconds(work, f"results/{rank}.out")
        if seconds is None:
            raise RuntimeError(f"no Snakemake job metadata for rank {rank}")
        jobs[rank] = seconds
    cores = PER_RANK_CORES
    busy = sum(jobs.values())
    return {
        "ranks": len(ranks),
        "jobs": len(jobs),
        "cores": cores,
        "extra_args": extra_args,
        "wall_s": timed.wall_s,
        "job_s_sum": busy,
        "job_s_median": median(list(jobs.values())),
        "overhead_fraction": 1 - busy / (cores * timed.wall_s),
        "overhead_s_per_job": (cores * timed.wall_s - busy) / len(jobs),
        "max_rss_mb": timed.max_rss_mb,
        "finish_window": finish_windows(work, ranks),
    }


def run(quick: bool = False, repeats: int = 3, shared: dict | None = None) -> dict:
    size = sizes(quick)
    prompts = bench_prompts(size["prompts"])
    models = {"tiny": TINY_MODEL} if quick else {"tiny": TINY_MODEL, "125M-shaped": size["model"]}
    reused = (shared or {}).get("engine_efficiency")
    per_model = {}
    with tempfile.TemporaryDirectory(prefix="bench-breakdown-") as tmp:
        folder = Path(tmp)
        for label, model in models.items():
            if reused and not quick and model == reused["sizes"]["model"]:
                runs = reused["runs"]["pipeline"]
                log(f"breakdown: {label}: reusing the engine benchmark's {len(runs)} runs")
            else:
                config = bench_config(model, size["max_tokens"])
                runs = []
                for i in range(repeats):
                    log(f"breakdown: {label} run {i + 1}/{repeats}")
                    runs.append(pipeline_run(folder, prompts, config, f"{label}-{i}"))
            per_model[label] = {"runs": [parts_of(r) for r in runs], "median": median_parts(runs)}

        names = sorted((REPO / "data").glob("*.in"), key=lambda p: int(p.stem))
        if quick:
            names = names[:4]
        ranks = {p.name: p.read_text() for p in names}
        log(f"breakdown: {len(ranks)} sample ranks, tiny model, profiles/local")
        sample = sample_run(folder / "sample", ranks, [])
        overhead = sample["overhead_fraction"]

    header = ["part"]
    for label in per_model:
        header += [f"{label}: s", f"{label}: % of wall"]
    rows = []
    for title, key in PARTS:
        row = [title]
        for data in per_model.values():
            m = data["median"]
            row += [f"{m[key]:.2f}", f"{100 * m[key] / m['wall_s']:.0f} %"]
        rows.append(row)
    total = ["wall time of `snakemake` for the one rank"]
    for data in per_model.values():
        total += [f"{data['median']['wall_s']:.2f}", "100 %"]
    rows.append(total)
    table = markdown_table(header, rows)

    sample_table = markdown_table(
        [
            "ranks",
            "cores",
            "wall s",
            "sum of job s",
            "Snakemake overhead outside jobs",
        ],
        [
            [
                sample["ranks"],
                sample["cores"],
                f"{sample['wall_s']:.0f}",
                f"{sample['job_s_sum']:.0f}",
                f"**{100 * overhead:.1f} %**",
            ]
        ],
    )
    title = (
        f"Where a rank job's time goes: one rank, {size['prompts']} prompts x "
        f"{size['max_tokens']} tokens, profiles/local; median of {repeats} runs"
    )
    notes = [
        f"**Snakemake's own overhead in the {sample['ranks']}-rank sample run** (tiny model, "
        "profiles/local with per-rank engines on 2 cores; goal < 10 %): "
        "1 - sum of job seconds / (cores x wall), job seconds from Snakemake's job metadata:",
        sample_table,
    ]
    return {
        "name": NAME,
        "title": title,
        "table": table,
        "notes": notes,
        "per_model": per_model,
        "sample_run": sample,
        "summary": {
            "sample_overhead_fraction": overhead,
            "goal_overhead_fraction": 0.10,
            "goal_met": overhead < 0.10,
            "goal": [
                f"Snakemake's overhead, {sample['ranks']}-rank sample run",
                f"{100 * overhead:.1f} %",
                "< 10 %",
            ],
        },
    }
