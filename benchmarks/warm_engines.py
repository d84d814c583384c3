"""Benchmark 5: warm engines (one vLLM server per tile for the whole run) against one
engine per rank, and against a bare script, with profiles/local on this machine.

1. The 48 sample ranks (tiny model): wall time of the whole `snakemake` run with warm
   engines against the same run with per-rank engines (the time_breakdown
   benchmark's sample run when it ran first, else run here). Goal: >= 5x faster.
2. 480 ranks (the sample x 10, 1,920 prompts, 16 tokens each with ignore_eos): output
   tokens per second end to end (start of `snakemake` to its end, rule fetch_model's
   model-info cache included) against a bare script that runs all 1,920 prompts in
   one `LLM.generate` with the same engine settings, its start included. Goal: >= 0.8 (issue 36).
3. How long a rank whose .out is whole stays marked incomplete by Snakemake (a kill in
   that window makes `--rerun-incomplete` redo it), per-rank and warm engines.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from common import (
    PYTHON,
    REPO,
    TINY_MODEL,
    deep_merge,
    finish_windows,
    fmt,
    local_profile_config,
    log,
    markdown_table,
    median,
    run_folder,
    run_timed,
)
from engine_efficiency import bare_run

NAME = "warm_engines"
SAMPLING = {"max_tokens": 16, "ignore_eos": True}


def sample_ranks(times: int) -> dict[str, str]:
    """The sample data, ``times`` over (rank r of copy k is rank 48 k + r)."""
    names = sorted((REPO / "data").glob("*.in"), key=lambda p: int(p.stem))
    return {
        f"{k * len(names) + int(p.stem)}.in": p.read_text() for k in range(times) for p in names
    }


def workflow_run(folder: Path, ranks: dict[str, str], warm: bool) -> dict:
    """All ranks with profiles/local (tiny model, 16 tokens each); wall time and tokens."""
    work = run_folder(folder, ranks)
    overrides = work / "bench.yaml"
    overrides.write_text(json.dumps({"warm_engines": warm, "sampling": SAMPLING}))
    argv = [PYTHON, "-m", "snakemake", "--profile", "profiles/local", "--configfile"]
    argv += [str(REPO / "profiles" / "local" / "local.yaml"), str(overrides)]
    if not warm:
        argv += ["--cores", "2"]  # as many per-rank engines as cores
    timed = run_timed(argv, cwd=work, timeout=5400)
    records = [json.loads(p.read_text()) for p in (work / "results" / "records").glob("*.json")]
    if len(records) != len(ranks):
        raise RuntimeError(f"{len(records)} records for {len(ranks)} ranks")
    tokens = sum(r["output_tokens"] for r in records)
    return {
        "ranks": len(ranks),
        "warm": warm,
        "wall_s": timed.wall_s,
        "max_rss_mb": timed.max_rss_mb,
        "output_tokens": tokens,
        "tokens_per_s": tokens / timed.wall_s,
        "engines": sorted({r.get("engine_name", "") for r in records}),
        "finish_window": finish_windows(work, ranks),
    }


def run(quick: bool = False, repeats: int = 3, shared: dict | None = None) -> dict:
    times = 1 if quick else 10
    sample, big = sample_ranks(1), sample_ranks(times)
    if quick:
        sample = dict(list(sample.items())[:8])
        big = sample
    repeats = 1 if quick else max(1, min(repeats, 2))
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as tmp:
        folder = Path(tmp)
        warm_sample = []
        for i in range(repeats):
            log(f"warm: {len(sample)} sample ranks, warm engines, run {i + 1}/{repeats}")
            warm_sample.append(workflow_run(folder / f"warm-{i}", sample, True))
        reused = (shared or {}).get("time_breakdown")
        if reused and not quick:
            per_rank_wall = reused["sample_run"]["wall_s"]
            per_rank_window = reused["sample_run"]["finish_window"]
            log("warm: per-rank sample run reused from the time_breakdown benchmark")
        else:
            log(f"warm: {len(sample)} sample ranks, per-rank engines")
            per_rank = workflow_run(folder / "per-rank", sample, False)
            per_rank_wall, per_rank_window = per_rank["wall_s"], per_rank["finish_window"]
        log(f"warm: {len(big)} ranks, warm engines")
        warm_big = workflow_run(folder / "big", big, True)
        prompts = [
            line.strip() for text in big.values() for line in text.splitlines() if line.strip()
        ]
        prompt_file = folder / "prompts.txt"
        prompt_file.write_text("\n".join(prompts) + "\n")
        config = deep_merge(local_profile_config(), {"sampling": SAMPLING})
        config["model"] = TINY_MODEL
        log(f"warm: bare script, {len(prompts)} prompts in one LLM.generate")
        # The same engine settings, and both cores: the warm run has two engines.
        bare = bare_run(prompt_file, config, {"OMP_NUM_THREADS": str(os.cpu_count() or 2)})

    warm_wall = median([r["wall_s"] for r in warm_sample])
    speedup = per_rank_wall / warm_wall
    ratio = warm_big["tokens_per_s"] / bare["end_to_end_tokens_per_s"]
    warm_window = warm_big["finish_window"]
    rows = [
        [f"{len(sample)} sample ranks: wall s, per-rank engines", f"{per_rank_wall:.0f}"],
        [
            f"{len(sample)} sample ranks: wall s, warm engines (median of {repeats})",
            f"{warm_wall:.0f}",
        ],
        ["speed-up, warm over per-rank (goal >= 5)", f"**{speedup:.1f}x**"],
        [
            f"{warm_big['ranks']} ranks, warm: output tok/s end to end "
            f"({warm_big['output_tokens']} tokens in {warm_big['wall_s']:.0f} s)",
            f"{warm_big['tokens_per_s']:.0f}",
        ],
        [
            f"bare script, {len(prompts)} prompts in one LLM.generate: output tok/s end to end "
            f"(start {bare['import_s'] + bare['load_s']:.0f} s, generate "
            f"{bare['generate_s']:.1f} s)",
            f"{bare['end_to_end_tokens_per_s']:.0f}",
        ],
        ["warm / bare, end to end (goal >= 0.8)", f"**{fmt(ratio)}**"],
        [
            "a rank's whole .out still marked incomplete by Snakemake (a kill then redoes it), "
            "median / max ms: per-rank engines (sample run)",
            f"{per_rank_window['median_ms']:.0f} / {per_rank_window['max_ms']:.0f}",
        ],
        [
            f"the same, warm engines ({warm_big['ranks']}-rank run)",
            f"{warm_window['median_ms']:.0f} / {warm_window['max_ms']:.0f}",
        ],
        [
            "peak RSS of the warm 480-rank run (Snakemake + engines), MB",
            f"{warm_big['max_rss_mb']:.0f}",
        ],
    ]
    return {
        "name": NAME,
        "title": (
            "Warm engines: two vLLM servers (one per core) for the whole run against one "
            "engine per rank, and against a bare one-`LLM.generate` script; tiny model, "
            "16 tokens per prompt, profiles/local"
        ),
        "table": markdown_table(["measure", "value"], rows),
        "sample": {
            "warm": warm_sample,
            "per_rank_wall_s": per_rank_wall,
            "per_rank_finish_window": per_rank_window,
        },
        "big": warm_big,
        "bare": bare,
        "summary": {
            "speedup": speedup,
            "ratio": ratio,
            "goal_met": speedup >= 5 and ratio >= 0.8,
            "goal": [
                "48-rank sample, warm over per-rank wall time; 480 ranks warm / bare end to end",
                f"{speedup:.1f}x; {fmt(ratio)}",
                ">= 5x; >= 0.8",
            ],
        },
    }
