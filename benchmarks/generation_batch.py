"""Benchmark: a generation-bound workload on warm engines against vLLM's own `run-batch`
(issue 36): the engines' time dominates, not their start.

480 JSONL ranks of 4 chat requests each (`chat_batch`'s: the sample prompts, here 128
tokens each with ignore_eos) on the 125M-shaped model (models/opt-125m-shaped, with
examples/jsonl/chat-template.jinja: vLLM 0.32's run-batch takes no completion lines) with
profiles/local's warm engines: output tokens per second end to end (start of `snakemake`
to its end).
Baseline: the same 1,920 requests as ONE OpenAI batch file through `python -m
vllm.entrypoints.openai.run_batch` with the same engine settings and both cores, its start
included. Goal: warm / run-batch >= 1.0. The warm run's wall time is broken down as in
`chat_batch` (common.warm_breakdown).

`--quick`: 8 ranks of 16 tokens, to check it runs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from chat_batch import CHAT, chat_requests, compare
from common import BENCH_MODEL

NAME = "generation_batch"
GENERATION = replace(
    CHAT,
    name=NAME,
    label="generation",
    model=BENCH_MODEL,
    sampling={"max_tokens": 128, "ignore_eos": True},
    goal=1.0,
    template="examples/jsonl/chat-template.jinja",
    base_port=34600,
)


def run(quick: bool = False, repeats: int = 1, shared: dict | None = None) -> dict:
    ranks = chat_requests(1 if quick else 10)
    load = GENERATION
    if quick:
        ranks = dict(list(ranks.items())[:8])
        load = replace(load, sampling={"max_tokens": 16, "ignore_eos": True})
    title = (
        "Generation-bound workload: JSONL ranks of chat requests on warm engines against "
        "vLLM's run-batch over the same requests in one OpenAI batch file; 125M-shaped "
        f"model (models/opt-125m-shaped), {load.sampling['max_tokens']} tokens per request, "
        "profiles/local"
    )
    return compare(ranks, load, title)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
