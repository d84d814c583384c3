"""Warm engines as a local run sets them up (rank_job.local_spec, then supervisor.node's
make_engine, as in a submission): which engines, with which ports, masks and
environment. The engines themselves run in tests/test_engine_lifecycle.py,
tests/test_engine_supervisor.py and in the local workflow tests."""

from __future__ import annotations

import os
from pathlib import Path

from engine import supervisor
from formats import settings as run_settings
from pipeline import rank_job
from placement import node_layout
from rank import checks, offline
from workflow import local_profile_config

REPO = Path(__file__).resolve().parents[1]


def local_engines(config: dict, model: str, registry: Path) -> list:
    """The engines a local run's supervisor starts (supervisor.node), one per tile slot."""
    spec = rank_job.local_spec(run_settings.from_config(config), model)
    host = os.uname().nodename
    per_node, per_job = config["tiles"]["per_node"], config["tiles"]["per_job"]
    return [
        supervisor.make_engine(spec, slot, "local-1", registry, os.environ)
        for slot in node_layout.engine_slots(per_node, per_job, host)
    ]


def test_local_profile_runs_two_warm_engines_one_per_core(tmp_path):
    config = local_profile_config()
    assert config["warm_engines"] is True
    engines = local_engines(config, "/models/m", tmp_path)
    host = os.uname().nodename
    assert [e.name for e in engines] == [f"{host}/tile0", f"{host}/tile1"]
    assert [e.port for e in engines] == [30500, 30501]  # apart from VLLM_PORT's range
    for tile, engine in enumerate(engines):
        env = engine.env
        assert env["ZE_AFFINITY_MASK"] == str(tile)
        assert (env["VLLM_PORT"], env["MASTER_PORT"]) == (
            str(29500 + 10 * tile),
            str(29505 + 10 * tile),
        )
        # every port of the engine on loopback, as in a submission
        assert env["VLLM_HOST_IP"] == env["MASTER_ADDR"] == engine.host == "127.0.0.1"
        assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
        assert env["VLLM_CACHE_ROOT"] == os.path.abspath("cache/vllm")
        assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["OMP_NUM_THREADS"] == "1"
        assert engine.argv[engine.argv.index("--model") + 1] == "/models/m"
        assert "--enforce-eager" in engine.argv
        assert engine.log_path == tmp_path / f"{host}-tile{tile}.log"


def test_two_tile_engines_get_tensor_parallel_and_a_two_tile_mask(tmp_path):
    config = local_profile_config(tiles={"per_node": 12, "per_job": 2, "hierarchy": "FLAT",
                                 "cpu_bind": [], "base_port": 29500})  # fmt: skip
    engines = local_engines(config, "/models/m", tmp_path)
    assert len(engines) == 6
    argv, env = engines[1].argv, engines[1].env
    assert env["ZE_AFFINITY_MASK"] == "2,3"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--distributed-executor-backend") + 1] == "mp"
    assert "--disable-custom-all-reduce" in argv


def test_engine_slots_cover_the_node_without_overlap():
    slots = node_layout.engine_slots(12, 3, "h")
    assert [s.tiles for s in slots] == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]


def test_per_rank_engine_on_two_tiles_runs_tensor_parallel():

    settings = checks.parse_settings("{}")
    assert "--tensor-parallel-size" not in offline.server_argv(settings, "3")
    argv = offline.server_argv(settings, "4,5")
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--distributed-executor-backend") + 1] == "mp"
    assert "--disable-custom-all-reduce" in argv and "--host" not in argv and "--port" not in argv
    assert argv[:2] == ["--model", settings["model"]]
    assert offline.server_argv(settings, "3", pooling=True)[-2:] == ["--runner", "pooling"]
