"""Benchmark 7: a chat workload on warm engines against vLLM's own `run-batch`.

480 JSONL ranks of 4 chat requests each (the sample prompts as user messages, 16
tokens each with ignore_eos) on the tiny instruct model (models/tiny-chat) with
profiles/local's warm engines: output tokens per second end to end (start of
`snakemake` to its end). Baseline: the same 1,920 requests as ONE OpenAI batch file
through `python -m vllm.entrypoints.openai.run_batch` with the same engine settings and
both cores, its start included. Goal: warm / run-batch >= 1.0.

Both render the chats with the model's template: the prompt tokens of every request
must agree between the two (a check, reported in the table). The warm run's wall time
is broken down into its consecutive parts (common.warm_breakdown), with the engines'
batch over time (vLLM's running and waiting gauges), the ranks' request times and rule
summary's time (common.serving_parts).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    REPO,
    EngineLoad,
    breakdown_rows,
    fmt,
    jsonl_ranks,
    local_run,
    log,
    markdown_table,
    read_jsonl,
    run_folder,
    serving_parts,
    serving_rows,
    warm_breakdown,
)
from common import run_batch as common_run_batch

NAME = "chat_batch"
CHAT_MODEL = "./models/tiny-chat"
SAMPLING = {"max_tokens": 16, "ignore_eos": True}
SYSTEM = "You answer in one sentence."


def chat_requests(times: int) -> dict[int, list[dict]]:
    """Rank -> its requests: the sample ranks' prompts as chats, ``times`` over."""
    names = sorted((REPO / "data").glob("*.in"), key=lambda p: int(p.stem))
    ranks = {}
    for k in range(times):
        for path in names:
            prompts = [x.strip() for x in path.read_text().splitlines() if x.strip()]
            ranks[k * len(names) + int(path.stem)] = [
                {
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": p},
                    ]
                }  # fmt: skip
                for p in prompts
            ]
    return ranks


@dataclass(frozen=True)
class Workload:
    """What `compare` runs: the model, the sampling of every request, a chat template for
    a model without one (config vllm.chat_template), and the goal of warm / run-batch."""

    name: str
    label: str  # for the log lines and the table's rows
    model: str
    sampling: dict
    goal: float
    template: str | None = None
    base_port: int = 34500  # the engines' ports, apart from the tests' default ones


# issue 36: the same requests end to end in no more time than run-batch takes
CHAT = Workload(NAME, "chat", CHAT_MODEL, SAMPLING, 1.0)


def warm_run(folder: Path, ranks: dict[int, list[dict]], load: Workload = CHAT) -> dict:
    work = run_folder(folder, jsonl_ranks(ranks, {}))
    config = {"sampling": load.sampling, "model": load.model}
    config["tiles"] = {"base_port": load.base_port}
    if load.template:
        config["vllm"] = {"chat_template": str(REPO / load.template)}
    started = time.time()
    with EngineLoad(work) as load_over_time:
        timed = local_run(work, config)
    breakdown = warm_breakdown(work, started, time.time())
    serving = serving_parts(work, load_over_time.summary(started))
    prompt_tokens, tokens = {}, 0
    for rank in ranks:
        for answer in read_jsonl(work / "results" / f"{rank}.jsonl"):
            prompt_tokens[answer["id"]] = answer["prompt_tokens"]
            tokens += answer["output_tokens"]
    return {"wall_s": timed.wall_s, "max_rss_mb": timed.max_rss_mb, "output_tokens": tokens,
            "tokens_per_s": tokens / timed.wall_s, "prompt_tokens": prompt_tokens,
            "time_breakdown": breakdown, "serving": serving}  # fmt: skip


def run_batch(folder: Path, ranks: dict[int, list[dict]], load: Workload = CHAT) -> dict:
    timed, lines = common_run_batch(folder, load.model, ranks, load.sampling, load.template)
    prompt_tokens, tokens, failed = {}, 0, 0
    for answer in lines:
        if answer.get("error") or answer["response"]["status_code"] != 200:
            failed += 1
            continue
        usage = answer["response"]["body"]["usage"]
        prompt_tokens[answer["custom_id"]] = usage["prompt_tokens"]
        tokens += usage["completion_tokens"]
    return {"wall_s": timed.wall_s, "max_rss_mb": timed.max_rss_mb, "output_tokens": tokens,
            "tokens_per_s": tokens / timed.wall_s, "failed": failed,
            "prompt_tokens": prompt_tokens}  # fmt: skip


def compare(ranks: dict[int, list[dict]], load: Workload, title: str) -> dict:
    """``ranks`` on warm engines against the same requests through run-batch: the result
    run_all.py prints (table, both sides, the summary with the goal)."""
    requests = sum(len(r) for r in ranks.values())
    with tempfile.TemporaryDirectory(prefix=f"bench-{load.label}-") as tmp:
        folder = Path(tmp)
        log(f"{load.label}: {len(ranks)} JSONL ranks, {requests} chat requests, warm engines")
        warm = warm_run(folder / "warm", ranks, load)
        log(f"{load.label}: the same {requests} requests in one OpenAI batch file, run-batch")
        batch = run_batch(folder / "run-batch", ranks, load)
    agree = sum(warm["prompt_tokens"].get(k) == v for k, v in batch["prompt_tokens"].items())
    ratio = warm["tokens_per_s"] / batch["tokens_per_s"]
    rows = [
        [f"{len(ranks)} JSONL ranks on warm engines: output tok/s end to end "
         f"({warm['output_tokens']} tokens in {warm['wall_s']:.0f} s)",
         f"{warm['tokens_per_s']:.0f}"],
        [f"vLLM run-batch, one file of {requests} requests: output tok/s end to end "
         f"({batch['output_tokens']} tokens in {batch['wall_s']:.0f} s, {batch['failed']} failed)",
         f"{batch['tokens_per_s']:.0f}"],
        [f"warm / run-batch, end to end (goal >= {load.goal})", f"**{fmt(ratio)}**"],
        ["requests whose prompt tokens (the rendered chat) agree between the two",
         f"{agree} of {requests}"],
        ["peak RSS, MB: warm run (Snakemake + engines) / run-batch",
         f"{warm['max_rss_mb'] or 0:.0f} / {batch['max_rss_mb'] or 0:.0f}"],
        *breakdown_rows(warm["time_breakdown"]),
        *serving_rows(warm["serving"]),
    ]  # fmt: skip
    for result in (warm, batch):
        result.pop("prompt_tokens")
    tokens = load.sampling["max_tokens"]
    return {
        "name": load.name,
        "title": title,
        "table": markdown_table(["measure", "value"], rows),
        "warm": warm,
        "run_batch": batch,
        "summary": {
            "ratio": ratio,
            "prompt_tokens_agree": agree,
            "requests": requests,
            "goal_met": ratio >= load.goal and agree == requests,
            "goal": [
                f"{len(ranks)} chat ranks of {tokens} tokens, warm / vLLM run-batch end to end",
                fmt(ratio),
                f">= {load.goal}",
            ],
        },
    }


def run(quick: bool = False, repeats: int = 1, shared: dict | None = None) -> dict:
    ranks = chat_requests(1 if quick else 10)
    if quick:
        ranks = dict(list(ranks.items())[:8])
    title = (
        "Chat workload: JSONL ranks of chat requests on warm engines against vLLM's "
        "run-batch over the same requests in one OpenAI batch file; tiny instruct model "
        "(models/tiny-chat), 16 tokens per request, profiles/local"
    )
    return compare(ranks, CHAT, title)


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
