"""scripts/stage_model.py: one launcher call copies the model to every node, and the
step fails unless every node reports its copy. The hosts are simulated here by a
launcher that runs the command once per node index; the real thing (pbsdsh on the
OpenPBS cluster) is in tests/test_aurora_profile.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import stage_model
from workflow import TINY_MODEL

# Runs the command once per node index given, as a launcher with one process per node.
PER_NODE = 'for i in {nodes}; do PBS_NODENUM=$i "$@" || exit $?; done'


def setup(tmp_path: Path, monkeypatch, nodes: str) -> Path:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("nodeA\nnodeA\nnodeB\n")  # PBS lists a host once per chunk
    monkeypatch.setenv("PBS_NODEFILE", str(nodefile))
    monkeypatch.setenv("PBS_JOBID", "7.pbs-head")
    settings = tmp_path / "r0-3.stage.json"
    launcher = ["sh", "-c", PER_NODE.format(nodes=nodes), "launcher"]
    settings.write_text(
        json.dumps(
            {
                "model": str(TINY_MODEL),
                "stage_dir": str(tmp_path / "local"),
                "node_launcher": launcher,
                "python": stage_model.sys.executable,
            }
        )
    )
    return settings


def test_copy_to_every_node_then_remove(tmp_path, monkeypatch, capfd):
    settings = setup(tmp_path, monkeypatch, "0 1")
    assert stage_model.main(["copy", str(settings)]) == 0
    for host in ("nodeA", "nodeB"):
        copy = stage_model.staged_path(str(tmp_path / "local"), "7.pbs-head", host, str(TINY_MODEL))
        assert (copy / "config.json").read_bytes() == (TINY_MODEL / "config.json").read_bytes()
    out = capfd.readouterr().out
    assert out.count("stage_model: copy on 2 node(s)") == 1 and "nodeB: " in out
    assert stage_model.main(["remove", str(settings)]) == 0
    assert list((tmp_path / "local").iterdir()) == []
    assert not list(tmp_path.glob("*.done"))


def test_a_node_that_did_not_copy_fails_the_step(tmp_path, monkeypatch, capfd):
    settings = setup(tmp_path, monkeypatch, "0")  # the launcher reached one node only
    assert stage_model.main(["copy", str(settings)]) == 1
    assert "no report from nodeB" in capfd.readouterr().err


def test_the_node_is_found_by_its_name_else_by_its_index(monkeypatch):
    hosts = ["x1.hsn.cm.aurora", "x2.hsn.cm.aurora"]
    assert stage_model.this_host(hosts, {"PALS_NODEID": "1"}) == "x2.hsn.cm.aurora"
    monkeypatch.setattr(stage_model.tiles.socket, "gethostname", lambda: "x1")
    assert stage_model.this_host(hosts, {}) == "x1.hsn.cm.aurora"
    # mpiexec passes the job script's PBS_NODENUM=0 on to every node: the name wins
    monkeypatch.setattr(stage_model.tiles.socket, "gethostname", lambda: "x2")
    assert stage_model.this_host(hosts, {"PBS_NODENUM": "0"}) == "x2.hsn.cm.aurora"
    monkeypatch.setattr(stage_model.tiles.socket, "gethostname", lambda: "elsewhere")
    with pytest.raises(SystemExit, match="cannot tell"):
        stage_model.this_host(["y9"], {})


def test_empty_node_launcher_is_named(tmp_path, monkeypatch):
    settings = setup(tmp_path, monkeypatch, "0 1")
    settings.write_text(json.dumps(json.loads(settings.read_text()) | {"node_launcher": []}))
    with pytest.raises(SystemExit, match="node_launcher is empty"):
        stage_model.main(["copy", str(settings)])
