"""Rule fetch_model beside a local run's engines (model/fetch.py `serve`, model/prepare.py):
the first engine to claim the model's checks runs them in its own process; the rule takes
their status, runs fetch.py itself when no engine claimed them, and fails when their
engine died first.
The real runs: tests/test_workflow_local_vllm.py (checks passed, and refused) and
tests/test_vllm015.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import workflow as wf
from engine import lifecycle, supervisor
from model import fetch, prepare
from placement import node_layout


def test_engines_beside_the_rule_start_through_fetch_py(tmp_path):
    beside = [str(wf.REPO / "scripts" / "model" / "fetch.py"), "--log", "/r/f.log", "--serve"]
    slot = node_layout.Slot("x1", (0,))
    spec = wf.aurora_engine_spec("/m/opt") | {"python": "py", "prepare": beside}
    argv = supervisor.make_engine(spec, slot, "1", tmp_path, {}).argv
    plain = supervisor.make_engine(spec | {"prepare": []}, slot, "1", tmp_path, {}).argv
    assert plain[:2] == ["py", str(lifecycle.INPROCESS_SERVER)]
    assert argv == ["py", *beside, *plain[2:]]  # the server's own arguments follow --serve
    # vLLM's own server never starts beside the rule (rank_job.start_beside_fetch)
    own = supervisor.make_engine(spec | {"server": "vllm"}, slot, "1", tmp_path, {}).argv
    assert own[1:3] == ["-m", lifecycle.SERVER_MODULE]


def test_one_claim_of_the_checks_and_the_rule_takes_the_engines_status(tmp_path):
    log = str(tmp_path / "fetch_model.log")
    assert fetch.claimant(log) is None and fetch.status(log) is None
    assert fetch.claim(log) and not fetch.claim(log)  # the second engine waits
    assert fetch.claimant(log) == os.getpid()
    threading.Timer(0.3, lambda: (tmp_path / "fetch_model.log.status").write_text("3\n")).start()
    assert prepare.status_beside(log) == 3
    fetch.forget(log)
    assert fetch.claimant(log) is None and fetch.status(log) is None


def test_the_rule_fails_when_their_engine_died_and_runs_them_when_none_claimed_them(tmp_path):
    log = str(tmp_path / "fetch_model.log")
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (tmp_path / "fetch_model.log.claim").write_text(f"{engine.pid}\n")
    killed = threading.Timer(0.3, engine.kill)
    killed.start()
    started = time.monotonic()
    # a zombie (not reaped: this test is its parent) counts as gone
    with pytest.raises(RuntimeError, match=rf"checks \(pid {engine.pid}\) ended before they did"):
        prepare.status_beside(log, claim_wait_s=600)
    assert time.monotonic() - started < 30
    engine.wait()
    fetch.forget(log)
    # no engine claimed them: the rule claims them (no engine can now) and runs them
    assert prepare.status_beside(log, claim_wait_s=0.2) is None
    assert fetch.claimant(log) == os.getpid() and not fetch.claim(log)


def test_checks_in_an_engine_write_to_the_rules_log_and_give_the_output_back(tmp_path):
    """In an engine's process (its stdout and stderr are its own log): the checks' output
    goes to the rule's log, then the engine's own lines to its log again."""
    log = str(tmp_path / "fetch_model.log")
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from model import fetch

        def main(argv):
            print("versions: checked", argv)
            print("ERROR: refused", file=sys.stderr)
            raise SystemExit("vLLM does not support architecture 'X'")

        fetch.main = main
        fetch.prepare_here(["--model", "m"], sys.argv[2])
        print("the engine's own line")
        """
    )
    engine = subprocess.run(
        [sys.executable, "-c", script, str(wf.REPO / "scripts"), log],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert engine.returncode == 0, engine.stderr
    text = (tmp_path / "fetch_model.log").read_text()
    assert "versions: checked ['--model', 'm']" in text and "ERROR: refused" in text
    assert "vLLM does not support architecture 'X'" in text
    assert fetch.status(log) == 1
    assert "versions" not in engine.stdout + engine.stderr
    assert "the engine's own line" in engine.stdout
    assert "the model's checks ended with status 1 here" in engine.stderr
