"""A rank answered by an engine of its own (per-rank engines, config warm_engines: false): a
vLLM engine in this process behind vLLM's own front end, sent the rank's requests as a
warm engine is (rank/warm.py).

vLLM is imported only when a rank runs (never by the Snakefile or the tests' imports).
"""

from __future__ import annotations

import os
import time

from formats.partial import Partial
from rank import warm
from rank.jsonl import Request, embedding_rank, error_answer, refused_answer

# A request's answer may take this long on a per-rank engine (as a warm engine's default).
REQUEST_TIMEOUT_S = 600.0


def server_argv(settings: dict, tile_ids: str, pooling: bool = False) -> list[str]:
    """A per-rank engine's arguments: vLLM's server's, from --model on, as a warm engine of
    the same settings gets them (engine/lifecycle.py); an engine on several tiles
    (TILE_IDS "4,5") runs tensor parallel over all of them, as ALCF and the seed's author
    run TP on Aurora. A pooling rank's engine runs as a pooling model."""
    from engine import lifecycle

    tiles = max(1, len([t for t in tile_ids.split(",") if t]))
    argv = lifecycle.server_argv("python", settings["model"], 0, settings, tiles)
    argv = argv[argv.index("--model") :]
    cut = argv.index("--host")
    argv = argv[:cut] + argv[cut + 4 :]  # --host H --port P: the engine's own, loopback
    if pooling and "--runner" not in argv:
        argv += ["--runner", "pooling"]
    return argv


def run_vllm(
    requests: list[Request], settings: dict, path: str, partial: Partial, kept: dict
) -> dict:
    """Start one vLLM engine in this process, behind vLLM's own front end on a loopback
    port (engine/vllm_server.py Engine), and send it the rank's requests that ``kept``
    lacks as a warm engine gets them (rank/warm.py), all in flight together, each answer
    kept in ``partial`` as it finishes."""
    # Timed on its own: importing vLLM (and torch) is a large part of a rank's start.
    t0 = time.monotonic()
    from vllm import LLM  # noqa: F401  (the engine's modules: `import vllm` alone is lazy)

    from engine import vllm_server

    import_s = time.monotonic() - t0
    argv = server_argv(settings, os.environ.get("TILE_IDS", ""), embedding_rank(requests))
    t0 = time.monotonic()
    engine = vllm_server.Engine(argv)
    load_s = time.monotonic() - t0
    try:
        answers = dict(kept)
        # refused as read: answered here, never tokenized or sent
        answers |= {i: refused_answer(r) for i, r in enumerate(requests) if r.error}
        refused = {} if settings["bad_requests"] == "error_line" else None
        inputs, truncated, context = warm.engine_inputs(
            requests, settings, path, engine.url, None, refused
        )
        for i, message in (refused or {}).items():
            answers.setdefault(i, error_answer(message))
        todo = [i for i in range(len(requests)) if i not in answers]
        generate_s = warm.send_requests(
            engine, requests, inputs, todo, settings, partial, answers, REQUEST_TIMEOUT_S, context
        )
    finally:
        engine.stop()
    if len(answers) != len(requests):
        raise RuntimeError(f"vLLM answered {len(answers)} of {len(requests)} requests")
    import torch
    import vllm

    return {
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
        "answers": answers,
        "import_s": import_s,
        "load_s": load_s,
        "generate_s": generate_s,
        "truncated": truncated,
    }
