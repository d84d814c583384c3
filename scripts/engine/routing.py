"""The ranks' routing pool: which engine serves a rank's requests, read from the engine
registry (formats/registry.py) that the supervisors write; suspect engines asked
for their health without a lock held, waits and stalls bounded.

An engine the registry reports ready is routed to only once the server on its port
proved to be that engine (client.identify: the entry's engine id, or the run's key for
vLLM's own server), checked by a thread of its own: a port another process took after
the supervisor's check never gets a rank's request.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import console
from engine import client, kv_window, lifecycle
from engine.supervisor import job_hosts, spec_api_key, spec_ready_timeout
from formats import registry as registry_format
from formats.registry import FAILED, READY, STARTING, STOPPED, engine_file, registry_dir
from placement import node_layout

# Seconds between the client's reads of the registry: while engines start or restart,
# and once all have settled. A local run's registry (a few entries on a local disk) is
# read every LOCAL_REFRESH_S while its engines start: a rank's first request follows its
# engine's ready report by ~0.1 s instead of up to 1 s.
REFRESH_S = 1.0
LOCAL_REFRESH_S = 0.1
SETTLED_REFRESH_S = 10.0


@dataclass(frozen=True)
class RemoteEngine:
    """What a rank needs of an engine on another node (as lifecycle.Engine offers it)."""

    name: str
    url: str
    log_path: str
    env: dict = field(default_factory=dict, compare=False, hash=False)
    api_key: str | None = field(default=None, compare=False, hash=False, repr=False)
    engine_id: str | None = field(default=None, compare=False, hash=False)
    proof: str = field(default="id", compare=False, hash=False)

    def identify(self, timeout: float = 1.0) -> client.Identity:
        return client.identify(self.url, self.engine_id, self.api_key, self.proof, timeout)


@dataclass
class _Remote:
    file: str
    engine: RemoteEngine | None = None
    # starting, checking (reported ready, identity not yet proved), ready, suspect,
    # restarting, failed, stopped
    state: str = STARTING
    in_flight: int = 0
    suspect_since: float = 0.0
    proved: tuple | None = None  # (url, engine id) whose identity this pool checked
    probing: bool = False  # a _probe thread runs for it
    conflicts_told: int = 0  # its port conflicts already in the run's output
    foreign_told: tuple | None = None


PBS_LAUNCHER = (
    "the engines' launcher (config engine_launcher) exited with status {status} "
    "(the job's PBS log has its output)"
)


class RegistryPool:
    """The engines of a PBS job's node, or of a local run, as the registry reports
    them; what infer.serve_rank routes through (`route`, `mark_failed`).

    Ranks wait while no engine is ready; a rank fails, naming engine logs, when none
    became ready within ``ready_timeout`` seconds of the pool's creation, or when all
    have failed. An engine a rank found unavailable is left out until its node
    process reports it restarted, or it answers /health again.
    """

    def __init__(
        self,
        registry: Path,
        expected: Sequence[str],
        max_in_flight: int,
        ready_timeout: float,
        clock=time.monotonic,
        stall_timeout: float = 600.0,
        api_key: str | None = None,
        scope: str = "this job",
        launcher: str = PBS_LAUNCHER,
        refresh_s: float | None = None,
    ):
        self.registry = Path(registry)
        # between reads while engines start or restart (None: REFRESH_S)
        self.refresh_s = REFRESH_S if refresh_s is None else refresh_s
        self.scope = scope  # what the engines are, for messages
        self.launcher = launcher  # what started them, for messages
        self.members = {name: _Remote(name) for name in expected}
        self.max_in_flight = max_in_flight
        self.ready_timeout = ready_timeout
        self.stall_timeout = stall_timeout
        self.api_key = api_key
        self.clock = clock
        self.created = clock()
        self._progress_at = self.created  # a request slot freed or an engine's state changed
        self._cond = threading.Condition()
        self._read_at = -1.0
        self._mtimes: dict[str, float] = {}
        self._launcher_exit: int | None = None
        kv_window.watch(self._room)

    @classmethod
    def for_job(cls, spec: Mapping, environ=os.environ) -> RegistryPool:
        """The engines of this node (``ranks-node`` names it), else of the whole job."""
        if environ.get(lifecycle.NODE_VARIABLE) and environ.get("PBS_JOBID"):
            host = environ[lifecycle.NODE_VARIABLE]
            return cls.for_hosts(spec, environ["PBS_JOBID"], [host], f"node {host}")
        job_id, hosts = job_hosts(environ)
        return cls.for_hosts(spec, job_id, hosts, "this job")

    @classmethod
    def for_hosts(
        cls,
        spec: Mapping,
        job_id: str,
        hosts: Sequence[str],
        scope: str,
        launcher: str = PBS_LAUNCHER,
        refresh_s: float | None = None,
    ) -> RegistryPool:
        """The engines that ``node`` starts for ``hosts`` under ``job_id``."""
        per_node, per_job = spec["tiles"]["per_node"], spec["tiles"]["per_job"]
        expected = [
            engine_file(slot)
            for host in hosts
            for slot in node_layout.engine_slots(per_node, per_job, host)
        ]
        return cls(
            registry_dir(spec, job_id),
            expected,
            spec["ranks_in_flight"],
            spec_ready_timeout(spec),
            stall_timeout=spec["stall_timeout_s"],
            api_key=spec_api_key(spec),
            scope=scope,
            launcher=launcher,
            refresh_s=refresh_s,
        )

    def _refresh(self) -> None:
        """Read the registry entries that changed (at most every ``refresh_s``); with the
        condition held."""
        now = self.clock()
        # Once every engine has settled, the registry is read rarely: at 3,072 engines
        # a read is thousands of stat calls on the shared file system.
        settled = all(m.state in (READY, FAILED, STOPPED) for m in self.members.values())
        if now - self._read_at < (SETTLED_REFRESH_S if settled else self.refresh_s):
            return
        self._read_at = now
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.registry):
                name = entry.name[:-5]
                member = self.members.get(name)
                if member is None or not entry.name.endswith(registry_format.SUFFIX):
                    continue
                with contextlib.suppress(OSError):
                    mtime = entry.stat().st_mtime
                    if self._mtimes.get(name) == mtime:
                        continue
                    record = registry_format.read_entry(entry.path)
                    if record is None:
                        continue  # being replaced: the next read gets it
                    self._mtimes[name] = mtime
                    self._update(member, record)
        status = registry_format.launcher_exit(self.registry)
        if status is not None:
            self._launcher_exit = status

    def _update(self, member: _Remote, record: Mapping) -> None:
        member.engine = RemoteEngine(
            record["name"],
            record["url"],
            record["log"],
            dict(record.get("env") or {}),
            api_key=self.api_key,
            engine_id=record.get("engine_id"),
            proof=record.get("proof") or "id",
        )
        conflicts = record.get("port_conflicts") or []
        for conflict in conflicts[member.conflicts_told :]:
            console.say(f"engines: {conflict}")
        member.conflicts_told = len(conflicts)
        state = record["state"]
        if member.state == "suspect" and state == READY and record["time"] < member.suspect_since:
            return  # the report predates the failure: wait for the restart's report
        if state == READY and member.proved != (member.engine.url, member.engine.engine_id):
            state = "checking"  # identity first (_probe)
        if state != member.state:
            self._progress_at = self.clock()
        member.state = state
        if state == "checking":
            self._start_probe(member)

    def _failure(self, what: str) -> str:
        logs = [
            m.engine.log_path if m.engine else str(self.registry / f"{m.file}.log")
            for m in self.members.values()
            if m.state != READY
        ]
        return f"{what}; engine logs: {', '.join(logs[:3])}" + (
            f" and {len(logs) - 3} more in {self.registry}" if len(logs) > 3 else ""
        )

    def _pick(self) -> _Remote | None:
        self._refresh()
        ready = [m for m in self.members.values() if m.state == READY]
        if not ready:
            if all(m.state in (FAILED, STOPPED) for m in self.members.values()):
                raise client.EngineUnavailable(
                    self._failure(f"every engine of {self.scope} failed")
                )
            if self._launcher_exit is not None:
                raise client.EngineUnavailable(
                    self._failure(
                        self.launcher.format(status=self._launcher_exit) + " and no engine is ready"
                    )
                )
            if self.clock() - self.created > self.ready_timeout:
                raise client.EngineUnavailable(
                    self._failure(
                        f"no engine of {self.scope} was ready within {self.ready_timeout:.0f} s "
                        "(config warm.ready_timeout_s)"
                    )
                )
        # An engine whose KV cache is fully claimed, with requests waiting, takes no new
        # rank: the rank waits here for whichever engine has room first
        # (engine/kv_window.py).
        free = [
            m
            for m in ready
            if m.in_flight < self.max_in_flight
            and not kv_window.crowded(m.engine.url, m.engine.engine_id)
        ]
        if not free and ready and self.clock() - self._progress_at > self.stall_timeout:
            busy = [f"{m.file} {m.in_flight} in flight" for m in ready]
            raise client.EngineUnavailable(
                self._failure(
                    f"no request finished and no engine changed state for "
                    f"{self.stall_timeout:.0f} s (config warm.stall_timeout_s) while ranks "
                    f"wait for an engine ({', '.join(busy[:3])})"
                )
            )
        return min(free, key=lambda m: m.in_flight) if free else None

    def _room(self) -> None:
        """A crowded engine's waiting requests are all in (kv_window.watch): a rank
        waiting in route() may go to it."""
        with self._cond:
            self._progress_at = self.clock()
            self._cond.notify()

    @contextlib.contextmanager
    def route(self, timeout: float | None = None) -> Iterator[RemoteEngine]:
        """Hold one request slot of the least busy ready engine (waits while none is free:
        each holds its ranks_in_flight ranks, or its KV cache is crowded)."""
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            while (member := self._pick()) is None:
                left = self.refresh_s
                if deadline is not None:
                    left = min(left, deadline - self.clock())
                    if left <= 0:
                        raise client.EngineUnavailable(f"no engine free within {timeout} s")
                self._cond.wait(left)
            member.in_flight += 1
        try:
            yield member.engine
        finally:
            with self._cond:
                member.in_flight -= 1
                self._progress_at = self.clock()
                self._cond.notify()

    def mark_failed(self, engine: RemoteEngine) -> None:
        """Leave the engine out until its node process reports it restarted, or it
        answers /health again (asked by a thread of its own: no lock is held across a
        network call)."""
        with self._cond:
            for member in self.members.values():
                same = member.engine is not None and member.engine.name == engine.name
                if same and member.state == READY:
                    member.state = "suspect"
                    member.suspect_since = time.time()
                    self._start_probe(member)

    def _start_probe(self, member: _Remote) -> None:
        """With the condition held."""
        if not member.probing:
            member.probing = True
            threading.Thread(target=self._probe, args=(member,), daemon=True).start()

    def _probe(self, member: _Remote) -> None:
        """Until the server on a checking or suspect engine's port proves it is that
        engine (then ready), or the registry reports another state."""
        while True:
            with self._cond:
                if member.state not in ("checking", "suspect"):
                    member.probing = False
                    return
                engine = member.engine
            answer = engine.identify(timeout=1.0)
            with self._cond:
                if answer.ours and member.engine is engine:
                    if member.state in ("checking", "suspect"):
                        member.state = READY
                        member.proved = (engine.url, engine.engine_id)
                        self._progress_at = self.clock()
                        self._cond.notify_all()
                    member.probing = False
                    return
            told = (engine.url, engine.engine_id)
            if answer.answered and not answer.ours and member.foreign_told != told:
                member.foreign_told = told
                console.say(
                    f"engines: {engine.name}: another process answers at {engine.url} "
                    f"({answer.detail}): not this run's engine; no rank is sent there"
                )
            time.sleep(max(REFRESH_S, 0.2))
