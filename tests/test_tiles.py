"""Tile placement: masks, hosts, cross-process locking, engine environment, launch argv."""

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from placement import tiles
from placement.launcher import launch_argv, run_placed
from placement.node_layout import Slot
from placement.tiles import (
    acquire,
    affinity_mask,
    default_lock_dir,
    engine_env,
    read_hosts,
    resolve_hierarchy,
)

SCRIPTS = str(Path(tiles.__file__).resolve().parents[1])
AURORA_LAUNCHER = ["mpiexec", "-n", "1", "--hosts", "{host}", "--cpu-bind", "list:{cpus}"]
SRUN_LAUNCHER = ["srun", "--nodes=1", "--ntasks=1", "--nodelist={host}", "--overlap"]
AURORA_CPUS = [
    "1-8",
    "9-16",
    "17-24",
    "25-32",
    "33-40",
    "41-48",
    "53-60",
    "61-68",
    "69-76",
    "77-84",
    "85-92",
    "93-100",
]


# --- masks and hierarchy ---------------------------------------------------


@pytest.mark.parametrize(
    ("tiles_", "hierarchy", "mask"),
    [
        ((3,), "FLAT", "3"),
        ((4, 5), "FLAT", "4,5"),
        ((0,), "COMPOSITE", "0.0"),
        ((3,), "COMPOSITE", "1.1"),
        ((11,), "COMPOSITE", "5.1"),
        ((4, 5), "COMPOSITE", "2.0,2.1"),
    ],
)
def test_affinity_mask(tiles_, hierarchy, mask):
    assert affinity_mask(tiles_, hierarchy) == mask


def test_affinity_mask_rejects_unknown_hierarchy():
    with pytest.raises(ValueError, match="hierarchy"):
        affinity_mask((0,), "flat-ish")


def test_resolve_hierarchy():
    assert resolve_hierarchy("auto", {}) == "FLAT"
    assert resolve_hierarchy("auto", {"ZE_FLAT_DEVICE_HIERARCHY": "composite"}) == "COMPOSITE"
    assert resolve_hierarchy("auto", {"ZE_FLAT_DEVICE_HIERARCHY": "Flat"}) == "FLAT"
    assert resolve_hierarchy("COMPOSITE", {"ZE_FLAT_DEVICE_HIERARCHY": "FLAT"}) == "COMPOSITE"
    assert resolve_hierarchy("FLAT", {"ZE_FLAT_DEVICE_HIERARCHY": "COMPOSITE"}) == "FLAT"
    with pytest.raises(ValueError, match="ZE_FLAT_DEVICE_HIERARCHY"):
        resolve_hierarchy("auto", {"ZE_FLAT_DEVICE_HIERARCHY": "COMBINED"})
    with pytest.raises(ValueError, match="tiles.hierarchy"):
        resolve_hierarchy("tiles", {})


# --- hosts -----------------------------------------------------------------


def test_read_hosts_unique_in_file_order(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x4102c0s0b0n0\n\nx4102c0s0b0n0\n  x4000c1s2b0n0  \nx4102c0s0b0n0\n\n")
    assert read_hosts({"PBS_NODEFILE": str(nodefile)}) == ["x4102c0s0b0n0", "x4000c1s2b0n0"]


def test_read_hosts_without_pbs_is_this_host():
    assert read_hosts({}) == [socket.gethostname()]


def test_read_hosts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="PBS_NODEFILE"):
        read_hosts({"PBS_NODEFILE": str(tmp_path / "missing")})
    empty = tmp_path / "empty"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no hosts"):
        read_hosts({"PBS_NODEFILE": str(empty)})


def test_default_lock_dir_is_per_user_and_job():
    local = default_lock_dir({})
    job = default_lock_dir({"PBS_JOBID": "123.aurora-pbs-0001"})
    assert local.name == "local"
    assert job.name == "123.aurora-pbs-0001"
    assert job.parent == local.parent
    assert local.parent.name == f"tile-locks-{os.getuid()}"


# --- allocation ------------------------------------------------------------


def test_twelve_holders_get_twelve_tiles_and_thirteenth_times_out(tmp_path, monkeypatch):
    with contextlib.ExitStack() as stack:
        slots = [
            stack.enter_context(acquire(tmp_path, ["n1"], 12, 1, timeout=1)) for _ in range(12)
        ]
        assert sorted(s.tiles for s in slots) == [(t,) for t in range(12)]
        assert {s.host for s in slots} == {"n1"}
        polls = []
        real_sleep = time.sleep
        me = threading.current_thread()  # not the sleeps of other tests' daemon threads

        def sleep(seconds):
            if threading.current_thread() is me:
                polls.append(seconds)
            real_sleep(seconds)

        monkeypatch.setattr(time, "sleep", sleep)
        with (
            pytest.raises(TimeoutError, match="free tile"),
            acquire(tmp_path, ["n1"], 12, 1, poll=0.05, timeout=0.3),
        ):
            pass
        monkeypatch.undo()
        assert polls and set(polls) == {0.05}  # it waited, asking again, before it gave up


def test_waiter_gets_exactly_the_released_tile(tmp_path):
    holders = {}
    stacks = {}
    for _ in range(12):
        stack = contextlib.ExitStack()
        slot = stack.enter_context(acquire(tmp_path, ["n1"], 12, 1, timeout=1))
        holders[slot.tiles[0]] = slot
        stacks[slot.tiles[0]] = stack
    assert sorted(holders) == list(range(12))
    got = []

    def waiter():
        with acquire(tmp_path, ["n1"], 12, 1, poll=0.02, timeout=5) as slot:
            got.append(slot)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.2)
    assert got == []
    stacks.pop(7).close()
    thread.join(5)
    assert got == [Slot("n1", (7,))]
    for stack in stacks.values():
        stack.close()


def _hold(lock_dir, hosts, per_node, per_job, barrier, results):
    with acquire(lock_dir, hosts, per_node, per_job, poll=0.02, timeout=20) as slot:
        results.put((slot.host, slot.tiles, os.getpid()))
        # Everyone holds at the same time before anyone lets go.
        barrier.wait(timeout=20)


def test_24_processes_on_two_hosts_get_distinct_tiles(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(24)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_hold, args=(tmp_path, ["n1", "n2"], 12, 1, barrier, results))
        for _ in range(24)
    ]
    for worker in workers:
        worker.start()
    got = [results.get(timeout=20) for _ in range(24)]
    for worker in workers:
        worker.join(20)
        assert worker.exitcode == 0
    pairs = {(host, tiles_) for host, tiles_, _ in got}
    assert len(pairs) == 24
    assert pairs == {(h, (t,)) for h in ("n1", "n2") for t in range(12)}
    assert len({pid for _, _, pid in got}) == 24


def test_two_tile_jobs_get_aligned_pairs(tmp_path):
    with contextlib.ExitStack() as stack:
        slots = [stack.enter_context(acquire(tmp_path, ["n1"], 12, 2, timeout=1)) for _ in range(6)]
        assert sorted(s.tiles for s in slots) == [(t, t + 1) for t in range(0, 12, 2)]
        assert len({affinity_mask(s.tiles, "COMPOSITE").split(".")[0] for s in slots}) == 6
        with pytest.raises(TimeoutError), acquire(tmp_path, ["n1"], 12, 2, timeout=0):
            pass


def _hold_all_but(stack, lock_dir, host, free):
    """Hold every tile of `host` except `free`, each by its own holder."""
    holders = {}
    for _ in range(12):
        inner = contextlib.ExitStack()
        slot = inner.enter_context(acquire(lock_dir, [host], 12, 1, timeout=1))
        holders[slot.tiles[0]] = inner
    assert sorted(holders) == list(range(12))
    for tile, inner in holders.items():
        if tile in free:
            inner.close()
        else:
            stack.push(inner)


def test_two_tile_jobs_prefer_whole_cards_then_take_any(tmp_path):
    with contextlib.ExitStack() as stack:
        # Tiles 0 and 3 taken: free 1 and 2 sit on different cards.
        _hold_all_but(stack, tmp_path, "n1", free={1, 2, *range(4, 12)})
        pairs = [stack.enter_context(acquire(tmp_path, ["n1"], 12, 2)) for _ in range(4)]
        assert [p.tiles for p in pairs] == [(4, 5), (6, 7), (8, 9), (10, 11)]
        last = stack.enter_context(acquire(tmp_path, ["n1"], 12, 2, timeout=0))
        assert last == Slot("n1", (1, 2))


def test_aligned_pair_on_next_host_beats_split_pair(tmp_path):
    with contextlib.ExitStack() as stack:
        _hold_all_but(stack, tmp_path, "n1", free={1, 2})
        slot = stack.enter_context(acquire(tmp_path, ["n1", "n2"], 12, 2, timeout=0))
        assert slot == Slot("n2", (0, 1))
        split = stack.enter_context(acquire(tmp_path, ["n1"], 12, 2, timeout=0))
        assert split == Slot("n1", (1, 2))


def test_job_larger_than_node_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="13 tiles"), acquire(tmp_path, ["n1"], 12, 13):
        pass


def test_release_on_exception(tmp_path):
    with pytest.raises(RuntimeError), acquire(tmp_path, ["n1"], 1, 1) as slot:
        assert slot.tiles == (0,)
        raise RuntimeError("task failed")
    with acquire(tmp_path, ["n1"], 1, 1, timeout=0) as again:
        assert again.tiles == (0,)


HOLDER = """
import sys
import time
from placement import tiles
with tiles.acquire(sys.argv[1], ["n1"], 1, 1, timeout=5) as slot:
    print(slot.host, *slot.tiles, flush=True)
    time.sleep(60)
"""


def test_sigkilled_holder_leaves_no_stale_lock(tmp_path):
    env = {**os.environ, "PYTHONPATH": SCRIPTS}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().split() == ["n1", "0"]
        lock_file = next(tmp_path.glob("n1.tile-00.lock"))
        assert lock_file.read_text().strip() == str(holder.pid)
        with pytest.raises(TimeoutError), acquire(tmp_path, ["n1"], 1, 1, timeout=0.2):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(5)
        # a poll longer than the timeout: only a tile free at the first try is taken
        with acquire(tmp_path, ["n1"], 1, 1, poll=60, timeout=1) as slot:
            assert slot == Slot("n1", (0,))
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


# --- engine environment ----------------------------------------------------


def test_engine_env_is_unique_per_tile(tmp_path):
    envs = [engine_env(Slot("n1", (t,)), "FLAT", 29500, tmp_path) for t in range(12)]
    for key in ("VLLM_PORT", "MASTER_PORT", "TMPDIR", "ZE_AFFINITY_MASK"):
        assert len({e[key] for e in envs}) == 12, key
    all_ports = [e["VLLM_PORT"] for e in envs] + [e["MASTER_PORT"] for e in envs]
    assert len(set(all_ports)) == 24
    env3 = envs[3]
    assert env3 == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "ZE_AFFINITY_MASK": "3",
        "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1",
        "ZE_FLAT_DEVICE_HIERARCHY": "FLAT",
        "TMPDIR": str(tmp_path / "tile-3"),
        "VLLM_PORT": "29530",
        "MASTER_PORT": "29535",
        "VLLM_HOST_IP": "127.0.0.1",
        "MASTER_ADDR": "127.0.0.1",
        "TILE_HOST": "n1",
        "TILE_IDS": "3",
    }
    pair = engine_env(Slot("n2", (4, 5)), "COMPOSITE", 29500, tmp_path)
    assert pair["ZE_AFFINITY_MASK"] == "2.0,2.1"
    assert pair["TILE_IDS"] == "4,5"
    assert pair["ZE_FLAT_DEVICE_HIERARCHY"] == "COMPOSITE"


# --- launcher argv ---------------------------------------------------------

TRICKY = {"PROMPT_NOTE": 'it\'s a "test"; rm -rf / && echo $HOME', "ZE_AFFINITY_MASK": "3"}


def test_launch_argv_aurora_mpiexec():
    argv = launch_argv(AURORA_LAUNCHER, Slot("x4102c0s0b0n0", (3,)), AURORA_CPUS, TRICKY, ["py"])
    assert argv == [
        "mpiexec",
        "-n",
        "1",
        "--hosts",
        "x4102c0s0b0n0",
        "--cpu-bind",
        "list:25-32",
        "env",
        'PROMPT_NOTE=it\'s a "test"; rm -rf / && echo $HOME',
        "ZE_AFFINITY_MASK=3",
        "py",
    ]


def test_launch_argv_multi_tile_rank_gets_the_cores_of_all_its_tiles():
    argv = launch_argv(AURORA_LAUNCHER, Slot("h", (4, 5)), AURORA_CPUS, {}, ["py"])
    assert argv[:7] == ["mpiexec", "-n", "1", "--hosts", "h", "--cpu-bind", "list:33-48"]


def test_launch_argv_srun_and_tiles_placeholder():
    argv = launch_argv(
        [*SRUN_LAUNCHER, "--comment=tiles {tiles}"],
        Slot("c2", (4, 5)),
        [],
        {"B": "two words", "A": "x"},
        ["python", "-c", "print(1)"],
    )
    assert argv == [
        "srun",
        "--nodes=1",
        "--ntasks=1",
        "--nodelist=c2",
        "--overlap",
        "--comment=tiles 4,5",
        "env",
        "A=x",
        "B=two words",
        "python",
        "-c",
        "print(1)",
    ]


def test_launch_argv_empty_template_runs_here():
    assert launch_argv([], Slot("h", (0,)), [], {"A": "1"}, ["true"]) == ["env", "A=1", "true"]


def test_launch_argv_env_values_survive_a_real_exec():
    # The argv must reach the program unchanged: no shell anywhere.
    env = {"TRICKY": TRICKY["PROMPT_NOTE"], "SPACES": "  a  b  "}
    argv = launch_argv(
        [],
        Slot("h", (0,)),
        [],
        env,
        [
            sys.executable,
            "-c",
            "import os, json; print(json.dumps([os.environ['TRICKY'], os.environ['SPACES']]))",
        ],
    )
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [env["TRICKY"], env["SPACES"]]


@pytest.mark.parametrize("element", ["{hostname}", "{0}", "{}", "--x={host.upper}", "{host"])
def test_launch_argv_rejects_bad_placeholders(element):
    with pytest.raises(ValueError, match="launcher") as error:
        launch_argv(["mpiexec", element], Slot("h", (0,)), AURORA_CPUS, {}, ["true"])
    if element == "{hostname}":
        assert "{hostname}" in str(error.value)


def test_launch_argv_cpus_required_when_used():
    with pytest.raises(ValueError, match="cpu_bind"):
        launch_argv(AURORA_LAUNCHER, Slot("h", (0,)), [], {}, ["true"])
    with pytest.raises(ValueError, match="cpu_bind"):
        launch_argv(AURORA_LAUNCHER, Slot("h", (5,)), ["1-8"], {}, ["true"])


def test_launch_argv_rejects_bad_env_names():
    with pytest.raises(ValueError, match="name"):
        launch_argv([], Slot("h", (0,)), [], {"-i": "x"}, ["true"])
    with pytest.raises(ValueError, match="="):
        launch_argv([], Slot("h", (0,)), [], {}, ["A=b"])


# --- run_placed end to end -------------------------------------------------

CHILD = """
import json
import os
import sys
keys = ["ZE_AFFINITY_MASK", "ZE_FLAT_DEVICE_HIERARCHY", "TILE_HOST", "TILE_IDS", "VLLM_PORT",
        "MASTER_PORT", "VLLM_HOST_IP", "TMPDIR", "TASK_NOTE", "OUTER_VAR"]
print("CHILD " + json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
sys.exit(int(sys.argv[1]))
"""


def _placed(tmp_path, code, **overrides):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("nodeA\nnodeA\n")
    options = dict(
        log_path=tmp_path / "logs" / "rank.log",
        tiles_per_job=1,
        tiles_per_node=12,
        hierarchy_setting="auto",
        base_port=29500,
        cpu_bind=[],
        launcher=[],
        extra_env={"TASK_NOTE": "a b; 'c'", "HF_HUB_OFFLINE": 1},
        environ={"PBS_NODEFILE": str(nodefile), "ZE_FLAT_DEVICE_HIERARCHY": "COMPOSITE"},
        lock_dir=tmp_path / "locks",
        tmp_root=tmp_path / "tmp",
    )
    options.update(overrides)
    return run_placed([sys.executable, "-c", CHILD, str(code)], **options)


def _child_env(log_path):
    lines = log_path.read_text().splitlines()
    return json.loads(next(line for line in lines if line.startswith("CHILD "))[6:])


def test_run_placed_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OUTER_VAR", "kept")
    log_path = tmp_path / "logs" / "rank.log"
    with acquire(tmp_path / "locks", ["nodeA"], 12, 1) as busy:
        assert busy.tiles == (0,)
        assert _placed(tmp_path, 0) == 0
    seen = _child_env(log_path)
    assert seen == {
        "ZE_AFFINITY_MASK": "0.1",
        "ZE_FLAT_DEVICE_HIERARCHY": "COMPOSITE",
        "TILE_HOST": "nodeA",
        "TILE_IDS": "1",
        "VLLM_PORT": "29510",
        "MASTER_PORT": "29515",
        "VLLM_HOST_IP": "127.0.0.1",
        "TMPDIR": str(tmp_path / "tmp" / "tile-1"),
        "TASK_NOTE": "a b; 'c'",
        "OUTER_VAR": "kept",
    }
    text = log_path.read_text()
    assert "placement: host=nodeA tiles=1 mask=0.1 hierarchy=COMPOSITE pid=" in text
    argv_line = next(line for line in text.splitlines() if line.startswith("argv: "))
    argv = json.loads(argv_line[len("argv: ") :])
    assert argv[0] == "env" and "TASK_NOTE=a b; 'c'" in argv and "HF_HUB_OFFLINE=1" in argv
    # The slot is free again.
    with acquire(tmp_path / "locks", ["nodeA"], 12, 1, timeout=0) as slot:
        assert slot.tiles == (0,)


def test_run_placed_propagates_failure(tmp_path):
    assert _placed(tmp_path, 3, hierarchy_setting="FLAT") == 3
    log_path = tmp_path / "logs" / "rank.log"
    assert _child_env(log_path)["ZE_AFFINITY_MASK"] == "0"
    assert "placement: exit code 3" in log_path.read_text()


def test_run_placed_refuses_to_override_placement(tmp_path):
    with pytest.raises(ValueError, match="VLLM_PORT"):
        _placed(tmp_path, 0, extra_env={"VLLM_PORT": "1"})


def test_run_placed_hides_secrets_in_log(tmp_path):
    assert _placed(tmp_path, 0, extra_env={"HF_TOKEN": "hf_secret"}) == 0
    text = (tmp_path / "logs" / "rank.log").read_text()
    assert "hf_secret" not in text
    assert "HF_TOKEN=<hidden>" in text


PARENT = """
import sys
from placement import tiles
from placement import launcher
child = sys.argv[3]
code = launcher.run_placed(
    [sys.executable, "-c", child],
    log_path=sys.argv[1], tiles_per_job=1, tiles_per_node=1, hierarchy_setting="FLAT",
    base_port=29500, cpu_bind=[], launcher=[], extra_env={}, environ={},
    lock_dir=sys.argv[2], tmp_root=sys.argv[2],
)
print("parent returned", code, flush=True)
sys.exit(code)
"""

SLEEPER = """
import os
import signal
import sys
import time
def stop(signum, frame):
    print("child got", signal.Signals(signum).name, flush=True)
    sys.exit(7)
signal.signal(signal.SIGTERM, stop)
print("child ready", os.getpid(), flush=True)
time.sleep(30)
"""


# A child that takes its time to end after SIGTERM (as vLLM shutting down).
STUBBORN = SLEEPER.replace("    sys.exit(7)\n", "")


def _start_parent(tmp_path, child=SLEEPER):
    log_path = tmp_path / "parent.log"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(log_path), str(tmp_path / "locks"), child],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SCRIPTS},
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # The argv line quotes the child's source, so match whole output lines only.
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        ready = [line for line in lines if line.startswith("child ready ")]
        if ready:
            return parent, log_path, int(ready[0].split()[-1])
        time.sleep(0.02)
    parent.kill()
    raise AssertionError("child never started")


def test_run_placed_forwards_sigterm_to_child(tmp_path):
    parent, log_path, child_pid = _start_parent(tmp_path)
    try:
        parent.send_signal(signal.SIGTERM)
        out, _ = parent.communicate(timeout=10)
        assert parent.returncode == 7
        assert "parent returned 7" in out
        assert "child got SIGTERM" in log_path.read_text()
    finally:
        parent.kill()
        parent.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)


def _child_got_sigterm(log_path) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "child got SIGTERM" in log_path.read_text().splitlines():
            return True
        time.sleep(0.02)
    return False


def test_a_child_ends_when_the_process_that_placed_it_is_killed(tmp_path):
    """SIGKILL of Snakemake (here: the parent) does not leave its rank tasks running."""
    parent, log_path, child_pid = _start_parent(tmp_path)
    try:
        parent.kill()
        parent.wait(5)
        assert _child_got_sigterm(log_path)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not Path(f"/proc/{child_pid}").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)
        parent.stdout.close()


def test_tile_stays_taken_while_orphaned_child_runs(tmp_path):
    parent, log_path, child_pid = _start_parent(tmp_path, STUBBORN)
    host = [socket.gethostname()]
    try:
        parent.kill()
        parent.wait(5)
        assert _child_got_sigterm(log_path)  # and it goes on for a while
        # The engine outlived its launcher: its tile must not be handed out...
        with pytest.raises(TimeoutError), acquire(tmp_path / "locks", host, 1, 1, timeout=0.3):
            pass
        os.kill(child_pid, signal.SIGKILL)
        # ...until it is gone too.
        with acquire(tmp_path / "locks", host, 1, 1, poll=0.02, timeout=2) as slot:
            assert slot.tiles == (0,)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)
        parent.stdout.close()
