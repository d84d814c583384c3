"""scripts/engine/supervisor.py without a scheduler: the launcher call, which engines a launcher
process runs, their command and environment, and the ranks' pool over the registry.
The whole path runs on OpenPBS in tests/test_aurora_runs.py and test_aurora_failures.py
(warm tests)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import workflow as wf
from engine import client, echo_server, lifecycle, routing, supervisor
from formats import node_report as pbs_node_report
from pbs import node
from placement import launcher, node_layout, tiles

REPO = Path(__file__).resolve().parents[1]


def spec(**changes) -> dict:
    return wf.aurora_engine_spec("/flare/p/models/opt-125m", **changes)  # python: pbs-submit's


def test_one_mpiexec_for_all_engines_of_the_submission():
    hosts = [f"x{i}.hostmgmt" for i in range(4)]
    argv = launcher.engine_launcher_argv(spec(), hosts)
    lists = "1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68:69-76:77-84:85-92:93-100"
    assert argv == [
        "mpiexec", "-n", "48", "--ppn", "12", "--cpu-bind", f"list:{lists}", "--no-vni",
    ]  # fmt: skip


def test_two_tile_engines_get_both_tiles_cpus():
    argv = launcher.engine_launcher_argv(spec(tiles={"per_job": 2}), ["x0", "x1"])
    assert argv[:5] == ["mpiexec", "-n", "12", "--ppn", "6"]
    assert argv[6] == "list:1-16:17-32:33-48:53-68:69-84:85-100"


@pytest.mark.parametrize(
    ("environ", "tiles_run"),
    [
        ({"PALS_LOCAL_RANKID": "5", "PALS_LOCAL_SIZE": "12"}, [(5,)]),  # mpiexec --ppn 12
        ({"PALS_LOCAL_RANKID": "1", "PALS_LOCAL_SIZE": "2"}, [(1,), (3,), (5,), (7,), (9,), (11,)]),
        ({}, [(t,) for t in range(12)]),  # pbsdsh: one process per node runs them all
    ],
)
def test_a_launcher_process_takes_its_share_of_the_node(environ, tiles_run):
    index, count = tiles.local_rank(environ)
    slots = node_layout.engine_slots(12, 1, "x0")[index::count]
    assert [slot.tiles for slot in slots] == tiles_run


def test_engine_command_and_environment_on_aurora(tmp_path):
    job = "8101204.aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"
    environ = {
        "PATH": "/usr/bin",
        # PBS's own TMPDIR: too long for vLLM's socket paths under it
        "TMPDIR": f"/var/tmp/pbs.{job}",
        "no_proxy": "localhost",
    }
    lifecycle.write_key_file(tmp_path / "job.key", "secret-of-this-job")
    the_spec = spec(tiles={"per_job": 2}) | {
        "python": "python3",
        "api_key_file": str(tmp_path / "job.key"),
    }
    slot = node_layout.Slot("x4102c5s2b0n0.hostmgmt2102", (2, 3))
    engine = supervisor.make_engine(the_spec, slot, job, tmp_path, environ)
    argv = engine.argv
    # loopback only: the node's own Snakemake is the engine's only client
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert (engine.env["VLLM_HOST_IP"], engine.env["MASTER_ADDR"]) == ("127.0.0.1", "127.0.0.1")
    assert argv[argv.index("--port") + 1] == str(29500 + 1000 + 2)
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert "--enforce-eager" in argv and "--disable-custom-all-reduce" in argv
    env = engine.env
    assert env["ZE_AFFINITY_MASK"] == "2,3"
    # module frameworks/2025.3.1: the 2025.2 workarounds are gone (profiles/aurora/aurora.yaml)
    for stale in ("CCL_PROCESS_LAUNCHER", "VLLM_WORKER_MULTIPROC_METHOD", "TORCH_COMPILE_DISABLE"):
        assert stale not in env
    assert (env["RANK"], env["WORLD_SIZE"]) == ("0", "2")
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "127.0.0.1" in env["no_proxy"].split(",")
    # the key reaches the engine through its environment, never its command line
    assert env["VLLM_API_KEY"] == engine.api_key == "secret-of-this-job"
    assert not any(engine.api_key in a for a in argv)
    # sun_path: vLLM's socket name (1 + 36 characters) must fit under 107
    assert len(env["VLLM_RPC_BASE_PATH"]) + 37 <= 107
    assert env["TMPDIR"] == env["VLLM_RPC_BASE_PATH"]
    assert engine.log_path == tmp_path / "x4102c5s2b0n0.hostmgmt2102-tile2.log"


def test_engines_listen_on_loopback_only(tmp_path):
    slot = node_layout.Slot("x1", (0,))
    with pytest.raises(client.EngineStartError, match="warm.listen: '8.8.8.8' is 8.8.8.8, not"):
        supervisor.make_engine(spec() | {"listen": "8.8.8.8"}, slot, "1", tmp_path, {})
    # the test cluster: each host's name is its own loopback address
    assert supervisor.listen_address({"listen": "{host}"}, "localhost") in ("127.0.0.1", "::1")
    with pytest.raises(client.EngineStartError, match="does not resolve"):
        supervisor.listen_address({"listen": "{host}"}, "no-such-host.invalid")


def test_staged_model_per_node():
    the_spec = spec() | {"stage": True, "stage_dir": "/tmp", "python": "python3"}
    slot = node_layout.Slot("x1", (0,))
    engine = supervisor.make_engine(the_spec, slot, "12.pbs", Path("/r"), {"PATH": "/usr/bin"})
    assert engine.argv[engine.argv.index("--model") + 1] == "/tmp/model-12.pbs/x1/opt-125m"


def test_echo_engines_are_the_light_server():
    the_spec = spec(engine="echo") | {"python": "python3"}
    engine = supervisor.make_engine(the_spec, node_layout.Slot("x1", (4,)), "1", Path("/r"), {})
    assert engine.argv[:2] == ["python3", str(REPO / "scripts" / "engine" / "echo_server.py")]


# ------------------------------------------------------------------ the ranks' pool


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


# An echo server per engine name (started by the pool fixture): the pool routes only to
# an engine whose server proves its id (client.identify).
SERVERS: dict[str, echo_server.EchoServer] = {}


def report(registry: Path, name: str, state: str, when: float | None = None) -> None:
    server = SERVERS.get(name)
    entry = {
        "name": name.replace("-tile", "/tile"),
        "url": f"http://127.0.0.1:{server.server_address[1]}" if server else "http://127.0.0.1:9",
        "engine_id": server.engine_id if server else None,
        "log": str(registry / f"{name}.log"),
        "state": state,
        "restarts": 0,
        "time": time.time() if when is None else when,
        "env": {"TILE_HOST": name.split("-")[0]},
    }
    (registry / f"{name}.json").write_text(json.dumps(entry))
    stamp = time.time() + len(state) * 0.001  # a new mtime for each report
    os.utime(registry / f"{name}.json", (stamp, stamp))


@pytest.fixture
def pool(tmp_path, monkeypatch):
    monkeypatch.setattr(routing, "REFRESH_S", 0.0)
    monkeypatch.setattr(routing, "SETTLED_REFRESH_S", 0.0)
    for name in ("a-tile0", "b-tile0"):
        server = echo_server.EchoServer(("127.0.0.1", 0), "echo", 2048, 0.0)
        server.engine_id = f"id-of-{name}"
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        SERVERS[name] = server
    clock = Clock()
    yield routing.RegistryPool(tmp_path, ["a-tile0", "b-tile0"], 2, 100, clock=clock), clock
    for server in SERVERS.values():
        server.shutdown()
        server.server_close()
    SERVERS.clear()


def test_ranks_are_never_routed_to_a_server_that_does_not_prove_its_id(pool, tmp_path, capfd):
    """An entry reported ready whose port answers another id (another run's engine) is
    left out, and the run's output says so; once the server there proves the entry's
    id, it is routed to."""
    pool, _ = pool
    report(tmp_path, "b-tile0", "failed")
    report(tmp_path, "a-tile0", "ready")  # the entry has a's id; its port answers another
    SERVERS["a-tile0"].engine_id = "another-runs-engine"
    said = ""
    while "not this run's engine" not in said:
        with pytest.raises(client.EngineUnavailable, match="no engine free"), pool.route(0):
            pass
        said += capfd.readouterr().err
    assert "a/tile0: another process answers at http://127.0.0.1:" in said
    assert "engine id another-runs-engine" in said and "no rank is sent there" in said
    SERVERS["a-tile0"].engine_id = "id-of-a-tile0"
    with pool.route() as engine:  # the check goes on until the server proves the id
        assert engine.name == "a/tile0"


def test_ranks_go_to_the_least_busy_ready_engine(pool, tmp_path):
    pool, _ = pool
    report(tmp_path, "a-tile0", "ready")
    report(tmp_path, "b-tile0", "starting")
    with pool.route() as first, pool.route() as second:
        assert first.name == second.name == "a/tile0"  # the only one ready
        # a's 2 slots are taken, b is not up
        with pytest.raises(client.EngineUnavailable, match="no engine free"), pool.route(0.05):
            pass
        report(tmp_path, "b-tile0", "ready")
        with pool.route() as third:
            assert third.name == "b/tile0"
            assert third.env["TILE_HOST"] == "b"


def test_no_engine_ready_in_time_names_the_logs(pool, tmp_path):
    pool, clock = pool
    report(tmp_path, "a-tile0", "starting")
    clock.now = 101
    with pytest.raises(client.EngineUnavailable) as error, pool.route():
        pass
    message = str(error.value)
    assert "within 100 s (config warm.ready_timeout_s)" in message
    assert str(tmp_path / "a-tile0.log") in message and str(tmp_path / "b-tile0.log") in message


def test_all_failed_fails_at_once(pool, tmp_path):
    pool, _ = pool
    report(tmp_path, "a-tile0", "failed")
    report(tmp_path, "b-tile0", "failed")
    failed = "every engine of this job failed"
    with pytest.raises(client.EngineUnavailable, match=failed), pool.route():
        pass


def test_a_failed_engine_is_left_out_until_its_restart_is_reported(pool, tmp_path):
    pool, _ = pool
    report(tmp_path, "a-tile0", "ready", when=time.time() - 10)
    report(tmp_path, "b-tile0", "ready", when=time.time() - 10)
    with pool.route() as engine:
        victim = engine.name
    gone = SERVERS[victim.replace("/", "-")]
    # Its server is down: its identity check fails until the restart is reported. (Not
    # shutdown(): a kept-alive connection of the client would still reach its handler.)
    gone.engine_id = "not-this-engine"
    pool.mark_failed(engine)
    for _ in range(3):
        with pool.route() as engine:
            assert engine.name != victim
    file = victim.replace("/", "-")
    report(tmp_path, file, "restarting")
    gone.engine_id = f"id-of-{file}-restarted"
    report(tmp_path, file, "ready")  # the node process restarted it
    with pool.route(), pool.route() as engine, pool.route() as third:
        assert victim in (engine.name, third.name)


def test_a_launcher_that_exited_with_no_engine_ready_fails_the_ranks(pool, tmp_path):
    pool, _ = pool
    report(tmp_path, "a-tile0", "starting")
    (tmp_path / "launcher.exit").write_text("127\n")
    with pytest.raises(client.EngineUnavailable, match="exited with status 127"), pool.route():
        pass


def test_a_suspect_engines_health_check_holds_no_lock(pool, tmp_path):
    """The check of a suspect engine that hangs (a socket that accepts and never
    answers) does not hold up the ranks routed meanwhile to the other engine."""
    import socket

    pool, _ = pool
    hung = socket.create_server(("127.0.0.1", 0))
    asked = threading.Event()

    def accept():
        connection, _ = hung.accept()
        asked.set()
        time.sleep(5)
        connection.close()

    threading.Thread(target=accept, daemon=True).start()
    report(tmp_path, "a-tile0", "ready", when=time.time() - 10)
    report(tmp_path, "b-tile0", "ready", when=time.time() - 10)
    routed = set()
    while routed != {"a/tile0", "b/tile0"}:  # until both proved their ids
        with pool.route() as first, pool.route() as second:
            routed = {first.name, second.name}
    # a's restart is reported on a port where the server hangs: its identity check waits
    entry = json.loads((tmp_path / "a-tile0.json").read_text())
    entry["url"] = f"http://127.0.0.1:{hung.getsockname()[1]}"
    (tmp_path / "a-tile0.json").write_text(json.dumps(entry))
    os.utime(tmp_path / "a-tile0.json", (time.time() + 1, time.time() + 1))
    with pool.route() as engine:
        assert engine.name == "b/tile0"
    assert asked.wait(10)  # the check is under way, stuck on the hung engine
    with pool.route() as engine:  # served at once by the other engine
        assert engine.name == "b/tile0"
    hung.close()


def test_a_rank_waits_for_a_free_slot(pool, tmp_path):
    pool, _ = pool
    report(tmp_path, "a-tile0", "ready")
    report(tmp_path, "b-tile0", "failed")
    got = []

    def rank():
        with pool.route() as engine:
            got.append(engine.name)

    with pool.route(), pool.route():  # both of a's slots
        waiter = threading.Thread(target=rank)
        waiter.start()
        waiter.join(0.3)
        assert got == []  # still waiting
    waiter.join(10)
    assert got == ["a/tile0"]


def test_waiting_ranks_fail_when_nothing_progresses(pool, tmp_path):
    """Ranks stuck in their requests (engines up, never answering) hold every slot: the
    ranks waiting behind them fail after warm.stall_timeout_s, naming what they wait
    for, instead of hanging the run; a freed slot is progress."""
    pool, clock = pool
    pool.stall_timeout = 50
    report(tmp_path, "a-tile0", "ready")
    report(tmp_path, "b-tile0", "failed")
    with pool.route(), pool.route():
        clock.now = 51
        with pytest.raises(client.EngineUnavailable) as caught, pool.route():
            pass
    text = str(caught.value)
    assert "for 50 s (config warm.stall_timeout_s)" in text and "a-tile0 2 in flight" in text
    with pool.route() as engine:
        assert engine.name == "a/tile0"


NODE_SNAKEMAKE = """
import json
import os
import sys
json.dump({"argv": sys.argv[1:], "node": os.environ["AURORA_NODE"], "cwd": os.getcwd(),
           "job": os.environ["PBS_JOBID"], "spec": os.environ["AURORA_ENGINES"],
           "cpus": sorted(os.sched_getaffinity(0))}, open(os.environ["NOTE"], "w"))
sys.exit(3)
"""


def test_a_nodes_snakemake_runs_its_share_against_its_node_on_free_cpus(tmp_path):
    """node.py ranks-node as a launcher starts it on the second of two nodes: its share
    of the ranks as --target-jobs, its node named for the pool, the CPUs no engine is
    bound to, and its exit status reported for the job script."""
    cpus = sorted(os.sched_getaffinity(0))
    bound = [str(cpus[0])] if len(cpus) > 1 else []
    registry = tmp_path / "engines"
    spec_file = tmp_path / "job.engines.json"
    spec_file.write_text(json.dumps({"registry_root": str(registry), "tiles": {"cpu_bind": bound}}))
    nodes_file = tmp_path / "job.nodes.json"
    argv = [sys.executable, "-c", NODE_SNAKEMAKE, "--mode", "remote"]
    nodes_file.write_text(
        json.dumps({"workdir": str(tmp_path), "argv": argv, "shares": [[0, 3], [1, 2, 4]]})
    )
    (registry / "7.pbs" / "ranks").mkdir(parents=True)
    environ = {**os.environ, "PBS_NODENUM": "1", "NOTE": str(tmp_path / "note.json")}
    code = node.ranks_node(str(spec_file), str(nodes_file), "7.pbs", ["x0", "x1"], environ)
    assert code == 3
    note = json.loads((tmp_path / "note.json").read_text())
    assert note["argv"] == ["--mode", "remote", "--target-jobs"] + [
        f"infer:rank={r}" for r in (1, 2, 4)
    ]
    assert (note["node"], note["job"], note["cwd"]) == ("x1", "7.pbs", str(tmp_path))
    assert note["spec"] == str(spec_file)
    assert note["cpus"] == (cpus[1:] if bound else cpus)
    assert (registry / "7.pbs" / "ranks" / "x1.exit").read_text() == "3\n"


HANGING_SNAKEMAKE = """
import os
import subprocess
import sys
import time
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(os.environ["NOTE"], "w").write(f"{os.getpid()} {rank.pid}")
time.sleep(600)
"""


def test_a_nodes_snakemake_and_its_ranks_end_with_their_job(tmp_path):
    """Issue 29: PBS ended the job (pbs_mom removed its TMPDIR) but nothing killed the
    node's processes: ranks-node, its Snakemake and a rank process of it end within
    seconds, and nothing is written into the run's folder after the job's end."""
    registry = tmp_path / "engines"
    spec_file = tmp_path / "job.engines.json"
    spec_file.write_text(json.dumps({"registry_root": str(registry), "tiles": {"cpu_bind": []}}))
    nodes_file = tmp_path / "job.nodes.json"
    argv = [sys.executable, "-c", HANGING_SNAKEMAKE]
    nodes_file.write_text(json.dumps({"workdir": str(tmp_path), "argv": argv, "shares": [[0]]}))
    (registry / "8.pbs" / "ranks").mkdir(parents=True)
    job_tmp = tmp_path / "pbs.8.pbs"
    job_tmp.mkdir()
    note = tmp_path / "note"
    env = {**os.environ, "PBS_JOBID": "8.pbs", "TMPDIR": str(job_tmp), "NOTE": str(note)}
    owner = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "pbs" / "node.py"), "ranks-node"]
        + [str(spec_file), str(nodes_file), "8.pbs", "x0"],
        env={**env, "PBS_NODENUM": "0"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not note.exists() or len(note.read_text().split()) < 2:
            assert owner.poll() is None, owner.stderr.read()
            time.sleep(0.05)
        snakemake, rank = map(int, note.read_text().split())
        job_tmp.rmdir()  # the job's end, as its node sees it
        owner.wait(timeout=30)
        assert "the job has ended" in owner.stderr.read()
        for pid in (snakemake, rank):
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state == "Z":
                    break
                time.sleep(0.05)
            else:
                assert not Path(f"/proc/{pid}").exists(), f"{pid} outlived its job"
        assert not list((registry / "8.pbs" / "ranks").iterdir())
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


DYING_SNAKEMAKE = """
import json
import os
import signal
import sys
with open(os.environ["RUNS"], "a") as runs:
    runs.write(json.dumps(sys.argv[sys.argv.index("--target-jobs") + 1 :]) + "\\n")
if len(open(os.environ["RUNS"]).readlines()) <= int(os.environ["DEATHS"]):
    os.kill(os.getpid(), signal.SIGKILL)  # as an OOM kill
"""


def dying_node(tmp_path, monkeypatch, deaths: int, restarts: int, engines_alive: bool):
    """ranks-node for ranks 0-2 of which 1 is whole, with a Snakemake SIGKILLed the first
    ``deaths`` times: its status, the targets of each Snakemake, and the node's report."""
    registry = tmp_path / "engines"
    results = tmp_path / "results"
    answers = b"answers of rank 1\n"
    (results / "records").mkdir(parents=True)
    (results / "records" / "1.json").write_text(
        json.dumps({"rank": 1, "out_sha256": hashlib.sha256(answers).hexdigest()})
    )
    (results / "1.out").write_bytes(answers)
    spec_file = tmp_path / "job.engines.json"
    spec_file.write_text(
        json.dumps({"registry_root": str(registry), "tiles": {"cpu_bind": []},
                    "node_restarts": restarts})
    )  # fmt: skip
    nodes_file = tmp_path / "job.nodes.json"
    nodes_file.write_text(
        json.dumps({"workdir": str(tmp_path), "argv": [sys.executable, "-c", DYING_SNAKEMAKE],
                    "shares": [[0, 1, 2]], "results_dir": str(results),
                    "failed_dir": str(tmp_path / "failed")})
    )  # fmt: skip
    monkeypatch.setattr(node, "engines_alive", lambda *args: engines_alive)
    runs = tmp_path / "runs"
    env = {**os.environ, "PBS_NODENUM": "0", "RUNS": str(runs), "DEATHS": str(deaths)}
    code = node.ranks_node(str(spec_file), str(nodes_file), "9.pbs", ["x0"], env)
    targets = [json.loads(line) for line in runs.read_text().splitlines()]
    report = (registry / "9.pbs" / "ranks" / "x0.exit").read_text().strip()
    return code, targets, report


def test_a_nodes_snakemake_that_dies_is_brought_back_for_its_unfinished_ranks(
    tmp_path, monkeypatch
):
    code, targets, report = dying_node(tmp_path, monkeypatch, 2, 2, engines_alive=True)
    every = ["infer:rank=0", "infer:rank=1", "infer:rank=2"]
    unfinished = ["infer:rank=0", "infer:rank=2"]
    assert (code, targets, report) == (0, [every, unfinished, unfinished], "0")


def test_a_nodes_snakemake_that_dies_too_often_leaves_its_ranks_to_the_continuation(
    tmp_path, monkeypatch
):
    code, targets, report = dying_node(tmp_path, monkeypatch, 9, 1, engines_alive=True)
    assert code == 247 and len(targets) == 2
    assert report == (
        "247 infrastructure: its Snakemake died (status 247) 2 time(s), more than "
        "warm.node_restarts 1, 2 left"
    )
    assert pbs_node_report.is_cut_off(report) and not pbs_node_report.is_cut_off("1")


def test_a_nodes_snakemake_that_dies_with_its_engines_gone_is_not_brought_back(
    tmp_path, monkeypatch
):
    code, targets, report = dying_node(tmp_path, monkeypatch, 1, 2, engines_alive=False)
    assert (code, len(targets)) == (247, 1)
    assert report.endswith("infrastructure: its Snakemake died (status 247) and its engines "
                           "are gone, 2 left")  # fmt: skip


def test_shares_of_more_planned_nodes_than_the_job_got_are_not_lost():
    nodes = {"shares": [[0], [1], [2]]}
    assert node.node_share(nodes, 0, 2) == [0, 2] and node.node_share(nodes, 1, 2) == [1]
    assert node.cpu_numbers(["1-3", "7,9-10"]) == {1, 2, 3, 7, 9, 10}
    assert node.cpu_list_text({0, 52, 53, 54, 60}) == "0,52-54,60"
