"""The Aurora set-up as ALCF documents it in 2026 (module frameworks/2025.3.1), checked by
the values we generate: the engines' environment, tensor-parallel slots and CPU lists per
socket, the attention-head check before any qsub, vLLM's "does not fit" refusal, the
staging launcher call and the node-to-node copy of the model. Nothing here runs on
Aurora; the whole staging path runs on OpenPBS in tests/test_aurora_runs.py. That
vLLM's own source says "does not fit" as we read it: tests/test_aurora_setup_vllm.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
from pathlib import Path

import pytest

import workflow as wf
from engine import supervisor
from formats import registry, staged_model
from formats.settings import from_config
from model import fetch, stage
from pbs import plan
from pbs.settings import provider_settings
from placement import launcher, node_layout

REPO = Path(__file__).resolve().parents[1]
AURORA_CPUS = ["1-8", "9-16", "17-24", "25-32", "33-40", "41-48",
               "53-60", "61-68", "69-76", "77-84", "85-92", "93-100"]  # fmt: skip
JOB = "8101204.aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"


def engine_spec(**changes) -> dict:
    spec = wf.aurora_engine_spec("/lus/flare/projects/p/models/m", **changes)
    return spec | {"python": "python3"}


# ---------------------------------------------------------------- environment per module


def test_engine_environment_of_module_frameworks_2025_3_1(tmp_path):
    """What an engine of a TP=4 slot runs with: the placement, the model's offline
    settings and nothing of the 2025.2 preview module's workarounds; what the module set
    (ONEAPI_DEVICE_SELECTOR) reaches the engine untouched."""
    module_env = {
        "PATH": "/usr/bin",
        "ONEAPI_DEVICE_SELECTOR": "opencl:gpu;level_zero:gpu",
        "ZE_FLAT_DEVICE_HIERARCHY": "FLAT",
        # one mpiexec over all engines: PALS's rank of this process, not the engine's
        "PALS_RANKID": "37",
        "RANK": "37",
        "WORLD_SIZE": "3072",
    }
    slot = node_layout.Slot("x4102c5s2b0n0", (6, 7, 8, 9))
    engine = supervisor.make_engine(
        engine_spec(tiles={"per_job": 4}), slot, JOB, tmp_path, module_env
    )
    env = engine.env
    assert wf.aurora_config()["task_env"] == {}
    for stale in ("CCL_PROCESS_LAUNCHER", "VLLM_WORKER_MULTIPROC_METHOD", "TORCH_COMPILE_DISABLE"):
        assert stale not in env
    assert env["ONEAPI_DEVICE_SELECTOR"] == "opencl:gpu;level_zero:gpu"
    assert (env["RANK"], env["WORLD_SIZE"]) == ("0", "4")  # ALCF's MPI example
    assert env["ZE_AFFINITY_MASK"] == "6,7,8,9"
    assert env["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT"
    assert (env["HF_HUB_OFFLINE"], env["TRANSFORMERS_OFFLINE"]) == ("1", "1")
    assert {"localhost", "127.0.0.1"} <= set(env["no_proxy"].split(","))
    argv = engine.argv
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert "--enforce-eager" in argv


def test_staged_model_info_cache_is_used_from_node_local_space(tmp_path):
    """With the model staged, engines read vLLM's model-info cache from their node's
    copy (made by scripts/model/stage.py), not from the shared file system."""
    host = "x4102c5s2b0n0"
    cache = staged_model.staged_cache_root(str(tmp_path / "tmp"), JOB, host)
    (cache / "modelinfos").mkdir(parents=True)
    the_spec = engine_spec() | {"stage": True, "stage_dir": str(tmp_path / "tmp")}
    engine = supervisor.make_engine(the_spec, node_layout.Slot(host, (0,)), JOB, tmp_path, {})
    assert engine.env["VLLM_CACHE_ROOT"] == str(cache)
    model = engine.argv[engine.argv.index("--model") + 1]
    assert Path(model).parent == cache.parent  # the weights' copy beside it


# ---------------------------------------------------------------- TP slots and CPU lists


@pytest.mark.parametrize(
    ("per_job", "slots", "cpu_lists"),
    [
        (1, [(t,) for t in range(12)], ":".join(AURORA_CPUS)),
        (2, [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)],
         "1-16:17-32:33-48:53-68:69-84:85-100"),
        (3, [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)], "1-24:25-48:53-76:77-100"),
        # ALCF's TP=4 example: 2 engines per node, one socket each
        (4, [(0, 1, 2, 3), (6, 7, 8, 9)], "1-48:53-100"),
        (6, [tuple(range(6)), tuple(range(6, 12))], "1-48:53-100"),
        (12, [tuple(range(12))], "1-48,53-100"),
    ],
)  # fmt: skip
def test_tensor_parallel_slots_stay_on_one_socket(per_job, slots, cpu_lists):
    found = node_layout.engine_slots(12, per_job, "h")
    assert [s.tiles for s in found] == slots
    assert node_layout.engines_per_node(12, per_job) == len(slots)
    if per_job <= 6:
        assert all(len({t // 6 for t in s.tiles}) == 1 for s in found)
    assert node_layout.engine_cpu_lists(12, per_job, AURORA_CPUS) == cpu_lists
    for text in cpu_lists.replace(":", ",").split(","):
        assert not set(node_layout.cpu_numbers(text)) & set(node_layout.RESERVED_CORES)


def test_tp4_launcher_call_is_alcfs(tmp_path):
    argv = launcher.engine_launcher_argv(engine_spec(tiles={"per_job": 4}), ["x0", "x1", "x2"])
    assert argv == ["mpiexec", "-n", "6", "--ppn", "2", "--cpu-bind", "list:1-48:53-100",
                    "--no-vni"]  # fmt: skip


def test_tp4_plan_counts_two_engines_per_node():
    settings = provider_settings(from_config(wf.aurora_config(tiles={"per_job": 4})))
    assert plan.jobs_per_node(settings) == 2
    assert plan.expected_group_size(settings) == 4 * 2 * 10


@pytest.mark.parametrize("bad", ["0-8", "45-52", "104", "150-160"])
def test_a_reserved_core_in_cpu_bind_is_an_error_naming_the_key(bad):
    cpus = [bad, *AURORA_CPUS[1:]]
    (problem,) = node_layout.reserved_core_problems(cpus)
    assert problem.startswith("config key tiles.cpu_bind: entry 0")
    assert re.search(r"binds core\(s\) (0|52|104|156)", problem)
    with pytest.raises(ValueError, match="tiles.cpu_bind"):
        node_layout.engine_cpu_lists(12, 1, cpus)
    with pytest.raises(ValueError, match="tiles.cpu_bind"):
        launcher.launch_argv(["x", "{cpus}"], node_layout.Slot("h", (0,)), cpus, {}, ["true"])
    config = wf.aurora_config(tiles={"cpu_bind": cpus}, pbs={"account": "P"})
    settings = provider_settings(from_config(config))
    assert any(p.startswith("config key tiles.cpu_bind") for p in plan.settings_problems(settings))


def test_aurora_cpu_bind_passes_and_a_malformed_one_is_named():
    assert node_layout.reserved_core_problems(AURORA_CPUS) == []
    (problem,) = node_layout.reserved_core_problems(["1-x"])
    assert "config key tiles.cpu_bind" in problem


# ---------------------------------------------------------------- attention heads


def model_folder(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("config", "tp", "refused"),
    [
        ({"num_attention_heads": 32}, 4, False),
        ({"num_attention_heads": 14}, 4, True),  # e.g. Qwen2.5-0.5B's 14 heads
        ({"n_head": 12}, 8, True),
        ({"text_config": {"num_attention_heads": 40}, "num_attention_heads": 16}, 8, False),
        ({"num_attention_heads": 14}, 1, False),
        ({}, 4, False),  # the config does not say: vLLM decides
    ],
)
def test_tensor_parallel_must_divide_the_attention_heads(tmp_path, config, tp, refused):
    folder = model_folder(tmp_path / "m", config)
    problem = fetch.tensor_parallel_problem(folder, "org/m", tp)
    assert bool(problem) == refused
    if refused:
        heads = fetch.attention_heads(folder)
        assert f"model org/m has {heads} attention heads" in problem
        assert f"tensor parallel {tp} (config key tiles.per_job)" in problem


def test_head_check_before_any_qsub(tmp_path):
    """The provider's checks (the dry run, and pbs-submit before qsub) refuse the plan."""
    folder = model_folder(tmp_path / "m", {"num_attention_heads": 14})
    config = wf.aurora_config(tiles={"per_job": 4}, pbs={"account": "P"}, engine="vllm")
    settings = provider_settings(from_config(config), model=str(folder))
    problems = plan.settings_problems(settings)
    assert any("14 attention heads" in p and "tiles.per_job" in p for p in problems)
    with pytest.raises(plan.PbsConfigError, match="14 attention heads"):
        plan.check_settings(settings)


# ---------------------------------------------------------------- does not fit


def test_a_log_that_says_does_not_fit_gives_the_reason(tmp_path):
    log = tmp_path / "engine.log"
    log.write_text(
        "INFO loading weights\nValueError: To serve at least one request with the models's "
        "max seq len (131072), (16.00 GiB KV cache is needed, which is larger than the "
        "available KV cache memory (9.50 GiB). Based on the available memory, the estimated "
        "maximum model length is 77824.\n"
    )
    reason = supervisor.does_not_fit(log)
    assert "vllm.max_model_len" in reason and "(131072)" in reason
    log.write_text("RuntimeError: something else\n")
    assert supervisor.does_not_fit(log) is None


# ---------------------------------------------------------------- staging


def test_staging_launcher_call_on_aurora():
    template = wf.aurora_config()["node_launcher"]
    argv = launcher.node_launcher_argv(template, 256)
    assert argv == ["mpiexec", "-n", "256", "--ppn", "1", "--no-vni"]


def test_broadcast_tree_reads_once_and_reaches_256_nodes_in_8_rounds():
    parents = [stage.tree_parent(i) for i in range(256)]
    assert parents.count(None) == 1
    depth = [0] * 256
    for i in range(1, 256):
        depth[i] = depth[parents[i]] + 1
    assert max(depth) == 8
    assert sorted(c for i in range(256) for c in stage.tree_children(i, 256)) == list(range(1, 256))


def test_a_copy_passes_down_a_tree_of_four_nodes_with_every_file_checked(tmp_path):
    """h0 offers its copy to h1 and h2; h1 passes each chunk on to h3 as it arrives."""
    settings_file, job = str(tmp_path / "job.stage.json"), "7.pbs"
    source = tmp_path / "h0"
    (source / "m" / "sub").mkdir(parents=True)
    (source / "m" / "config.json").write_text("{}")
    (source / "m" / "sub" / "w.bin").write_bytes(bytes(range(256)) * 40_000)  # > one chunk
    (source / "vllm-cache" / "modelinfos").mkdir(parents=True)
    (source / "vllm-cache" / "modelinfos" / "Opt.json").write_text("[]")
    errors = []

    def root():
        offer = stage.Offer(settings_file, job, "h0", "127.0.0.1")
        try:
            outs = offer.gather(["h1", "h2"], timeout=60)
            stage.send_copy(source, outs)
            for out in outs:
                out.close()
        finally:
            offer.close()

    def node(host, parent, receivers):
        try:
            offer = stage.Offer(settings_file, job, host, "127.0.0.1") if receivers else None
            with stage.take_offer(settings_file, job, host, parent, 60) as connection:
                outs = offer.gather(receivers, 60) if offer else []
                stage.relay_copy(connection, tmp_path / host, outs)
            for out in outs:
                out.close()
            if offer:
                offer.close()
        except Exception as error:  # reported below
            errors.append((host, error))

    threads = [
        threading.Thread(target=root),
        threading.Thread(target=node, args=("h1", "h0", ["h3"])),
        threading.Thread(target=node, args=("h2", "h0", [])),
        threading.Thread(target=node, args=("h3", "h1", [])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for host in ("h1", "h2", "h3"):
        assert stage.manifest(tmp_path / host) == stage.manifest(source)
        copy = tmp_path / host / "m" / "sub" / "w.bin"
        assert copy.read_bytes() == (source / "m" / "sub" / "w.bin").read_bytes()
    # the offers (address, port, token) are gone once the copies are made
    assert not list(tmp_path.glob("job.stage.json.*.source"))


def test_a_copy_cut_short_is_refused(tmp_path):
    left, right = socket.socketpair()
    with left, right:
        left.sendall(json.dumps({"w.bin": 10}).encode() + b"\n12345")
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(RuntimeError, match="ended within w.bin"):
            stage.relay_copy(right, tmp_path / "h1", [])
    assert list(tmp_path.iterdir()) == []  # no partial copy left


def test_a_receiver_whose_source_failed_fails_at_once(tmp_path):
    settings_file = str(tmp_path / "job.stage.json")
    stage.done_file(settings_file, "7.pbs", "h0").write_text("failed\nnode h0: no vLLM\n")
    with pytest.raises(RuntimeError, match="node h0, which this node gets the model from"):
        stage.take_offer(settings_file, "7.pbs", "h1", "h0", timeout=60)


def test_an_engine_that_does_not_fit_ends_its_node_with_the_reason(tmp_path):
    """A stand-in for the inference Python prints vLLM 0.15's refusal and exits, as a
    model too long for a tile's memory makes vLLM do: the node's supervisor restarts
    nothing, every engine's entry says failed with the reason, and the node process
    exits 1 (the launcher's exit ends the ranks' wait)."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\necho 'ValueError: To serve at least one request with the models'\"'\"'s max "
        "seq len (131072), (16.00 GiB KV cache is needed, which is larger than the available "
        "KV cache memory (9.50 GiB).'\nexit 1\n"
    )
    fake.chmod(0o755)
    host = socket.gethostname()
    base = 41000 + (os.getpid() % 500) * 8  # ports of their own on a shared machine
    the_spec = engine_spec(
        tiles={"per_node": 2, "per_job": 1, "base_port": base, "cpu_bind": []},
        warm={"ready_timeout_s": 600, "max_restarts": 2},
    ) | {"python": str(fake), "registry_root": str(tmp_path / "engines"), "engine": "vllm"}
    spec_file = tmp_path / "job.engines.json"
    spec_file.write_text(json.dumps(the_spec))
    (tmp_path / "engines" / "7.pbs").mkdir(parents=True)  # supervisor.launch makes it
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PALS_", "PMI_"))}
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        code = supervisor.node(str(spec_file), "7.pbs", [host], environ)
    finally:
        for sig, handler in kept.items():  # node() installs its own
            signal.signal(sig, handler)
    assert code == 1
    entries = registry.read_registry(tmp_path / "engines" / "7.pbs")
    assert len(entries) == 2
    for entry in entries.values():
        assert (entry["state"], entry["cause"], entry["restarts"]) == ("failed", "does_not_fit", 0)
        assert "vllm.max_model_len" in entry["error"] and "(131072)" in entry["error"]


def test_a_gated_model_without_token_names_hf_token(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    def snapshot_download(model, cache_dir, local_files_only=False):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        error = GatedRepoError.__new__(GatedRepoError)  # its __init__ wants an HTTP response
        Exception.__init__(error, "401 Client Error. Cannot access gated repo")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(fetch.CheckError, match="model meta-llama/X is gated") as error:
        fetch.find_weights("meta-llama/X", "", str(tmp_path / "hf"))
    assert "HF_TOKEN" in str(error.value)
