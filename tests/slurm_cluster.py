"""A real, throw-away Slurm cluster on loopback that speaks PBS commands, for tests.

Debian 12 packages no PBS Pro/Torque, but Slurm 22.05 with its PBS/Torque command
wrappers (``qsub``/``qstat``/``qdel`` from ``slurm-wlm-torque``). This module starts
one ``slurmctld`` and one ``slurmd -N nodeK`` per node on 127.0.0.1, everything
(config, state, spool, pid, log files) under one folder, and stops them again.
Install the packages with ``scripts/install-test-scheduler.sh``; run as root.

Usage::

    with SlurmCluster() as cluster:
        subprocess.run(["qsub", "-q", "debug", "-l", "select=2,walltime=00:05:00",
                        "job.sh"], env=cluster.env, ...)

Every client (``qsub``, ``qstat``, ``qdel``, ``sbatch``, ``scontrol``, ``squeue``,
``srun`` ...) must run with ``env=cluster.env``: it points ``SLURM_CONF`` at this
cluster's ``slurm.conf`` (jobs inherit it, so ``srun`` inside a job works too).

What jobs see (PBS Pro look-alike): ``PBS_JOBID``, ``PBS_O_WORKDIR``, ``PBS_JOBNAME``
... from Slurm's ``spank_pbs`` plugin, and ``PBS_NODEFILE`` (one line per allocated
host) from a ``TaskProlog``; it reaches the batch script and every ``srun`` step.
Partitions mimic Aurora's queues scaled to the node count; see ``DEFAULT_PARTITIONS``.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

# Folder under which clusters live by default; each cluster gets its own sub-folder
# so a later run can find and reap the daemons of a crashed one (and only those).
DEFAULT_PARENT = Path(tempfile.gettempdir()) / "slurm-test-clusters"

# Aurora queues, scaled to a 4-node test cluster. "{n}" is replaced by the node count.
# Aurora: debug 1-2 nodes <=1 h; debug-scaling 2-256 nodes <=1 h; capacity 1-16 nodes
# <=7 days; prod (routing queue for big jobs). MaxTime is in minutes or D-HH:MM:SS.
DEFAULT_PARTITIONS: dict[str, str] = {
    "debug": "MinNodes=1 MaxNodes=2 MaxTime=60",
    "debug-scaling": "MinNodes=2 MaxNodes={n} MaxTime=60",
    "capacity": "MinNodes=1 MaxNodes={n} MaxTime=7-00:00:00",
    "prod": "MinNodes=1 MaxNodes={n} MaxTime=1-00:00:00 Default=YES",
}

# Job states after which a job will not change any more.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)

_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_PR_SET_PDEATHSIG = 1


class SlurmClusterError(RuntimeError):
    """The cluster could not be started (message includes the daemon logs)."""


def find_spank_pbs() -> Path:
    """Path of Slurm's PBS SPANK plugin (sets PBS_* variables in jobs)."""
    patterns = (
        "/usr/lib/*/slurm-wlm/spank_pbs.so",
        "/usr/lib/slurm-wlm/spank_pbs.so",
        "/usr/lib*/slurm/spank_pbs.so",
        "/usr/local/lib*/slurm/spank_pbs.so",
    )
    for pattern in patterns:
        hits = sorted(glob.glob(pattern))
        if hits:
            return Path(hits[0])
    raise SlurmClusterError("spank_pbs.so not found: is slurmd installed?")


def which(name: str) -> str | None:
    """Like shutil.which, but also looks in the sbin folders (daemons live there)."""
    path = os.environ.get("PATH", os.defpath)
    return shutil.which(name, path=os.pathsep.join([path, *_SBIN_DIRS]))


def parse_scontrol_record(line: str) -> dict[str, str]:
    """Split one ``scontrol show ... -o`` line into {key: value} (simple, for tests).

    Values with spaces (rare: a Command or WorkDir with spaces) are kept whole as
    long as the following text does not look like ``Key=``.
    """
    fields: dict[str, str] = {}
    for match in re.finditer(
        r"(?:^|\s)([A-Za-z][\w/:.]*)=(.*?)(?=\s+[A-Za-z][\w/:.]*=|\s*$)", line
    ):
        fields[match.group(1)] = match.group(2)
    return fields


def _free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that are free on ``host`` right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _proc_start_time(pid: int) -> str | None:
    """Start time (clock ticks since boot) of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses.
    return stat.rsplit(")", 1)[1].split()[19]


def _read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


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
    pids = set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        stat = _read_proc(pid, "stat")
        if not stat:
            break
        pid = int(stat.rsplit(b")", 1)[1].split()[1])
    return pids


def _pids_using_conf(conf: Path) -> list[int]:
    """Processes whose environment has ``SLURM_CONF=<conf>``: this cluster's
    slurmstepd processes, job scripts and steps (their env comes from the daemons
    and the submitter, both started with our SLURM_CONF)."""
    needle = b"SLURM_CONF=" + os.fsencode(str(conf))
    skip = _own_lineage()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        if needle in _read_proc(int(entry), "environ").split(b"\0"):
            found.append(int(entry))
    return found


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until the processes are gone; return those still alive."""
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [pid for pid in pending if _alive(pid)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return pending


def _reap_folder(root: Path) -> None:
    """Kill daemons and job processes left by a cluster whose folder is ``root``.

    Only processes whose command line names this folder's slurm.conf (daemons,
    from our pid file) or whose environment has SLURM_CONF=<this conf> are touched.
    """
    conf = root / "slurm.conf"
    victims: list[int] = []
    pid_file = root / "daemons.pids"
    if pid_file.exists():
        for word in pid_file.read_text().split():
            with contextlib.suppress(ValueError):
                pid = int(word)
                if os.fsencode(str(conf)) in _read_proc(pid, "cmdline"):
                    victims.append(pid)
    victims.extend(_pids_using_conf(conf))
    if victims:
        _signal_all(victims, signal.SIGTERM)
        _signal_all(_wait_gone(victims, 3.0), signal.SIGKILL)
        _wait_gone(victims, 2.0)


def reap_stale_clusters(parent: Path = DEFAULT_PARENT) -> list[Path]:
    """Stop leftovers of crashed clusters under ``parent`` whose owner is dead.

    A cluster folder records its owner process (pid and start time); if that
    process no longer exists, its daemons are killed and the folder is removed.
    Returns the folders removed.
    """
    removed = []
    if not parent.is_dir():
        return removed
    for root in sorted(parent.iterdir()):
        owner_file = root / "owner"
        if not root.is_dir():
            continue
        try:
            pid_text, start = owner_file.read_text().split()
            owner_alive = _proc_start_time(int(pid_text)) == start
        except (OSError, ValueError):
            # No (complete) owner file: only reap if it is older than a minute,
            # so a cluster being created right now by someone else is left alone.
            owner_alive = time.time() - root.stat().st_mtime < 60
        if owner_alive:
            continue
        _reap_folder(root)
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    return removed


class SlurmCluster:
    """A Slurm cluster of ``nodes`` nodes (node1..nodeN) on 127.0.0.1.

    Args:
        root: folder for ALL files of this cluster (slurm.conf, state, spool, pid,
            logs, node files, jobcomp file). Default: a new folder under ``parent``.
            It is removed by :meth:`stop` (unless ``keep=True``). If it holds the
            pid files of a crashed earlier cluster, those daemons are killed first.
        nodes: number of nodes, named ``node1``..``nodeN``.
        cpus_per_node: CPUs declared per node (more than the machine has is fine:
            ``SlurmdParameters=config_overrides``). 24 lets a job ask for 12 tasks
            per node and leaves room; ``srun --overlap`` steps share CPUs anyway.
        real_memory_mb: memory declared per node (not enforced: CR_Core).
        partitions: {name: "Key=Value ..."} partition options; ``{n}`` is the node
            count. Default: ``DEFAULT_PARTITIONS`` (debug, debug-scaling, capacity,
            prod). All get ``Nodes=ALL OverSubscribe=YES State=UP``.
        kill_wait: seconds between SIGTERM and SIGKILL when a job is killed
            (walltime, qdel).
        first_job_id: first job id handed out (ids look less like exit codes).
        start_timeout: seconds to wait for all nodes to be idle.
        parent: where default ``root`` folders are created; stale clusters of dead
            owners under it are reaped by :meth:`start`.
        keep: keep ``root`` after :meth:`stop` (for debugging).
        die_with_parent: daemons get SIGTERM if the thread that started them exits
            (so a killed pytest leaves no controller/node daemons behind).

    Attributes (valid after construction; the files exist after :meth:`start`):
        root, conf_path, env, jobcomp_path, node_names, partitions, log_dir,
        nodefile_dir, controller_port, node_ports.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        nodes: int = 4,
        cpus_per_node: int = 24,
        real_memory_mb: int = 4096,
        partitions: Mapping[str, str] | None = None,
        kill_wait: int = 2,
        first_job_id: int = 1000,
        start_timeout: float = 60.0,
        parent: str | os.PathLike[str] = DEFAULT_PARENT,
        keep: bool = False,
        die_with_parent: bool = True,
    ) -> None:
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.parent = Path(parent)
        self._given_root = Path(root).resolve() if root is not None else None
        self.root = self._given_root or self.parent / "not-started"
        self.node_names = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        parts = DEFAULT_PARTITIONS if partitions is None else partitions
        self.partitions = {name: opts.format(n=nodes) for name, opts in parts.items()}
        self.kill_wait = kill_wait
        self.first_job_id = first_job_id
        self.start_timeout = start_timeout
        self.keep = keep
        self.die_with_parent = die_with_parent
        self.controller_port: int | None = None
        self.node_ports: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._started = False

    # ----------------------------------------------------------------- paths
    @property
    def conf_path(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def jobcomp_path(self) -> Path:
        """``jobcomp/filetxt`` file: one line per finished job (kept after purge)."""
        return self.root / "jobcomp.txt"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def nodefile_dir(self) -> Path:
        """Where the TaskProlog writes ``PBS_NODEFILE`` files (one per job id)."""
        return self.root / "nodefiles"

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (and the jobs they submit).

        A copy of ``os.environ`` with ``SLURM_CONF`` pointing at this cluster, the
        sbin folders on PATH, and any inherited ``SLURM_*``/``PBS_*`` job variables
        removed (tests run inside a real job would otherwise talk to that job).
        """
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("SLURM_", "SLURMD_", "PBS_", "SBATCH_", "SRUN_", "SALLOC_"))
        }
        env["SLURM_CONF"] = str(self.conf_path)
        path = env.get("PATH", os.defpath).split(os.pathsep)
        env["PATH"] = os.pathsep.join(path + [d for d in _SBIN_DIRS if d not in path])
        return env

    @property
    def running(self) -> bool:
        return self._started

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> SlurmCluster:
        """Write the config, start the daemons, wait until every node is idle.

        On failure everything started is stopped again and SlurmClusterError is
        raised with the daemon logs.
        """
        if self._started:
            return self
        for name in ("slurmctld", "slurmd", "sinfo", "scontrol", "qsub"):
            if which(name) is None:
                raise SlurmClusterError(
                    f"{name} not found: run scripts/install-test-scheduler.sh (as root)"
                )
        reap_stale_clusters(self.parent)
        if self._given_root is not None:
            self.root = self._given_root
            _reap_folder(self.root)  # leftovers of a crashed cluster in this folder
            shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True)
        else:
            self.parent.mkdir(parents=True, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.parent))
        try:
            self._started = True
            self._write_files()
            self._spawn_daemons()
            self._wait_idle()
            self._check_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons (TERM, then KILL), remove the folder."""
        if not self._started:
            return
        try:
            if self._procs.get("slurmctld") is not None and self._procs["slurmctld"].poll() is None:
                self._cancel_all_jobs()
            procs = list(self._procs.values())
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + 5
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            # Job scripts and slurmstepd processes outlive slurmd: sweep by SLURM_CONF.
            _reap_folder(self.root)
        finally:
            self._procs.clear()
            self._started = False
            if not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)

    # --------------------------------------------------------------- clients
    def run(
        self, args: Sequence[str], *, check: bool = False, timeout: float = 60, **kwargs
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command against this cluster, capturing text output."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run(
            list(args), env=self.env, text=True, check=check, timeout=timeout, **kwargs
        )

    def show_job(self, job_id: str | int) -> dict[str, str] | None:
        """``scontrol show job -o <id>`` as a dict, or None if unknown/purged."""
        res = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        if res.returncode != 0 or not res.stdout.strip():
            return None
        return parse_scontrol_record(res.stdout.strip().splitlines()[0])

    def wait_job(
        self,
        job_id: str | int,
        states: Iterable[str] = TERMINAL_STATES,
        timeout: float = 60,
        poll: float = 0.25,
    ) -> dict[str, str]:
        """Poll until the job's JobState is one of ``states``; return its record."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] | None = None
        while True:
            info = self.show_job(job_id)
            if info is not None and info.get("JobState") in wanted:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout}s: {info}")
            time.sleep(poll)

    def jobcomp_records(self) -> list[dict[str, str]]:
        """The jobcomp file parsed, one dict per finished job."""
        if not self.jobcomp_path.exists():
            return []
        lines = self.jobcomp_path.read_text().splitlines()
        return [parse_scontrol_record(line) for line in lines if line.strip()]

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log, for error messages."""
        chunks = []
        for path in sorted(self.log_dir.glob("*")):
            with contextlib.suppress(OSError):
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                chunks.append(f"--- {path} ---\n" + "\n".join(lines))
        return "\n".join(chunks) or "(no daemon logs)"

    # -------------------------------------------------------------- internal
    def _write_files(self) -> None:
        root = self.root
        (root / "owner").write_text(f"{os.getpid()} {_proc_start_time(os.getpid())}\n")
        for sub in ("state", "log", "nodefiles", *(f"spool/{n}" for n in self.node_names)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        ports = _free_ports(1 + len(self.node_names))
        self.controller_port = ports[0]
        self.node_ports = dict(zip(self.node_names, ports[1:], strict=True))

        (root / "plugstack.conf").write_text(f"required {find_spank_pbs()}\n")

        # TaskProlog: runs before every task, including the batch script; lines
        # "export NAME=value" on its stdout go into the task's environment.
        scontrol = which("scontrol")
        task_prolog = root / "task_prolog.sh"
        task_prolog.write_text(
            "#!/bin/sh\n"
            "# PBS_NODEFILE: one line per allocated host, like PBS Pro with select=N.\n"
            f"SLURM_CONF={shlex.quote(str(self.conf_path))}; export SLURM_CONF\n"
            f'f={shlex.quote(str(self.nodefile_dir))}/"$SLURM_JOB_ID"\n'
            'if [ ! -s "$f" ]; then\n'
            f'    {shlex.quote(scontrol)} show hostnames "$SLURM_JOB_NODELIST" > "$f.$$" '
            '&& mv -f "$f.$$" "$f"\n'
            "fi\n"
            'echo "export PBS_NODEFILE=$f"\n'
        )
        task_prolog.chmod(0o755)

        lines = [
            "# Generated by tests/slurm_cluster.py: a throw-away test cluster on loopback.",
            "ClusterName=testcluster",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.controller_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp_path}",
            "MinJobAge=86400",
            f"KillWait={self.kill_wait}",
            "EnforcePartLimits=ALL",
            f"FirstJobId={self.first_job_id}",
            "ReturnToService=2",
            "MailProg=/bin/true",
            f"PlugStackConfig={root / 'plugstack.conf'}",
            f"TaskProlog={task_prolog}",
        ]
        for name in self.node_names:
            lines.append(
                f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 "
                f"Port={self.node_ports[name]} CPUs={self.cpus_per_node} "
                f"RealMemory={self.real_memory_mb} State=UNKNOWN"
            )
        for name, opts in self.partitions.items():
            lines.append(f"PartitionName={name} Nodes=ALL OverSubscribe=YES State=UP {opts}")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _popen(self, name: str, args: list[str]) -> None:
        out = open(self.log_dir / f"{name}.out", "wb")  # noqa: SIM115 - child owns it
        die_with_parent = self.die_with_parent

        def preexec() -> None:
            os.setsid()  # own session: terminal signals to pytest do not reach it
            if die_with_parent:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

        try:
            proc = subprocess.Popen(
                args,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                preexec_fn=preexec,
            )
        finally:
            out.close()
        self._procs[name] = proc
        with open(self.root / "daemons.pids", "a") as fh:
            fh.write(f"{proc.pid}\n")

    def _spawn_daemons(self) -> None:
        conf = str(self.conf_path)
        self._popen("slurmctld", [which("slurmctld") or "slurmctld", "-D", "-f", conf])
        slurmd = which("slurmd") or "slurmd"
        for name in self.node_names:
            self._popen(f"slurmd-{name}", [slurmd, "-D", "-N", name, "-f", conf])

    def _dead_daemons(self) -> list[str]:
        return [
            f"{name} (exit {proc.returncode})"
            for name, proc in self._procs.items()
            if proc.poll() is not None
        ]

    def _fail(self, message: str) -> SlurmClusterError:
        return SlurmClusterError(f"{message}\nconfig: {self.conf_path}\n{self.logs()}")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        states: dict[str, str] = {}
        while True:
            dead = self._dead_daemons()
            if dead:
                raise self._fail(f"Slurm daemon(s) exited during start: {', '.join(dead)}")
            res = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=30)
            if res.returncode == 0:
                states = {}
                for line in res.stdout.splitlines():
                    node, _, state = line.partition(" ")
                    states[node] = state.strip()
                if all(states.get(n) == "idle" for n in self.node_names):
                    return
            if time.monotonic() > deadline:
                raise self._fail(
                    f"nodes not idle after {self.start_timeout}s: {states or res.stderr.strip()}"
                )
            time.sleep(0.2)

    def _check_nodes(self) -> None:
        res = self.run(["scontrol", "show", "node", "-o"], timeout=30)
        for line in res.stdout.splitlines():
            info = parse_scontrol_record(line)
            if info.get("CPUTot") != str(self.cpus_per_node):
                raise self._fail(f"node has CPUTot={info.get('CPUTot')}: {line}")

    def _cancel_all_jobs(self) -> None:
        res = self.run(["squeue", "-h", "-o", "%A"], timeout=30)
        job_ids = res.stdout.split() if res.returncode == 0 else []
        if not job_ids:
            return
        self.run(["scancel", *job_ids], timeout=30)
        # Let slurmstepd kill the job processes (KillWait) before the daemons go.
        deadline = time.monotonic() + self.kill_wait + 5
        while time.monotonic() < deadline:
            res = self.run(["squeue", "-h", "-o", "%A"], timeout=30)
            if res.returncode != 0 or not res.stdout.split():
                break
            time.sleep(0.2)
