"""Resume inside a rank on real vLLM (models/tiny-opt on the CPU, seeded sampling): a rank
SIGKILLed mid-way, then rerun, writes the same bytes as an uninterrupted run, for `.in`
and `.jsonl` ranks. One warm engine (scripts/engine/vllm_server.py) serves every run of
the file; the rank runs in a child process as in tests/test_resume.py (the echo engine's
version, which also counts the requests the engine answered).

The engine runs one request at a time (``--max-num-seqs 1``): the answers come one after
another, so the kill lands mid-rank, and each request is computed alone whatever else is
queued. (Batches made of other requests may change a logit's last bits on a CPU, which
is vLLM's batch invariance, not resume.)
"""

from __future__ import annotations

import json
import os
import signal
import types
from pathlib import Path

import pytest

from test_infer import SEED_PROMPTS, settings
from test_jsonl_ranks import warm_vllm_pool
from test_resume import kept, rank_job
from workflow import ENGINE_SETTINGS, TINY_MODEL, read_records, wait_until

pytestmark = pytest.mark.vllm

REQUESTS = 24
SETTINGS = settings(TINY_MODEL) | {"engine_args": ["--max-num-seqs", "1"]}


def texts(path: Path) -> list[str]:
    """The generated texts of a rank's output, in order."""
    if path.suffix == ".out":
        return [generated for _, generated in read_records(path)]
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The url and API key of one warm vLLM engine of the tiny model."""
    folder = tmp_path_factory.mktemp("engine")
    pool = warm_vllm_pool(folder, TINY_MODEL, SETTINGS | ENGINE_SETTINGS)
    with pool as ranks, ranks.route() as routed:
        yield types.SimpleNamespace(
            url=routed.url, api_key=routed.api_key, engine_id=routed.engine_id
        )


@pytest.mark.parametrize("kind", ["in", "jsonl"])
def test_a_sigkilled_rank_resumes_to_the_bytes_of_an_uninterrupted_seeded_run(
    tmp_path, engine, kind
):
    assert SETTINGS["sampling"]["seed"] is not None and SETTINGS["sampling"]["temperature"] > 0
    # prompts that differ from the first token on, so that their answers differ too
    prompts = [f"{i * 7919} {SEED_PROMPTS[i % 4]} " + "and " * (i % 5) for i in range(REQUESTS)]
    if kind == "jsonl":  # each line its own seed too, which its resumed request must carry
        lines = [json.dumps({"prompt": p, "id": f"r{i}", "seed": i}) for i, p in enumerate(prompts)]
    else:
        lines = prompts
    text = "".join(line + "\n" for line in lines)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    for folder in (whole, stopped):
        (folder / "results").mkdir(parents=True)
        (folder / f"5.{kind}").write_text(text)
    out_name = f"5.{'jsonl' if kind == 'jsonl' else 'out'}"

    # the uninterrupted run
    done = rank_job(engine, whole / f"5.{kind}", whole / "results" / out_name, SETTINGS)
    assert done.wait(300) == 0, done.stderr.read()[-3000:]
    assert len(set(texts(whole / "results" / out_name))) > 1  # not one answer for all

    # the same rank, SIGKILLed once some answers are kept
    output = stopped / "results" / out_name
    partial = stopped / "results" / ".partial" / out_name
    job = rank_job(engine, stopped / f"5.{kind}", output, SETTINGS)
    try:
        assert wait_until(lambda: kept(partial) >= 3, 300, poll=0.02), "no answers kept"
        os.kill(job.pid, signal.SIGKILL)
    finally:
        job.wait(30)
    assert job.returncode == -signal.SIGKILL
    assert not output.exists()  # nothing half-written
    have = kept(partial)
    assert 3 <= have < REQUESTS

    rerun = rank_job(engine, stopped / f"5.{kind}", output, SETTINGS)
    assert rerun.wait(300) == 0, rerun.stderr.read()[-3000:]
    assert output.read_bytes() == (whole / "results" / out_name).read_bytes()
    record = json.loads(output.with_name(out_name + ".record").read_text())
    assert record["resumed"] == have and record["prompts"] == REQUESTS
    assert not partial.exists()  # its answers are in the output now
