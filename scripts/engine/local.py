"""A local run's engine service: the one-node case of a submission.

`LocalService` runs the supervisor (engine/supervisor.py `node`) as a child of
Snakemake tied by a lifeline (its stdin: EOF after a SIGKILL of Snakemake stops the
engines), with a registry under logs/engines/local-<date>-<time>-<pid>/ and a 0600 key
file; the ranks route through the same pool (engine/routing.py) as in a submission.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import console
from engine import lifecycle
from engine.routing import LOCAL_REFRESH_S, RegistryPool
from engine.supervisor import listen_address
from formats import engine_spec
from formats.registry import registry_dir, write_launcher_exit
from placement import node_layout, tiles
from placement.ports import api_port, free_base_port

SUPERVISOR = Path(__file__).with_name("supervisor.py")


def _log(message: str) -> None:
    console.say(f"engines: {message}")


LOCAL_LAUNCHER = "the engines' supervisor exited with status {status} (its log: {log})"


class LocalService:
    """The engines of a local run: the one-node case of a submission.

    ``start`` writes the run's spec and a new key (``<registry root>/<run>.engines.json``
    and ``.key``, 0600, as pbs-submit does per submission), runs ``node`` (the
    supervisor a submission's launcher starts on each node) as a child in a session of
    its own, and returns the RegistryPool of its engines. The child's standard input is
    a pipe only this process holds: when this process ends, even by SIGKILL, the child
    reads end of file and stops the engines. ``stop`` closes that pipe and waits.
    """

    def __init__(self, spec: Mapping, host: str | None = None, run_id: str | None = None):
        self.spec = dict(spec)
        self.host = host or socket.gethostname()
        self.run_id = run_id or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.registry = registry_dir(self.spec, self.run_id)
        self.log_path = self.registry / "supervisor.log"
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def start(self) -> RegistryPool:
        self.registry.mkdir(parents=True, exist_ok=True)
        spec_path = engine_spec.spec_path(self.registry.parent, self.run_id)
        key_file = engine_spec.key_path(spec_path)
        lifecycle.write_key_file(key_file, lifecycle.new_api_key())
        placement = self.spec["tiles"]
        slots = node_layout.engine_slots(placement["per_node"], placement["per_job"], self.host)
        address = listen_address(self.spec, self.host)
        base = free_base_port(self.spec, slots, address)
        # What was chosen, always: two runs on one machine tell their engines apart by it.
        chosen = ", ".join(str(api_port(base, slot)) for slot in slots)
        why = ""
        if base != placement["base_port"]:
            why = (
                f"ports from tiles.base_port {placement['base_port']} are in use on this "
                "machine (another run's engines?): "
            )
        _log(
            f"{why}this run's engines use tiles.base_port {base} (API ports {chosen} on "
            f"{address}; an engine whose port another process takes moves to a free one)"
        )
        placement = self.spec["tiles"] | {"base_port": base}
        spec = self.spec | {"api_key_file": str(key_file), "tiles": placement}
        engine_spec.write_spec(spec_path, spec)
        argv = [sys.executable, str(SUPERVISOR), "node", str(spec_path)]
        argv += [self.run_id, self.host, "--lifeline"]
        # Launchers' local-rank variables would give this one process a share of the node.
        local_rank = {name for pair in tiles.LOCAL_RANK_VARIABLES for name in pair}
        env = {k: v for k, v in os.environ.items() if k not in local_rank}
        with self._lock, open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        threading.Thread(target=self._report_exit, args=(self._process,), daemon=True).start()
        launcher = LOCAL_LAUNCHER.replace("{log}", str(self.log_path))
        return RegistryPool.for_hosts(
            spec, self.run_id, [self.host], "this run", launcher, refresh_s=LOCAL_REFRESH_S
        )

    def _report_exit(self, process: subprocess.Popen) -> None:
        """As ``launch`` does: ranks stop waiting for engines that will never come."""
        code = process.wait()
        write_launcher_exit(self.registry, code)

    def stop(self, grace: float = 60.0, wait: bool = True) -> None:
        """Stop the engines (all at once) and wait for the supervisor, at most ``grace`` s;
        ``wait`` False: only tell it to stop them (a later ``stop`` waits)."""
        with self._lock:
            process = self._process
            if wait:
                self._process = None
        if process is None:
            return
        with contextlib.suppress(OSError):
            process.stdin.close()
        if not wait:
            return
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            # Its engines' own lifelines end them once it is gone.
            process.kill()
            process.wait()
