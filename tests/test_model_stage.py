"""scripts/model/stage.py: one launcher call checks every node (preflight) and copies
the model to it, and the step fails unless every node reports its copy. The hosts are
simulated here by a launcher that runs the command once per node index, and the node's
inference Python by stand-in `vllm` and `torch` packages on its PYTHONPATH; the real
thing (pbsdsh on the OpenPBS cluster, the real vLLM) is in tests/test_aurora_runs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from formats import staged_model
from model import stage
from workflow import TINY_MODEL

# Runs the command once per node index given, all at once, as a launcher with one
# process per node does (the nodes pass the model on to each other while they run).
PER_NODE = (
    'p=; for i in {nodes}; do PBS_NODENUM=$i "$@" & p="$p $!"; done; '
    "s=0; for j in $p; do wait $j || s=$?; done; exit $s"
)


def stand_in_packages(folder: Path, vllm: str = "0.32.0", xpu_devices: int | None = None) -> Path:
    """Packages `vllm` and `torch` that report a version and XPU devices, as a node's
    inference Python would (the probe imports nothing else)."""
    (folder / "vllm").mkdir(parents=True)
    (folder / "vllm" / "__init__.py").write_text(f"__version__ = {vllm!r}\n")
    (folder / "torch").mkdir()
    available = xpu_devices is not None
    (folder / "torch" / "__init__.py").write_text(
        "class xpu:\n"
        f"    is_available = staticmethod(lambda: {available})\n"
        f"    device_count = staticmethod(lambda: {xpu_devices or 0})\n"
    )
    return folder


def setup(tmp_path: Path, monkeypatch, nodes: str, **changes) -> Path:
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
                "stage": True,
                "stage_dir": str(tmp_path / "local"),
                "node_launcher": launcher,
                "python": stage.sys.executable,
                "env": {"PYTHONPATH": str(stand_in_packages(tmp_path / "site"))},
                "tiles": {"per_node": 12, "hierarchy": "FLAT"},
                "versions": {"vllm": "0.32.0", "torch": "2.13.0+cpu", "ipex": None},
                "weights_bytes": 3 * 2**20,
                "failure_file": str(tmp_path / "r0-3.failed.json"),
                # a node the launcher never started is given up on after this
                "gather_timeout_s": 2,
                "broadcast_host": "127.0.0.1",  # the simulated nodes share this machine
            }
            | changes
        )
    )
    return settings


def test_copy_to_every_node_then_remove(tmp_path, monkeypatch, capfd):
    settings = setup(tmp_path, monkeypatch, "0 1")
    assert stage.main(["prepare", str(settings)]) == 0
    for host in ("nodeA", "nodeB"):
        copy = staged_model.staged_path(
            str(tmp_path / "local"), "7.pbs-head", host, str(TINY_MODEL)
        )
        assert (copy / "config.json").read_bytes() == (TINY_MODEL / "config.json").read_bytes()
    out = capfd.readouterr().out
    assert out.count("stage_model: prepare on 2 node(s)") == 1 and "nodeB: " in out
    # one read of the shared file system; nodeB's copy came from nodeA
    assert "(read from the shared file system)" in out and "(broadcast from nodeA)" in out
    assert "preflight: nodeA: tile check skipped: no XPU here" in out
    assert stage.main(["remove", str(settings)]) == 0
    assert list((tmp_path / "local").iterdir()) == []
    assert not list(tmp_path.glob("*.done"))


def test_a_node_that_did_not_copy_fails_the_step(tmp_path, monkeypatch, capfd):
    settings = setup(tmp_path, monkeypatch, "0")  # the launcher reached one node only
    assert stage.main(["prepare", str(settings)]) == 1
    assert "node nodeB: no report (launcher exit 0)" in capfd.readouterr().err


def test_the_node_is_found_by_its_name_else_by_its_index(monkeypatch):
    hosts = ["x1.hsn.cm.aurora", "x2.hsn.cm.aurora"]
    assert stage.this_host(hosts, {"PALS_NODEID": "1"}) == "x2.hsn.cm.aurora"
    monkeypatch.setattr(stage.tiles.socket, "gethostname", lambda: "x1")
    assert stage.this_host(hosts, {}) == "x1.hsn.cm.aurora"
    # mpiexec passes the job script's PBS_NODENUM=0 on to every node: the name wins
    monkeypatch.setattr(stage.tiles.socket, "gethostname", lambda: "x2")
    assert stage.this_host(hosts, {"PBS_NODENUM": "0"}) == "x2.hsn.cm.aurora"
    monkeypatch.setattr(stage.tiles.socket, "gethostname", lambda: "elsewhere")
    with pytest.raises(SystemExit, match="cannot tell"):
        stage.this_host(["y9"], {})


def test_empty_node_launcher_is_named(tmp_path, monkeypatch):
    settings = setup(tmp_path, monkeypatch, "0 1")
    settings.write_text(json.dumps(json.loads(settings.read_text()) | {"node_launcher": []}))
    with pytest.raises(SystemExit, match="node_launcher is empty"):
        stage.main(["prepare", str(settings)])


def failure_causes(settings: Path) -> list[str]:
    failure = json.loads(Path(json.loads(settings.read_text())["failure_file"]).read_text())
    assert failure["job_id"] == "7.pbs-head"
    return failure["causes"]


def test_a_node_with_another_vllm_stops_the_submission_before_its_copy(
    tmp_path, monkeypatch, capfd
):
    settings = setup(tmp_path, monkeypatch, "0 1")
    stand_in_packages(tmp_path / "old", vllm="0.15.0")
    changed = json.loads(settings.read_text())
    changed["env"]["PYTHONPATH"] = str(tmp_path / "old")
    settings.write_text(json.dumps(changed))
    assert stage.main(["prepare", str(settings)]) == 1
    cause = (
        "vLLM 0.15.0 here, but rule fetch_model checked the engines against vLLM 0.32.0 "
        "(config python, pbs.setup)"
    )
    assert f"preflight: node nodeA: {cause}" in capfd.readouterr().err
    # every node checks itself, at once (as mpiexec and pbsdsh start them)
    assert failure_causes(settings) == [f"node nodeA: {cause}", f"node nodeB: {cause}"]
    assert not (tmp_path / "local").exists()  # no copy


def test_a_node_that_sees_fewer_tiles_is_named(tmp_path, monkeypatch, capfd):
    site = stand_in_packages(tmp_path / "eleven", xpu_devices=11)
    settings = setup(tmp_path, monkeypatch, "0 1", stage=False)
    changed = json.loads(settings.read_text())
    changed["env"] = {"PYTHONPATH": str(site), "ZE_AFFINITY_MASK": "0,1,2,3,4,5,6,7,8,9,10"}
    settings.write_text(json.dumps(changed))
    assert stage.main(["prepare", str(settings)]) == 1
    cause = "node nodeA: 11 of 12 tiles visible (ZE_AFFINITY_MASK=0,1,2,3,4,5,6,7,8,9,10)"
    assert cause in capfd.readouterr().err
    assert failure_causes(settings)[0] == cause


def test_composite_nodes_show_cards_and_twelve_tiles_pass(tmp_path, monkeypatch, capfd):
    site = stand_in_packages(tmp_path / "cards", xpu_devices=6)
    settings = setup(tmp_path, monkeypatch, "0 1", stage=False)
    changed = json.loads(settings.read_text())
    changed["env"]["PYTHONPATH"] = str(site)
    changed["tiles"]["hierarchy"] = "COMPOSITE"  # 6 cards of 2 tiles
    settings.write_text(json.dumps(changed))
    assert stage.main(["prepare", str(settings)]) == 0
    assert "preflight: nodeB: vLLM 0.32.0, XPU devices 6" in capfd.readouterr().out
    assert not (tmp_path / "local").exists()  # no staging asked: checks only


def test_too_little_room_for_the_copy_is_named_with_both_sizes(tmp_path, monkeypatch, capfd):
    settings = setup(tmp_path, monkeypatch, "0 1", weights_bytes=2**50)  # 1 PiB
    assert stage.main(["prepare", str(settings)]) == 1
    err = capfd.readouterr().err
    assert "preflight: node nodeA: " in err and " free, the model needs " in err
    assert "(1048576.0 GiB and a margin; config weights.stage_dir)" in err
    assert not (tmp_path / "local").exists()
