"""Benchmark 1: does the pipeline cost throughput? One rank job vs. bare vLLM vs. naive.

* pipeline: ``snakemake --profile profiles/local results/0.out`` in a scratch run
  folder whose data/0.in holds the prompts; the rank's record gives the generation
  rate (tokens_per_s), and the command's wall time the end-to-end rate.
* bare vLLM: benchmarks/bare_vllm.py, one ``LLM.generate`` call, same prompts, same
  engine settings and environment (read from profiles/local at run time).
* naive: benchmarks/naive_transformers.py, transformers ``generate`` one prompt at a
  time; sequential, so its rate does not depend on the number of prompts and a
  subset of them is timed.

Pipeline and bare runs alternate, so slow phases of a shared machine hit both.
All three get the engine environment of profiles/local (task_env, KV cache), so
the same OpenMP thread count. One more bare run first (it also warms the page
cache) uses every core (OMP_NUM_THREADS = cores): what that setting costs a rank
that runs alone.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from common import (
    BENCH_MODEL,
    PYTHON,
    REPO,
    TINY_MODEL,
    bench_prompts,
    deep_merge,
    engine_environment,
    fmt,
    job_seconds,
    local_profile_config,
    log,
    markdown_table,
    median,
    model_path,
    run_folder,
    run_timed,
    spread,
)

NAME = "engine_efficiency"


def sizes(quick: bool) -> dict:
    if quick:
        return {"model": TINY_MODEL, "prompts": 8, "max_tokens": 16, "naive_prompts": 4}
    return {"model": BENCH_MODEL, "prompts": 64, "max_tokens": 64, "naive_prompts": 8}


def bench_config(model: str, max_tokens: int) -> dict:
    """profiles/local's config with the benchmark's model and sampling."""
    sampling = {"max_tokens": max_tokens, "ignore_eos": True}
    return deep_merge(local_profile_config(), {"model": model, "sampling": sampling})


def pipeline_run(folder: Path, prompts: list[str], config: dict, run_dir_name: str) -> dict:
    """One rank through the real workflow; the numbers of its record and its wall time."""
    from workflow import write_config

    work = run_folder(folder / run_dir_name, {"0.in": "\n".join(prompts) + "\n"})
    # One engine per rank, in-process: this compares the engine, not warm serving
    # (benchmarks/warm_engines.py does that).
    overrides = {"model": config["model"], "sampling": config["sampling"], "warm_engines": False}
    argv = [
        PYTHON,
        "-m",
        "snakemake",
        "--profile",
        "profiles/local",
        "results/0.out",
        "--configfile",
        str(REPO / "profiles" / "local" / "local.yaml"),
        str(write_config(work, overrides)),
    ]
    timed = run_timed(argv, cwd=work)
    record = json.loads((work / "results" / "records" / "0.json").read_text())
    job_s = job_seconds(work, "results/0.out")
    return {
        "wall_s": timed.wall_s,
        "job_s": job_s,
        "max_rss_mb": timed.max_rss_mb,
        "record": record,
        "tokens_per_s": record["tokens_per_s"],
        "end_to_end_tokens_per_s": record["output_tokens"] / timed.wall_s,
    }


def baseline_run(
    script: str, config: dict, prompt_file: Path, settings: dict, env: dict, extra=()
) -> tuple:
    """Run a baseline script of benchmarks/; its timing and the JSON line it prints last."""
    argv = [
        PYTHON,
        str(REPO / "benchmarks" / script),
        "--model",
        str(model_path(config["model"])),
        "--prompts",
        str(prompt_file),
        "--settings",
        json.dumps(settings),
        *extra,
    ]
    timed = run_timed(argv, env=env)
    return timed, json.loads(timed.stdout.strip().splitlines()[-1])


def bare_run(prompt_file: Path, config: dict, extra_env: dict | None = None) -> dict:
    settings = {
        "dtype": config["vllm"]["dtype"],
        "enforce_eager": config["vllm"]["enforce_eager"],
    } | {key: config["sampling"][key] for key in config["sampling"]}
    env = {**os.environ, **engine_environment(config), **(extra_env or {})}
    timed, result = baseline_run("bare_vllm.py", config, prompt_file, settings, env)
    result["wall_s"] = timed.wall_s
    result["max_rss_mb"] = timed.max_rss_mb
    result["end_to_end_tokens_per_s"] = result["output_tokens"] / timed.wall_s
    return result


def naive_run(prompt_file: Path, config: dict, passes: int) -> dict:
    settings = {"dtype": config["vllm"]["dtype"]} | dict(config["sampling"])
    env = {**os.environ, **engine_environment(config), "HF_HUB_OFFLINE": "1"}
    extra = ["--passes", str(passes)]
    return baseline_run("naive_transformers.py", config, prompt_file, settings, env, extra)[1]


def run(quick: bool = False, repeats: int = 3, shared: dict | None = None) -> dict:
    size = sizes(quick)
    model_path(size["model"])
    config = bench_config(size["model"], size["max_tokens"])
    prompts = bench_prompts(size["prompts"])
    pipeline, bare = [], []
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        folder = Path(tmp)
        prompt_file = folder / "prompts.txt"
        prompt_file.write_text("\n".join(prompts) + "\n")
        cores = str(os.cpu_count() or 1)
        log(f"engine: bare vLLM with OMP_NUM_THREADS={cores} (and warm-up), {size['model']}")
        all_cores = bare_run(prompt_file, config, {"OMP_NUM_THREADS": cores})
        for i in range(repeats):
            log(f"engine: pipeline run {i + 1}/{repeats}")
            pipeline.append(pipeline_run(folder, prompts, config, f"run-{i}"))
            log(f"engine: bare vLLM run {i + 1}/{repeats}")
            bare.append(bare_run(prompt_file, config))
        naive_file = folder / "naive.txt"
        naive_file.write_text("\n".join(prompts[: size["naive_prompts"]]) + "\n")
        log(f"engine: naive transformers, {size['naive_prompts']} prompts x {repeats} passes")
        naive = naive_run(naive_file, config, repeats)

    def med(runs, key):
        return median([r[key] for r in runs])

    gen_ratio = med(pipeline, "tokens_per_s") / med(bare, "tokens_per_s")
    e2e_ratio = med(pipeline, "end_to_end_tokens_per_s") / med(bare, "end_to_end_tokens_per_s")
    naive_rates = [p["tokens_per_s"] for p in naive["passes"]]
    speedup = med(pipeline, "tokens_per_s") / median(naive_rates)
    all_cores_ratio = med(pipeline, "tokens_per_s") / all_cores["tokens_per_s"]
    summary = {
        "generation_ratio_pipeline_over_bare": gen_ratio,
        "end_to_end_ratio_pipeline_over_bare": e2e_ratio,
        "speedup_over_naive": speedup,
        "ratio_pipeline_over_bare_with_all_cores": all_cores_ratio,
        "goal_generation_ratio": 0.95,
        "goal_met": gen_ratio >= 0.95,
        "goal": [
            "pipeline / bare vLLM, generation tok/s",
            f"{gen_ratio:.3f} (naive: pipeline {speedup:.1f}x faster)",
            ">= 0.95",
        ],
    }
    rows = [
        [
            "generation, output tok/s",
            spread([r["tokens_per_s"] for r in pipeline]),
            spread([r["tokens_per_s"] for r in bare]),
            f"**{gen_ratio:.3f}** (goal >= 0.95)",
        ],
        [
            "end to end (start, import, load, generate, write), output tok/s",
            spread([r["end_to_end_tokens_per_s"] for r in pipeline]),
            spread([r["end_to_end_tokens_per_s"] for r in bare]),
            f"{e2e_ratio:.3f}",
        ],
        [
            "wall time of one rank job, s",
            spread([r["wall_s"] for r in pipeline]),
            spread([r["wall_s"] for r in bare]),
            "",
        ],
        [
            f"for comparison: bare vLLM with OMP_NUM_THREADS={cores} (all cores, one run), "
            "generation tok/s",
            "",
            fmt(all_cores["tokens_per_s"]),
            f"{all_cores_ratio:.3f}",
        ],
        [
            f"naive transformers, one prompt at a time ({size['naive_prompts']} of the "
            "prompts, same environment), output tok/s",
            "",
            spread(naive_rates),
            f"pipeline is **{speedup:.1f}x** faster",
        ],
    ]
    title = (
        f"Engine efficiency: {size['model']}, {size['prompts']} prompts x "
        f"{size['max_tokens']} output tokens (ignore_eos), profiles/local engine settings; "
        f"median (min-max) of {repeats} alternating runs"
    )
    table = markdown_table(["measure", "pipeline", "baseline", "ratio"], rows)
    settings = ", ".join(f"{k}={config['vllm'][k]}" for k in ("dtype", "enforce_eager"))
    environment = ", ".join(f"{k}={v}" for k, v in engine_environment(config).items())
    notes = [f"Engine settings (profiles/local, read at run time): {settings}; {environment}."]
    return {
        "name": NAME,
        "title": title,
        "table": table,
        "notes": notes,
        "summary": summary,
        "sizes": size,
        "config": {"vllm": config["vllm"], "sampling": config["sampling"]},
        "environment": engine_environment(config),
        "cores": os.cpu_count(),
        "runs": {
            "pipeline": pipeline,
            "bare_vllm": bare,
            "bare_vllm_all_cores": all_cores,
            "naive_transformers": naive,
        },
        "medians": {
            "pipeline_tokens_per_s": med(pipeline, "tokens_per_s"),
            "bare_tokens_per_s": med(bare, "tokens_per_s"),
            "naive_tokens_per_s": median(naive_rates),
            "pipeline_wall_s": med(pipeline, "wall_s"),
            "bare_wall_s": med(bare, "wall_s"),
        },
        "headline": f"pipeline/bare generation {fmt(gen_ratio)}, {speedup:.1f}x naive",
    }
