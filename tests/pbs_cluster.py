"""A real OpenPBS 23.06 server with four execution hosts on loopback, for tests.

OpenPBS (the open-source PBS Pro that Aurora runs as Altair PBS Pro) is built into
``/opt/pbs`` by ``scripts/tools/install-openpbs.sh`` (recipe: ``../shared/notes/openpbs.md``).
This module starts the server side (``pbs_comm``, ``pbs_sched``, ``pbs_server`` and the
PostgreSQL datastore that ``pbs_server`` runs) with ``/opt/pbs/libexec/pbs_init.d``,
then one ``pbs_mom`` per host ``node1``..``node4`` (each its own ``PBS_HOME``, host
name and ports), configures server, resources and Aurora-like queues with ``qmgr``,
and stops all of it again. Run as root; jobs run as root.

Usage::

    with PbsCluster() as cluster:
        res = cluster.run(["qsub", "-q", "debug", "-l", "select=1,walltime=00:01:00",
                           "job.sh"])
        job = cluster.wait_job(res.stdout.strip(), timeout=60)
        assert job["Exit_status"] == 0

Every client (``qsub``, ``qstat``, ``qdel``, ``qmgr``, ``pbsnodes`` ...) must run with
``env=cluster.env`` (``/opt/pbs/bin`` and ``/opt/pbs/sbin`` first on PATH,
``PBS_CONF_FILE=/etc/pbs.conf``, ``PBS_SERVER=pbs-head``).

PBS is installed machine-wide (one ``/etc/pbs.conf``, one ``/var/spool/pbs``), so there
is one cluster per machine: :meth:`PbsCluster.start` takes an exclusive lock
(``/var/tmp/pbs-test-cluster/lock``; a second test session waits for it), stops any
PBS daemons, job processes and datastore left by an earlier run, and deletes its jobs.
A watchdog process in its own session holds a pipe from the process that started the
cluster; when that pipe closes without the word ``stopped`` (the test process was
killed, even by SIGKILL), the watchdog runs the stop sequence.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

PBS_EXEC = Path("/opt/pbs")
PBS_HOME = Path("/var/spool/pbs")
PBS_CONF = Path("/etc/pbs.conf")
INIT_SCRIPT = PBS_EXEC / "libexec" / "pbs_init.d"
SERVER_HOST = "pbs-head"
HOSTS_FILE = Path("/etc/hosts")
# Lock, watchdog log and start/stop logs of the test cluster.
STATE_DIR = Path("/var/tmp/pbs-test-cluster")

# Aurora's queues, scaled to four hosts. Aurora: debug 1-2 nodes <= 1 h, one job
# queued per user; debug-scaling 2-31 nodes <= 1 h, one queued; capacity 1-4 nodes
# <= 7 days (here: up to all four hosts), 2 running and 5 queued per user; prod is a
# routing queue for jobs of hundreds of nodes: a 4-host job is refused there as a
# small job is on Aurora. No resources_min.walltime: tests use walltimes of seconds.
DEFAULT_QUEUES: dict[str, dict[str, str]] = {
    "debug": {
        "resources_min.nodect": "1",
        "resources_max.nodect": "2",
        "resources_max.walltime": "01:00:00",
        "max_queued": "[u:PBS_GENERIC=1]",
    },
    "debug-scaling": {
        "resources_min.nodect": "2",
        "resources_max.nodect": "4",
        "resources_max.walltime": "01:00:00",
        "max_queued": "[u:PBS_GENERIC=1]",
    },
    "capacity": {
        "resources_min.nodect": "1",
        "resources_max.nodect": "4",
        "resources_max.walltime": "168:00:00",
        "max_run": "[u:PBS_GENERIC=2]",
        "max_queued": "[u:PBS_GENERIC=5]",
    },
    "prod": {
        "resources_min.nodect": "256",
    },
}

# Seconds a job's first mom waits for a sister it lost before it ends the job (PBS then
# requeues it: "Job requeued, execution node node2 down"); PBS's default is 300.
MAX_POLL_DOWNTIME = 10

SERVER_ATTRIBUTES: dict[str, str] = {
    "acl_roots": "root",  # jobs run as root here
    "job_history_enable": "True",  # qstat -x (finished jobs stay, state F)
    "scheduler_iteration": "2",
    "flatuid": "True",
}

# Daemon programs of a PBS installation (``/proc/<pid>/exe`` basenames).
_PBS_DAEMONS = ("pbs_server.bin", "pbs_sched", "pbs_comm", "pbs_mom", "pbs_ds_monitor")

_PR_SET_PDEATHSIG = 1


class PbsClusterError(RuntimeError):
    """The cluster could not be started or stopped (message includes the logs)."""


# ---------------------------------------------------------------------- helpers
def mom_port(index: int) -> int:
    """``PBS_MOM_SERVICE_PORT`` of host ``node<index>`` (the manager port is +1)."""
    return 15010 + 2 * index


def host_address(index: int) -> str:
    """Loopback address of ``node<index>``; index 0 is the server host ``pbs-head``."""
    return f"127.0.0.{10 + index}"


def _read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _readlink_proc(pid: int, name: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    stat = _read_proc(pid, "stat")
    return int(stat.rsplit(b")", 1)[1].split()[1]) if stat else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = _read_proc(pid, "stat").rsplit(b")", 1)[-1].split()[:1]
    return state != [b"Z"]


def _own_lineage() -> set[int]:
    """This process and its ancestors: never signalled by the sweeps."""
    pids: set[int] = set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        stat = _read_proc(pid, "stat")
        if not stat:
            break
        pid = int(stat.rsplit(b")", 1)[1].split()[1])
    return pids


def pbs_processes() -> dict[int, str]:
    """Processes of this machine's PBS test cluster: {pid: what}.

    PBS daemons (their executable is in ``/opt/pbs/sbin``), the PostgreSQL
    datastore (working folder ``/var/spool/pbs/datastore``) and job processes
    (environment ``PBS_JOBID=<id>.pbs-head``). The current process and its
    ancestors are never listed (a test session run inside a PBS job).
    """
    skip = _own_lineage()
    datastore = str(PBS_HOME / "datastore")
    job_suffix = f".{SERVER_HOST}".encode()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        pid = int(entry)
        exe = _readlink_proc(pid, "exe").removesuffix(" (deleted)")
        if exe.startswith(str(PBS_EXEC / "sbin") + "/") and Path(exe).name in _PBS_DAEMONS:
            found[pid] = Path(exe).name
            continue
        if exe.startswith(str(PBS_EXEC / "bin") + "/") and _ppid(pid) == 1:
            found[pid] = Path(exe).name  # a client's daemon (qsub keeps one)
            continue
        cwd = _readlink_proc(pid, "cwd")
        if Path(exe).name.startswith("postgres") and (
            cwd == datastore or cwd.startswith(datastore + "/")
        ):
            found[pid] = "postgres"
            continue
        for var in _read_proc(pid, "environ").split(b"\0"):
            if var.startswith(b"PBS_JOBID=") and var.endswith(job_suffix):
                cmd = _read_proc(pid, "cmdline").replace(b"\0", b" ").strip()
                found[pid] = "job: " + cmd.decode(errors="replace")[:80]
                break
    return found


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [pid for pid in pending if _alive(pid)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return pending


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def clear_stale_pyenv_lock(home: str | os.PathLike[str] | None = None) -> bool:
    """Remove pyenv's rehash lock if no ``pyenv-rehash`` process holds it.

    Jobs run as root in a login shell, and on this kind of machine root's
    ``~/.bashrc`` runs ``pyenv init``, whose ``pyenv rehash`` takes the lock file
    ``~/.pyenv/shims/.pyenv-shim``. A job killed (qdel, walltime) while its shell is
    in there leaves the lock behind, and every later job's shell then waits 60 s for
    it (PYENV_REHASH_TIMEOUT). Returns True if a stale lock was removed.
    """
    lock = Path(home or os.path.expanduser("~root")) / ".pyenv" / "shims" / ".pyenv-shim"
    if not lock.exists():
        return False
    for entry in os.listdir("/proc"):
        if entry.isdigit() and b"pyenv-rehash" in _read_proc(int(entry), "cmdline"):
            return False
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    return True


def client_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for PBS client commands (see :attr:`PbsCluster.env`)."""
    src = os.environ if base is None else base
    env = {key: value for key, value in src.items() if not key.startswith("PBS_")}
    path = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p]
    first = [str(PBS_EXEC / "bin"), str(PBS_EXEC / "sbin")]
    env["PATH"] = os.pathsep.join(first + [p for p in path if p not in first])
    env["PBS_CONF_FILE"] = str(PBS_CONF)
    env["PBS_SERVER"] = SERVER_HOST
    return env


def _run_logged(args: Sequence[str], log: Path, timeout: float, env: Mapping[str, str]) -> int:
    """Run a command that starts daemons with its output appended to ``log``.

    Not ``capture_output``: a daemon that keeps the inherited pipe open would make
    the caller wait for the daemon's exit.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(args)}  # {time.strftime('%H:%M:%S')}\n".encode())
        out.flush()
        return subprocess.run(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            timeout=timeout,
            check=False,
        ).returncode


def shutdown_pbs(hosts: int = 4, log: Path | None = None, timeout: float = 60.0) -> list[str]:
    """Stop this machine's PBS test cluster and everything it started.

    Deletes all jobs (``qdel -W force``) while the server is up, stops the moms of
    ``node1``..``node<hosts>`` (SIGTERM: a mom kills its jobs), ``pbs_init.d stop``
    (server, scheduler, comm, datastore), ``pbs_dataservice stop`` if the datastore
    still runs, then SIGTERM/SIGKILL to whatever of :func:`pbs_processes` is left.
    Safe to call when nothing runs. Returns what is still running (normally empty).
    """
    log = log or STATE_DIR / "stop.log"
    env = client_env()
    running = pbs_processes()
    if not running:
        return []
    names = set(running.values())
    if "pbs_server.bin" in names:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            ids = subprocess.run(
                [str(PBS_EXEC / "bin" / "qselect")],
                env=env,
                capture_output=True,
                text=True,
                timeout=15,
                check=False,
            ).stdout.split()
            if ids:
                _run_logged([str(PBS_EXEC / "bin" / "qdel"), "-W", "force", *ids], log, 30, env)
    # Moms: SIGTERM (pbs_mom then kills its jobs and exits).
    mom_pids = [pid for pid, what in running.items() if what == "pbs_mom"]
    for index in range(1, hosts + 1):
        with contextlib.suppress(OSError, ValueError):
            pid = int((Path(f"/var/spool/pbs_node{index}") / "mom_priv" / "mom.lock").read_text())
            if pid in running:
                mom_pids.append(pid)
    _signal_all(set(mom_pids), signal.SIGTERM)
    if names & {"pbs_server.bin", "pbs_sched", "pbs_comm", "postgres"} and INIT_SCRIPT.exists():
        with contextlib.suppress(subprocess.TimeoutExpired):
            _run_logged([str(INIT_SCRIPT), "stop"], log, timeout, env)
    if any(what == "postgres" for what in pbs_processes().values()):
        with contextlib.suppress(subprocess.TimeoutExpired):
            _run_logged([str(PBS_EXEC / "sbin" / "pbs_dataservice"), "stop"], log, 30, env)
    left = _wait_gone(set(mom_pids), 10.0)
    _signal_all(left, signal.SIGKILL)
    left = pbs_processes()
    if left:
        _signal_all(left, signal.SIGTERM)
        _signal_all(_wait_gone(left, 5.0), signal.SIGKILL)
        _wait_gone(left, 5.0)
    clear_stale_pyenv_lock()
    return [f"{pid} {what}" for pid, what in pbs_processes().items()]


# ---------------------------------------------------------------------- watchdog
def spawn_watchdog(
    action: Sequence[str], log: Path, keep_fds: Sequence[int] = ()
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a watchdog (own session) that runs ``action`` unless told ``stopped``.

    Returns the process and the write end of its stdin pipe. Write ``b"stopped\\n"``
    and close the fd after a clean stop: the watchdog exits without running
    ``action``. If the fd is closed otherwise (this process died, even by SIGKILL),
    the watchdog sees EOF without that word and runs ``action``. ``keep_fds`` are
    inherited by the watchdog (the cluster lock: held until ``action`` is done).
    """
    read_fd, write_fd = os.pipe()  # both non-inheritable: no daemon keeps them
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--watchdog", "--", *action],
                stdin=read_fd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C and job-control signals do not reach it
                cwd="/",
                pass_fds=tuple(keep_fds),
            )
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return proc, write_fd


def _watchdog_main(action: list[str]) -> int:
    data = b""
    while True:
        try:
            chunk = os.read(0, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        data += chunk
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    if b"stopped" in data.split():
        print(f"{stamp} watchdog {os.getpid()}: clean stop, nothing to do", flush=True)
        return 0
    print(f"{stamp} watchdog {os.getpid()}: owner gone, running {action}", flush=True)
    return subprocess.run(action, stdin=subprocess.DEVNULL, check=False).returncode


# ---------------------------------------------------------------------- cluster
class PbsCluster:
    """OpenPBS server ``pbs-head`` with execution hosts ``node1``..``node4`` on loopback.

    Args:
        queues: {name: {attribute: value}} execution queues (all enabled and
            started). Default: :data:`DEFAULT_QUEUES` (debug, debug-scaling,
            capacity, prod). Queues other than these and ``workq`` are deleted
            at start (a test's extra queue does not outlive the session).
        start_timeout: seconds to wait for all hosts to be ``free``.
        lock_timeout: seconds to wait for another session's cluster to stop.
        watchdog: start the watchdog that stops everything if this process dies.

    Attributes: ``hosts`` (["node1", ..., "node4"]), ``server`` ("pbs-head"),
    ``queues``, ``env``, ``start_seconds`` and ``stop_seconds`` (last measured).
    """

    hosts_count = 4

    def __init__(
        self,
        *,
        queues: Mapping[str, Mapping[str, str]] | None = None,
        start_timeout: float = 90.0,
        lock_timeout: float = 1800.0,
        watchdog: bool = True,
    ) -> None:
        self.server = SERVER_HOST
        self.hosts = [f"node{i}" for i in range(1, self.hosts_count + 1)]
        src = DEFAULT_QUEUES if queues is None else queues
        self.queues = {name: dict(attrs) for name, attrs in src.items()}
        self.start_timeout = start_timeout
        self.lock_timeout = lock_timeout
        self.use_watchdog = watchdog
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None
        self._lock_fd: int | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_fd: int | None = None
        self._started = False

    # ------------------------------------------------------------ properties
    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands: ``os.environ`` without inherited
        ``PBS_*`` job variables, ``/opt/pbs/bin:/opt/pbs/sbin`` first on PATH,
        ``PBS_CONF_FILE=/etc/pbs.conf`` and ``PBS_SERVER=pbs-head``."""
        return client_env()

    @property
    def running(self) -> bool:
        return self._started

    @property
    def log_dir(self) -> Path:
        """Where start/stop command output and the watchdog log go."""
        return STATE_DIR

    def mom_home(self, host: str) -> Path:
        """``PBS_HOME`` of the mom of ``host`` (``/var/spool/pbs_nodeN``)."""
        return Path(f"/var/spool/pbs_{host}")

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> PbsCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> PbsCluster:
        """Reap leftovers, start server side and moms, configure, wait for ``free``.

        On failure everything started is stopped again and PbsClusterError is
        raised with the daemon logs.
        """
        if self._started:
            return self
        t0 = time.monotonic()
        for prog in ("bin/qsub", "bin/qmgr", "sbin/pbs_server", "sbin/pbs_mom"):
            if not (PBS_EXEC / prog).exists():
                raise PbsClusterError(
                    f"{PBS_EXEC / prog} not found: run scripts/tools/install-openpbs.sh (as root)"
                )
        if os.geteuid() != 0:
            raise PbsClusterError("the PBS test cluster needs root")
        self._lock()
        for name in ("start.log", "stop.log"):  # this session's only
            (STATE_DIR / name).write_bytes(b"")
        try:
            left = shutdown_pbs(self.hosts_count, STATE_DIR / "start.log")
            if left:
                raise PbsClusterError(f"leftover PBS processes would not stop: {left}")
            if self.use_watchdog:
                action = [sys.executable, str(Path(__file__).resolve()), "--shutdown"]
                self._watchdog, self._watchdog_fd = spawn_watchdog(
                    action, STATE_DIR / "watchdog.log", keep_fds=[self._lock_fd]
                )
            self._started = True
            self._add_hosts()
            self._write_server_conf()
            self._start_server()
            self._start_moms()
            self._configure()
            self._wait_free()
        except BaseException:
            with contextlib.suppress(PbsClusterError):  # keep the start error
                self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Delete all jobs, stop moms, server, scheduler, comm and datastore.

        Raises PbsClusterError if a PBS process is still running afterwards.
        """
        if not self._started and self._lock_fd is None:
            return
        t0 = time.monotonic()
        try:
            left = shutdown_pbs(self.hosts_count, STATE_DIR / "stop.log")
        finally:
            self._started = False
            self._release_watchdog()
            self._unlock()
        self.stop_seconds = time.monotonic() - t0
        if left:
            raise PbsClusterError(f"PBS processes still running after stop: {left}")

    # --------------------------------------------------------------- clients
    def run(
        self, args: Sequence[str], *, check: bool = False, timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command with :attr:`env`, capturing text output."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("env", self.env)
        return subprocess.run(list(args), text=True, check=check, timeout=timeout, **kwargs)

    def qmgr(self, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``qmgr -c <command>`` for each command, in one qmgr process."""
        res = self.run(["qmgr"], input="\n".join(commands) + "\n")
        if check and (res.returncode != 0 or "qmgr obj=" in res.stderr):
            raise PbsClusterError(
                f"qmgr failed (exit {res.returncode}): {res.stdout}{res.stderr}\n"
                f"commands: {commands}"
            )
        return res

    def job(self, job_id: str) -> dict[str, Any] | None:
        """The job's attributes from ``qstat -x -f -F json <id>``, or None if unknown.

        One id per call: ``qstat -x -f -F json A B`` returns only A (openpbs issue
        2672). Numbers are numbers (``Exit_status``, ``substate``).
        """
        res = self.run(["qstat", "-x", "-f", "-F", "json", str(job_id)])
        if res.returncode != 0:
            return None
        jobs = json.loads(res.stdout).get("Jobs") or {}
        return next(iter(jobs.values()), None)

    def wait_job(
        self,
        job_id: str,
        timeout: float = 60.0,
        states: Iterable[str] = ("F",),
        poll: float = 0.5,
    ) -> dict[str, Any]:
        """Poll until the job's ``job_state`` is in ``states`` (default F); return it."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, Any] | None = None
        while True:
            info = self.job(job_id)
            if info is not None and info.get("job_state") in wanted:
                return info
            if time.monotonic() > deadline:
                state = None if info is None else info.get("job_state")
                raise TimeoutError(
                    f"job {job_id} not in {sorted(wanted)} after {timeout}s (state {state}; "
                    f"comment {None if info is None else info.get('comment')})\n" + self.logs(20)
                )
            time.sleep(poll)

    def jobs_in_queue(self, queue: str | None = None) -> list[str]:
        """Ids of the jobs not finished (not F), of one queue or all (``qselect``)."""
        args = ["qselect"] + (["-q", queue] if queue else [])
        res = self.run(args)
        if res.returncode != 0:
            raise PbsClusterError(f"qselect failed: {res.stderr}")
        return res.stdout.split()

    def delete_all_jobs(self, *, history: bool = False, timeout: float = 30.0) -> None:
        """``qdel -W force`` every unfinished job and wait until none is left
        (``history``: also purge finished ones). Then removes a pyenv lock that a
        killed job shell left behind (see :func:`clear_stale_pyenv_lock`)."""
        ids = self.run(["qselect", "-x"] if history else ["qselect"]).stdout.split()
        if ids:
            self.run(["qdel", "-W", "force", *(["-x"] if history else []), *ids], timeout=60)
            deadline = time.monotonic() + timeout
            while self.jobs_in_queue():
                if time.monotonic() > deadline:
                    raise self._fail(f"jobs left after qdel -W force: {self.jobs_in_queue()}")
                time.sleep(0.2)
            _wait_gone([p for p, what in pbs_processes().items() if what.startswith("job")], 5)
        clear_stale_pyenv_lock()

    def add_queue(self, name: str, **attrs: str | int) -> None:
        """Create (or update) an enabled, started execution queue.

        Attribute names with dots are passed with ``__``:
        ``add_queue("short", resources_max__walltime="00:00:30")``.
        """
        want = {key.replace("__", "."): str(value) for key, value in attrs.items()}
        exists = self.run(["qstat", "-Q", name]).returncode == 0
        cmds = [] if exists else [f"create queue {name} queue_type=execution"]
        cmds += [f'set queue {name} {key} = "{value}"' for key, value in want.items()]
        cmds += [f"set queue {name} enabled = True", f"set queue {name} started = True"]
        self.qmgr(*cmds)

    def nodes(self) -> dict[str, dict[str, Any]]:
        """``pbsnodes -a -F json``: {host: attributes}."""
        res = self.run(["pbsnodes", "-a", "-F", "json"])
        if res.returncode != 0:
            return {}
        return json.loads(res.stdout).get("nodes") or {}

    def lose_host(self, host: str) -> list[int]:
        """The host dies, as far as PBS and its jobs can tell: its ``pbs_mom`` and every
        process under it (the job's tasks there, and what they started, also in
        sessions of their own) are SIGKILLed at once. Returns their pids."""
        mom = int((self.mom_home(host) / "mom_priv" / "mom.lock").read_text())
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (ppid := _ppid(int(entry))):
                children.setdefault(ppid, []).append(int(entry))
        tree, todo = [], [mom]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        for pid in tree:  # stopped first: none of them reacts to another's end
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        _signal_all(tree, signal.SIGKILL)
        _wait_gone(tree, 10.0)
        return tree

    def start_mom(self, host: str) -> None:
        """Start the ``pbs_mom`` of ``host`` again (after `lose_host`) and wait until
        PBS lists the host ``free`` (none of its jobs runs there any more)."""
        index = self.hosts.index(host) + 1
        conf = self._write_mom_home(index, host)
        env = {**self.env, "PBS_CONF_FILE": str(conf)}
        env.pop("PBS_SERVER", None)
        rc = _run_logged([str(PBS_EXEC / "sbin" / "pbs_mom")], STATE_DIR / "start.log", 60, env)
        if rc != 0:
            raise self._fail(f"pbs_mom for {host} failed to start again (exit {rc})")
        deadline = time.monotonic() + self.start_timeout
        while (state := str(self.nodes().get(host, {}).get("state"))) != "free":
            if time.monotonic() > deadline:
                raise self._fail(f"{host} is {state!r}, not free, {self.start_timeout}s after")
            time.sleep(0.2)

    def logs(self, tail: int = 40) -> str:
        """The last lines of today's server, scheduler, comm and mom logs."""
        dirs = [PBS_HOME / d for d in ("server_logs", "sched_logs", "comm_logs")]
        dirs += [self.mom_home(h) / "mom_logs" for h in self.hosts]
        chunks = []
        for folder in dirs:
            files = sorted(folder.glob("*")) if folder.is_dir() else []
            if files:
                lines = files[-1].read_text(errors="replace").splitlines()[-tail:]
                chunks.append(f"--- {files[-1]} ---\n" + "\n".join(lines))
        for name in ("start.log", "stop.log", "watchdog.log"):
            path = STATE_DIR / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                chunks.append(f"--- {path} ---\n" + "\n".join(lines))
        return "\n".join(chunks) or "(no PBS logs)"

    # -------------------------------------------------------------- internal
    def _fail(self, message: str) -> PbsClusterError:
        return PbsClusterError(f"{message}\n{self.logs()}")

    def _lock(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(STATE_DIR / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise PbsClusterError(
                        f"another PBS test cluster holds {STATE_DIR / 'lock'} "
                        f"for more than {self.lock_timeout}s"
                    ) from None
                if not told:
                    print(
                        f"pbs_cluster: waiting for another session's PBS cluster "
                        f"({STATE_DIR / 'lock'})",
                        file=sys.stderr,
                        flush=True,
                    )
                    told = True
                time.sleep(1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _release_watchdog(self) -> None:
        if self._watchdog_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._watchdog_fd, b"stopped\n")
            os.close(self._watchdog_fd)
            self._watchdog_fd = None
        if self._watchdog is not None:
            try:
                self._watchdog.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait(timeout=5)
            self._watchdog = None

    def _add_hosts(self) -> None:
        """Append ``127.0.0.10 pbs-head``, ``127.0.0.1N nodeN`` to /etc/hosts if missing."""
        wanted = {SERVER_HOST: host_address(0)}
        wanted.update({h: host_address(i) for i, h in enumerate(self.hosts, 1)})
        text = HOSTS_FILE.read_text() if HOSTS_FILE.exists() else ""
        known: dict[str, str] = {}
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            for name in words[1:]:
                known.setdefault(name, words[0])
        missing = []
        for name, addr in wanted.items():
            if name not in known:
                missing.append(f"{addr} {name}")
            elif known[name] != addr:
                raise PbsClusterError(
                    f"{HOSTS_FILE} maps {name} to {known[name]}, the test cluster needs {addr}"
                )
        if missing:
            # Append in place (not replace): /etc/hosts may be a bind mount.
            with open(HOSTS_FILE, "a") as fh:
                if text and not text.endswith("\n"):
                    fh.write("\n")
                fh.write("# OpenPBS test cluster (tests/pbs_cluster.py)\n")
                fh.write("\n".join(missing) + "\n")

    def _write_server_conf(self) -> None:
        PBS_CONF.write_text(
            "\n".join(
                [
                    f"PBS_EXEC={PBS_EXEC}",
                    f"PBS_HOME={PBS_HOME}",
                    f"PBS_SERVER={SERVER_HOST}",
                    "PBS_START_SERVER=1",
                    "PBS_START_SCHED=1",
                    "PBS_START_COMM=1",
                    "PBS_START_MOM=0",
                    f"PBS_SERVER_HOST_NAME={SERVER_HOST}",
                    f"PBS_LEAF_NAME={SERVER_HOST}",
                    "PBS_CORE_LIMIT=unlimited",
                    "PBS_SCP=/usr/bin/scp",
                ]
            )
            + "\n"
        )

    def _start_server(self) -> None:
        rc = _run_logged([str(INIT_SCRIPT), "start"], STATE_DIR / "start.log", 300, self.env)
        if rc != 0:
            raise self._fail(f"pbs_init.d start failed (exit {rc})")
        deadline = time.monotonic() + self.start_timeout
        while self.run(["qstat", "-B"], timeout=30).returncode != 0:
            if time.monotonic() > deadline:
                raise self._fail("pbs_server does not answer qstat -B")
            time.sleep(0.2)

    def _write_mom_home(self, index: int, host: str) -> Path:
        home = self.mom_home(host)
        modes = {
            "": 0o755,
            "aux": 0o755,
            "checkpoint": 0o700,
            "mom_logs": 0o755,
            "spool": 0o1777,
            "undelivered": 0o1777,
            "mom_priv": 0o751,
            "mom_priv/jobs": 0o751,
            "mom_priv/hooks": 0o750,
            "mom_priv/hooks/tmp": 0o750,
        }
        for sub, mode in modes.items():
            path = home / sub
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(mode)
        env_file = home / "pbs_environment"
        main_env = PBS_HOME / "pbs_environment"
        env_file.write_text(main_env.read_text() if main_env.exists() else "PATH=/bin:/usr/bin\n")
        env_file.chmod(0o644)
        config = home / "mom_priv" / "config"
        config.write_text(
            f"$clienthost {SERVER_HOST}\n$usecp *:/ /\n$min_check_poll 1\n$max_check_poll 2\n"
            f"$max_poll_downtime {MAX_POLL_DOWNTIME}\n"
        )
        config.chmod(0o644)
        conf = home / "pbs.conf"
        conf.write_text(
            "\n".join(
                [
                    f"PBS_EXEC={PBS_EXEC}",
                    f"PBS_HOME={home}",
                    f"PBS_SERVER={SERVER_HOST}",
                    "PBS_START_SERVER=0",
                    "PBS_START_SCHED=0",
                    "PBS_START_COMM=0",
                    "PBS_START_MOM=1",
                    f"PBS_LEAF_NAME={host}",
                    f"PBS_MOM_NODE_NAME={host}",
                    f"PBS_MOM_SERVICE_PORT={mom_port(index)}",
                    f"PBS_MANAGER_SERVICE_PORT={mom_port(index) + 1}",
                    "PBS_CORE_LIMIT=unlimited",
                    "PBS_SCP=/usr/bin/scp",
                ]
            )
            + "\n"
        )
        return conf

    def _start_moms(self) -> None:
        for index, host in enumerate(self.hosts, 1):
            conf = self._write_mom_home(index, host)
            env = {**self.env, "PBS_CONF_FILE": str(conf)}
            env.pop("PBS_SERVER", None)
            rc = _run_logged([str(PBS_EXEC / "sbin" / "pbs_mom")], STATE_DIR / "start.log", 60, env)
            if rc != 0:
                raise self._fail(f"pbs_mom for {host} failed to start (exit {rc})")

    def _configure(self) -> None:
        # Jobs of earlier sessions (running, queued, finished) go first: a queue
        # with jobs cannot be deleted, and history would confuse jobs_in_queue.
        self.delete_all_jobs(history=True)
        cmds = [f"set server {key} = {value}" for key, value in SERVER_ATTRIBUTES.items()]
        if self.run(["qmgr", "-c", "list resource filesystems"]).returncode != 0:
            cmds.append("create resource filesystems type=string")
        existing = self.nodes()
        for index, host in enumerate(self.hosts, 1):
            if host not in existing:
                cmds.append(f"create node {host} Mom={host},port={mom_port(index)}")
        res = self.run(["qstat", "-Q", "-f", "-F", "json"])
        queues = set((json.loads(res.stdout).get("Queue") or {}) if res.returncode == 0 else ())
        # Recreate the queues: attributes a test added do not outlive its session.
        for name in sorted(queues - {"workq"}):
            cmds.append(f"delete queue {name}")
        self.qmgr(*cmds)
        for name, attrs in self.queues.items():
            self.add_queue(name, **{k.replace(".", "__"): v for k, v in attrs.items()})

    def _wait_free(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        states: dict[str, str] = {}
        while True:
            nodes = self.nodes()
            states = {h: str(nodes.get(h, {}).get("state")) for h in self.hosts}
            if all(state == "free" for state in states.values()):
                return
            if time.monotonic() > deadline:
                raise self._fail(f"hosts not free after {self.start_timeout}s: {states}")
            time.sleep(0.2)


def _main(argv: list[str]) -> int:
    if argv[:2] == ["--watchdog", "--"] and len(argv) > 2:
        return _watchdog_main(argv[2:])
    if argv == ["--shutdown"]:
        left = shutdown_pbs()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} shutdown: {'still running: ' + str(left) if left else 'done'}")
        return 1 if left else 0
    print("usage: pbs_cluster.py --shutdown | --watchdog -- COMMAND...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
