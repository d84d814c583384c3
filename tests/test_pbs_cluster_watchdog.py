"""The test cluster's watchdog (tests/pbs_cluster.py's spawn_watchdog), which stops the
cluster when pytest is SIGKILLed: unit tier, no cluster started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from workflow import wait_until


def test_watchdog_runs_action_only_when_owner_dies(tmp_path: Path) -> None:
    """The mechanism that stops the cluster when pytest is SIGKILLed (fake action)."""
    marker = tmp_path / "action-ran"
    owner = textwrap.dedent(
        f"""\
        import os
        import sys
        import time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from pbs_cluster import spawn_watchdog
        proc, fd = spawn_watchdog(["touch", {str(marker)!r}], Path({str(tmp_path / "wd.log")!r}))
        print(proc.pid, flush=True)
        if sys.argv[1] == "clean":
            os.write(fd, b"stopped\\n")
            os.close(fd)
            proc.wait()
        else:
            time.sleep(60)
        """
    )
    # Clean stop: the watchdog exits without running the action.
    clean = subprocess.run(
        [sys.executable, "-c", owner, "clean"], capture_output=True, text=True, timeout=30
    )
    assert clean.returncode == 0, clean.stderr
    assert not marker.exists()
    # Owner SIGKILLed: the watchdog (own session) sees EOF and runs the action.
    victim = subprocess.Popen(
        [sys.executable, "-c", owner, "kill"], stdout=subprocess.PIPE, text=True
    )
    assert victim.stdout is not None
    watchdog_pid = int(victim.stdout.readline())
    assert os.getsid(watchdog_pid) == watchdog_pid
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    assert wait_until(marker.exists, 10, poll=0.05), (tmp_path / "wd.log").read_text()
    assert "owner gone" in (tmp_path / "wd.log").read_text()
