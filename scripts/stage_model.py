"""Node-local copies of the model for one PBS submission (config weights.stage).

At scale, Lustre serves one big read per node far better than one per engine: the
seed's author and Aegis copy the weights to each node's /tmp before starting
engines. The submission's jobscript (written by pbs-submit) runs

    python stage_model.py copy <stage.json>     before the rank jobs start
    python stage_model.py remove <stage.json>   when the job script ends

Each runs ONE launcher call (config node_launcher, e.g. PALS ``mpiexec -n {nodes}
--ppn 1`` or PBS's ``pbsdsh --``) that starts one process per node, which copies
to (or removes) ``<stage_dir>/model-<job id>/<host>/<model folder name>``; the host
name is that node's line in PBS_NODEFILE, so engines find the copy of their node.
The job id and the hosts are passed on the command line (PBS_NODEFILE lies on the
first node only, and a launcher need not pass the job's variables on); each node
reports its copy in a file on the shared file system, and the step fails unless
every node did. Stdlib only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import tiles


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def staged_path(stage_dir: str, job_id: str, host: str, model: str) -> Path:
    """Where ``model`` lies on ``host`` during PBS job ``job_id``."""
    return Path(stage_dir) / f"model-{_safe(job_id)}" / _safe(host) / Path(model).name


def node_hosts(environ: Mapping[str, str]) -> list[str]:
    nodefile = environ.get("PBS_NODEFILE")
    if not nodefile or not environ.get("PBS_JOBID"):
        raise SystemExit("stage_model: PBS_NODEFILE or PBS_JOBID is not set (not in a PBS job)")
    lines = Path(nodefile).read_text().split()
    return list(dict.fromkeys(lines))


def done_file(settings_file: str, job_id: str, host: str) -> Path:
    """Where a node reports its step: next to the stage settings (shared file system)."""
    return Path(f"{settings_file}.{_safe(job_id)}.{_safe(host)}.done")


def this_host(hosts: Sequence[str], environ: Mapping[str, str]) -> str:
    try:
        return tiles.this_host(hosts, environ)
    except ValueError as error:
        raise SystemExit(f"stage_model: {error}") from None


def copy_here(model: str, target: Path) -> None:
    """Copy the model folder to ``target`` (a temp name first: never a half copy)."""
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    # symlinks=False: a Hugging Face snapshot links into blobs/; copy the files.
    shutil.copytree(model, partial, symlinks=False)
    os.replace(partial, target)


def node_step(
    action: str, settings_file: str, job_id: str, hosts: Sequence[str], environ=os.environ
) -> int:
    """One node's part: copy the model here, or remove this node's copies."""
    settings = json.loads(Path(settings_file).read_text())
    host = this_host(hosts, environ)
    target = staged_path(settings["stage_dir"], job_id, host, settings["model"])
    started = time.monotonic()
    if action == "copy-node":
        copy_here(settings["model"], target)
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        print(
            f"stage_model: {host}: {size / 2**20:.1f} MiB to {target} "
            f"in {time.monotonic() - started:.1f} s",
            flush=True,
        )
    else:
        shutil.rmtree(target.parent, ignore_errors=True)
        # The job's folder, once no node's copy is left in it.
        with contextlib.suppress(OSError):
            target.parent.parent.rmdir()
        print(f"stage_model: {host}: removed {target.parent}", flush=True)
    done_file(settings_file, job_id, host).write_text(f"{action} {target}\n")
    return 0


def launcher_argv(template: Sequence[str], nodes: int) -> list[str]:
    return [element.replace("{nodes}", str(nodes)) for element in template]


def run_on_every_node(action: str, settings_file: str, environ=os.environ) -> int:
    """One launcher call: one process per node does `node_step`."""
    settings_file = os.path.abspath(settings_file)
    settings = json.loads(Path(settings_file).read_text())
    if not settings["node_launcher"]:
        raise SystemExit(
            "stage_model: config key node_launcher is empty: weights.stage needs a launcher "
            "that starts one process per node"
        )
    hosts, job_id = node_hosts(environ), environ["PBS_JOBID"]
    argv = launcher_argv(settings["node_launcher"], len(hosts)) + [
        settings["python"],
        os.path.abspath(__file__),
        f"{action}-node",
        settings_file,
        job_id,
        ",".join(hosts),
    ]
    reports = [done_file(settings_file, job_id, host) for host in hosts]
    for report in reports:
        report.unlink(missing_ok=True)
    print(f"stage_model: {action} on {len(hosts)} node(s): {json.dumps(argv)}", flush=True)
    code = subprocess.run(argv, stdin=subprocess.DEVNULL).returncode
    # Launchers differ in passing a failed task's exit code on (pbsdsh does not).
    missing = [host for host, report in zip(hosts, reports, strict=True) if not report.exists()]
    for report in reports:
        report.unlink(missing_ok=True)
    if code != 0 or missing:
        print(
            f"stage_model: {action} failed (launcher exit {code}; no report from "
            f"{', '.join(missing) or 'none'})",
            file=sys.stderr,
            flush=True,
        )
        return code or 1
    return 0


def main(argv: Sequence[str]) -> int:
    if len(argv) == 4 and argv[0] in ("copy-node", "remove-node"):
        action, settings_file, job_id, hosts = argv
        return node_step(action, settings_file, job_id, hosts.split(","))
    if len(argv) != 2 or argv[0] not in ("copy", "remove"):
        print("usage: stage_model.py copy|remove <stage.json>", file=sys.stderr)
        return 2
    return run_on_every_node(*argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
