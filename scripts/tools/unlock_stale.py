"""Remove Snakemake's lock of this folder when no Snakemake of this folder is alive.

A Snakemake killed by SIGKILL, the OOM killer or a lost login session leaves its lock
in `.snakemake/locks/`, and the next run refuses to start until `--unlock`. That is
safe exactly when no Snakemake works in this folder any more: `make run` calls this
first, so a killed run goes on with the next `make run` (profiles/local reruns
incomplete ranks by itself).

    python scripts/tools/unlock_stale.py PROFILE SNAKEMAKE [ARG...]
        (the command that runs Snakemake)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def snakemakes_in(folder: Path) -> list[int]:
    """Live processes (other than this one) whose command runs Snakemake in ``folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = (entry / "cwd").resolve()
        except OSError:  # gone, or not ours to read
            continue
        if cwd == folder and any(b"snakemake" in a for a in argv):
            found.append(int(entry.name))
    return found


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    profile, snakemake = argv[0], argv[1:]
    folder = Path.cwd().resolve()
    locks = Path(".snakemake", "locks")
    if not (locks.is_dir() and any(locks.iterdir())):
        return 0
    alive = snakemakes_in(folder)
    if alive:
        print(
            f"Snakemake is still running in {folder} (pid {', '.join(map(str, alive))}): "
            "wait for it or stop it; the folder stays locked.",
            file=sys.stderr,
        )
        return 1
    print(f"No Snakemake is alive in {folder}: removing a killed run's lock", file=sys.stderr)
    return subprocess.run([*snakemake, "--profile", profile, "--unlock", "--quiet"]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
