"""Resume inside a rank: a rank SIGKILLed mid-way keeps the answers it has
(results/.partial/<rank>.<ext>, appended and fsynced per answer), and its rerun sends
the engine only the missing requests; the output equals an uninterrupted run's.

The engine is a real echo server (scripts/engine/echo_server.py) that holds each request
(--delay) and at most two at once (--max-num-seqs), so the answers come one after
another; the rank runs in a child process (warm.serve_rank, as a warm rank job runs
it) routed to that engine, and the engine counts the requests it answered (/metrics).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from engine.lifecycle import Engine
from workflow import free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
PYTHON = sys.executable
REQUESTS = 40

# One warm rank job, as rank_job.serve_rank runs it, against one engine.
RANK_JOB = """
import contextlib
import json
import sys
import types
sys.path.insert(0, {scripts!r})
from rank import task
from rank import checks
from rank import warm
from formats.partial import resume

url, key, settings, rank_file, output = sys.argv[1:6]
engine = types.SimpleNamespace(url=url, api_key=key or None, env={{}}, name="engine",
                               log_path="engine.log", engine_id=None)


class OneEngine:
    @contextlib.contextmanager
    def route(self, timeout=None):
        yield engine

    def mark_failed(self, failed):
        raise SystemExit("the engine failed")


settings = checks.parse_settings(settings)
print(warm.serve_rank(5, settings, rank_file, output, output + ".record", OneEngine(),
                      resume(output, rank_file, settings)), flush=True)
"""
ECHO_SETTINGS = {"engine": "echo", "model": "echo"}


def engine_counts(engine: Engine) -> tuple[float, float]:
    """(requests answered, requests held) as the engine's /metrics says."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"{engine.url}/metrics", timeout=5) as answer:
        lines = answer.read().decode().splitlines()

    def total(name: str) -> float:
        return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(name))

    return total("vllm:request_success_total"), total("vllm:num_requests_running")


def rank_job(
    engine: Engine, rank_file: Path, output: Path, settings: dict = ECHO_SETTINGS
) -> subprocess.Popen:
    """The rank job in a child process (``engine``: its url and API key)."""
    code = RANK_JOB.format(scripts=str(SCRIPTS))
    argv = [engine.url, engine.api_key or "", json.dumps(settings), str(rank_file), str(output)]
    return subprocess.Popen(
        [PYTHON, "-c", code, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kept(partial: Path) -> int:
    """Answers in a partial file (after its key line; a torn last line does not count)."""
    if not partial.exists():
        return 0
    count = 0
    for line in partial.read_text().splitlines()[1:]:
        try:
            json.loads(line)
            count += 1
        except ValueError:
            pass
    return count


@pytest.fixture
def held_engine(tmp_path):
    port = free_port()
    argv = [PYTHON, str(SCRIPTS / "engine" / "echo_server.py"), "--port", str(port),
            "--delay", "0.3", "--max-num-seqs", "2"]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    engine = Engine(argv, env, tmp_path / "echo.log", port, name="echo", stop_grace=5)
    engine.start()
    engine.wait_ready(60)
    yield engine
    engine.stop()


@pytest.mark.parametrize("kind", ["jsonl", "in"])
def test_a_sigkilled_rank_resumes_with_only_the_missing_requests(tmp_path, held_engine, kind):
    if kind == "jsonl":
        lines = [json.dumps({"prompt": f"prompt {i}", "id": f"r{i}"}) for i in range(REQUESTS)]
    else:
        lines = [f"prompt number {i}" for i in range(REQUESTS)]
    text = "".join(line + "\n" for line in lines)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    for folder in (whole, stopped):
        (folder / "results").mkdir(parents=True)
        (folder / f"5.{kind}").write_text(text)
    out_name = "5.jsonl" if kind == "jsonl" else "5.out"

    # the uninterrupted run
    before, _ = engine_counts(held_engine)
    done = rank_job(held_engine, whole / f"5.{kind}", whole / "results" / out_name)
    assert done.wait(120) == 0, done.stderr.read()[-3000:]
    assert engine_counts(held_engine)[0] - before == REQUESTS  # one request per prompt

    # the same rank, SIGKILLed once some answers are kept
    output = stopped / "results" / out_name
    partial = stopped / "results" / ".partial" / out_name
    job = rank_job(held_engine, stopped / f"5.{kind}", output)
    try:
        assert wait_until(lambda: kept(partial) >= 10, 60), "no answers kept"
        os.kill(job.pid, signal.SIGKILL)
    finally:
        job.wait(30)
    assert job.returncode == -signal.SIGKILL
    assert not output.exists()  # nothing half-written
    # the requests the killed job had sent end at the engine; then count afresh
    assert wait_until(lambda: engine_counts(held_engine)[1] == 0, 60)
    have = kept(partial)
    assert 10 <= have < REQUESTS
    before, _ = engine_counts(held_engine)
    rerun = rank_job(held_engine, stopped / f"5.{kind}", output)
    assert rerun.wait(120) == 0, rerun.stderr.read()[-3000:]
    assert engine_counts(held_engine)[0] - before == REQUESTS - have  # only the missing ones
    assert output.read_bytes() == (whole / "results" / out_name).read_bytes()
    record = json.loads(Path(str(output) + ".record").read_text())
    assert record["resumed"] == have and record["prompts"] == REQUESTS
    assert not partial.exists()  # its answers are in the output now
