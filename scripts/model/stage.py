"""Every node of a PBS submission checked, and given its copy of the model, before any
engine starts (preflight; config weights.stage for the copy).

A broken setting found only when engines fail to become ready costs
warm.ready_timeout_s on every node (at 256 nodes, node-hours per typo). So each node
first checks what its engines will run with: the inference Python (config python,
after pbs.setup) imports vLLM of the version rule fetch_model checked the engines
against; it sees the node's tiles (torch.xpu.device_count(), where XPU is present;
skipped on a CPU); and the staging folder has room for the model with a margin. A
failed check ends the submission within a minute, naming node and cause in the PBS
log and in a file the main Snakemake reports from (``failure_file``).

At scale, Lustre serves one big read per node far better than one per engine: the
seed's author and Aegis copy the weights to each node's /tmp before starting
engines. One read per submission is better still: 256 nodes reading the same files
at once all hit the few Lustre servers that hold those files' stripes. So only the
first node reads the model (and vLLM's model-info cache, VLLM_CACHE_ROOT) from the
shared file system; every other node gets it from a node that already has it, as a
tar stream over TCP along a binary tree (node i from node (i-1)//2: 8 rounds for 256
nodes), as ALCF's data-movement guide reads once and broadcasts. A node offers its
copy on config weights.broadcast_host (Aurora: its Slingshot name) after publishing
address, port and a one-time token in a 0600 file beside the stage settings, and
passes every chunk on to its receivers as it arrives (so 8 rounds cost about one
transfer, not eight); a receiver checks every file's size against the sender's list
before it uses the copy.
The submission's jobscript (written by pbs-submit) runs

    python stage_model.py prepare <stage.json>  before the engines and ranks start
    python stage_model.py remove <stage.json>   when the job script ends (with staging)

Each runs ONE launcher call (config node_launcher, e.g. PALS ``mpiexec -n {nodes}
--ppn 1`` or PBS's ``pbsdsh --``) that starts one process per node, which checks and
copies to (or removes) ``<stage_dir>/model-<job id>/<host>/<model folder name>``; the host
name is that node's line in PBS_NODEFILE, so engines find the copy of their node.
The job id and the hosts are passed on the command line (PBS_NODEFILE lies on the
first node only, and a launcher need not pass the job's variables on); each node
reports its copy in a file on the shared file system, and the step fails unless
every node did. Stdlib only.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: scripts/, not this file's folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from formats import preflight_failure
from formats.files import safe_name
from formats.staged_model import staged_cache_root, staged_path
from placement import launcher, tiles


def node_hosts(environ: Mapping[str, str]) -> list[str]:
    if not environ.get("PBS_NODEFILE") or not environ.get("PBS_JOBID"):
        raise SystemExit("stage_model: PBS_NODEFILE or PBS_JOBID is not set (not in a PBS job)")
    return tiles.read_hosts(environ)


def done_file(settings_file: str, job_id: str, host: str) -> Path:
    """Where a node reports its step: next to the stage settings (shared file system)."""
    return Path(f"{settings_file}.{safe_name(job_id)}.{safe_name(host)}.done")


def this_host(hosts: Sequence[str], environ: Mapping[str, str]) -> str:
    try:
        return tiles.this_host(hosts, environ)
    except ValueError as error:
        raise SystemExit(f"stage_model: {error}") from None


# What a node's inference Python reports: its vLLM, and the XPU devices it sees.
PROBE = """
import json
found = {}
try:
    import vllm
    found["vllm"] = vllm.__version__
except Exception as error:
    found["error"] = f"import vllm failed: {type(error).__name__}: {error}"
try:
    import torch
    xpu = getattr(torch, "xpu", None)
    found["xpu_devices"] = xpu.device_count() if xpu is not None and xpu.is_available() else None
except Exception as error:
    found.setdefault("error", f"import torch failed: {type(error).__name__}: {error}")
print(json.dumps(found))
"""
PROBE_TIMEOUT_S = 300
# Room a copy needs beyond the model itself.
SPACE_MARGIN = 0.10
SPACE_MARGIN_MIN = 256 * 2**20


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def expected_devices(settings: Mapping, environ: Mapping[str, str]) -> int:
    """XPU devices a node must show: every tile (FLAT), or every card (COMPOSITE)."""
    per_node = settings["tiles"]["per_node"]
    hierarchy = tiles.resolve_hierarchy(settings["tiles"]["hierarchy"], environ)
    return per_node if hierarchy == "FLAT" else -(-per_node // 2)


def node_checks(settings: Mapping, host: str, environ: Mapping[str, str]) -> list[str]:
    """What is wrong on this node for its engines ([] if nothing); prints what it checked."""
    env = {**environ, **settings["env"]}
    try:
        probe = subprocess.run(
            [settings["python"], "-c", PROBE],
            env=env,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        found = json.loads(probe.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as error:
        return [f"the inference Python (config python {settings['python']}) did not run: {error}"]
    if found.get("error"):
        return [f"{found['error']} (config python {settings['python']}, pbs.setup)"]
    problems = []
    checked = (settings.get("versions") or {}).get("vllm")
    if checked and found["vllm"] != checked:
        problems.append(
            f"vLLM {found['vllm']} here, but rule fetch_model checked the engines against "
            f"vLLM {checked} (config python, pbs.setup)"
        )
    devices = found.get("xpu_devices")
    if devices is None:
        print(f"preflight: {host}: tile check skipped: no XPU here (torch.xpu)", flush=True)
    elif devices < (wanted := expected_devices(settings, env)):
        shown = ", ".join(
            f"{k}={env[k]}" for k in ("ZE_AFFINITY_MASK", tiles.HIERARCHY_VARIABLE) if k in env
        )
        problems.append(
            f"{devices} of {wanted} tiles visible ({shown or 'ZE_AFFINITY_MASK unset'})"
        )
    if settings.get("stage"):
        stage_dir = Path(settings["stage_dir"])
        folder = next(p for p in (stage_dir, *stage_dir.parents) if p.exists())
        free = shutil.disk_usage(folder).free
        size = settings.get("weights_bytes") or 0
        need = size + max(size * SPACE_MARGIN, SPACE_MARGIN_MIN)
        if free < need:
            problems.append(
                f"{folder} has {_size(free)} free, the model needs {_size(need)} "
                f"({_size(size)} and a margin; config weights.stage_dir)"
            )
    print(f"preflight: {host}: vLLM {found['vllm']}, XPU devices {devices}", flush=True)
    return problems


def copy_here(model: str, target: Path) -> None:
    """Copy the model folder to ``target`` (a temp name first: never a half copy)."""
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    # symlinks=False: a Hugging Face snapshot links into blobs/; copy the files.
    shutil.copytree(model, partial, symlinks=False)
    os.replace(partial, target)


# ----------------------------------------------------------------- broadcast

# How long a node waits for its source node's copy, and a sender for its receivers.
BROADCAST_TIMEOUT_S = 3600.0
POLL_S = 1.0
# How long a node waits for its receivers to connect: all nodes start together, so a
# receiver comes once its checks are done (PROBE_TIMEOUT_S at most) or not at all.
GATHER_TIMEOUT_S = PROBE_TIMEOUT_S + 120.0
CHUNK = 8 * 2**20


def tree_parent(index: int) -> int | None:
    """The node a node gets its copy from: None for the first (it reads the shared
    file system), else (index - 1) // 2."""
    return None if index == 0 else (index - 1) // 2


def tree_children(index: int, count: int) -> list[int]:
    return [c for c in (2 * index + 1, 2 * index + 2) if c < count]


def source_file(settings_file: str, job_id: str, host: str) -> Path:
    """Where ``host`` publishes the address, port and token its copy is offered on."""
    return Path(f"{settings_file}.{safe_name(job_id)}.{safe_name(host)}.source")


def broadcast_address(settings: Mapping, host: str) -> str:
    """config weights.broadcast_host for ``host``: "{host}" its PBS_NODEFILE name,
    "{short}" that name's first label (Aurora: "{short}.hsn.cm.aurora.alcf.anl.gov",
    the fast network)."""
    template = settings.get("broadcast_host") or "{host}"
    name = template.replace("{host}", host).replace("{short}", host.split(".")[0])
    return socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)[0][4][0]


def manifest(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``folder``."""
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _failed(settings_file: str, job_id: str, host: str) -> bool:
    with contextlib.suppress(OSError):
        return done_file(settings_file, job_id, host).read_text().startswith("failed")
    return False


class Offer:
    """This node's offer of its copy to its receivers: a listening socket on
    ``address`` and a one-time token, published in a 0600 file on the shared file
    system before the copy exists, so that the whole tree connects while the data
    is still on its way (each node passes every chunk on as it arrives)."""

    def __init__(self, settings_file: str, job_id: str, host: str, address: str):
        self.token = secrets.token_hex(16)
        self.server = socket.create_server((address, 0))
        self.published = source_file(settings_file, job_id, host)
        self.where = (settings_file, job_id)
        partial = self.published.with_name(f".{self.published.name}.{os.getpid()}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            port = self.server.getsockname()[1]
            out.write(json.dumps({"address": address, "port": port, "token": self.token}))
        os.replace(partial, self.published)

    def gather(self, receivers: Sequence[str], timeout: float) -> list[socket.socket]:
        """The receivers' connections, once each has connected or failed."""
        waiting, connected = set(receivers), []
        deadline = time.monotonic() + timeout
        self.server.settimeout(POLL_S)
        while waiting and time.monotonic() < deadline:
            # A receiver that failed its checks never comes.
            waiting -= {r for r in waiting if _failed(*self.where, r)}
            try:
                connection, _ = self.server.accept()
            except TimeoutError:
                continue
            connection.settimeout(10.0)  # the token line comes at once, or never
            try:
                words = _read_line(connection, limit=256)[0].decode(errors="replace").split()
            except (OSError, RuntimeError):
                connection.close()
                continue
            if len(words) != 2 or not hmac.compare_digest(words[0], self.token):
                connection.close()
                continue
            if words[1] in waiting:
                waiting.discard(words[1])
                connection.settimeout(BROADCAST_TIMEOUT_S)
                connected.append(connection)
            else:
                connection.close()
        if waiting:
            print(f"stage_model: {', '.join(sorted(waiting))} never came for the copy",
                  file=sys.stderr, flush=True)  # fmt: skip
        return connected

    def close(self) -> None:
        self.published.unlink(missing_ok=True)
        self.server.close()


def take_offer(
    settings_file: str, job_id: str, host: str, source: str, timeout: float
) -> socket.socket:
    """A connection to ``source``'s offer (waits for it to be published)."""
    published = source_file(settings_file, job_id, source)
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            offer = json.loads(published.read_text())
            break
        if _failed(settings_file, job_id, source):
            raise RuntimeError(f"node {source}, which this node gets the model from, failed")
        if time.monotonic() > deadline:
            raise RuntimeError(f"node {source} offered no copy of the model within {timeout:.0f} s")
        time.sleep(POLL_S)
    connection = socket.create_connection((offer["address"], offer["port"]), timeout=timeout)
    connection.sendall(f"{offer['token']} {host}\n".encode())
    return connection


def _pass_on(outs: list[socket.socket], data) -> None:
    """``data`` to every receiver still there; one that fails is dropped (its own
    receivers see the stream end and fail)."""
    for out in list(outs):
        try:
            out.sendall(data)
        except OSError as error:
            print(f"stage_model: a receiver dropped out: {error}", file=sys.stderr, flush=True)
            outs.remove(out)
            out.close()


def send_copy(folder: Path, outs: list[socket.socket]) -> None:
    """This node's copy to its receivers: the file list with sizes, then the bytes."""
    files = manifest(folder)
    _pass_on(outs, (json.dumps(files) + "\n").encode())
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    for name in files:
        with open(folder / name, "rb") as source:
            while count := source.readinto(buffer):
                _pass_on(outs, view[:count])


def _read_line(connection: socket.socket, limit: int = 2**24) -> tuple[bytes, bytes]:
    data = b""
    while b"\n" not in data:
        more = connection.recv(65536)
        if not more or len(data) > limit:
            raise RuntimeError("the first line of the copy's stream did not arrive")
        data += more
    line, _, rest = data.partition(b"\n")
    return line, rest


def relay_copy(source: socket.socket, folder: Path, outs: list[socket.socket]) -> None:
    """Receive a copy into ``folder`` (a temp name first) and pass every chunk on to
    ``outs`` as it arrives; every file must come with the size the sender listed."""
    if folder.is_dir():
        raise RuntimeError(f"{folder} exists already")
    line, rest = _read_line(source)
    files = json.loads(line)
    _pass_on(outs, line + b"\n")
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    try:
        for name, size in files.items():
            path = (partial / name).resolve()
            if not path.is_relative_to(partial.resolve()):
                raise RuntimeError(f"refused file {name!r} of the copy")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as out:
                left = size
                while left:
                    if rest:
                        count = min(len(rest), left)
                        view[:count] = rest[:count]
                        rest = rest[count:]
                    else:
                        count = source.recv_into(view[: min(CHUNK, left)])
                        if not count:
                            raise RuntimeError(f"the copy ended within {name}")
                    out.write(view[:count])
                    _pass_on(outs, view[:count])
                    left -= count
        if rest or source.recv(1):
            raise RuntimeError("the copy has more bytes than its file list")
        got = manifest(partial)
        if got != files:
            wrong = sorted(set(got.items()) ^ set(files.items()))[:3]
            raise RuntimeError(f"the copy differs from its file list: {wrong}")
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def node_step(
    action: str, settings_file: str, job_id: str, hosts: Sequence[str], environ=os.environ
) -> int:
    """One node's part: copy the model here, or remove this node's copies."""
    settings = json.loads(Path(settings_file).read_text())
    host = this_host(hosts, environ)
    target = staged_path(settings["stage_dir"], job_id, host, settings["model"])
    started = time.monotonic()
    if action == "prepare-node":
        problems = node_checks(settings, host, environ)
        if problems:
            for problem in problems:
                print(f"preflight: node {host}: {problem}", file=sys.stderr, flush=True)
            done_file(settings_file, job_id, host).write_text(
                "failed\n" + "".join(f"node {host}: {p}\n" for p in problems)
            )
            return 1
        if not settings.get("stage"):
            done_file(settings_file, job_id, host).write_text("ok\n")
            return 0
        index = list(hosts).index(host)
        parent = tree_parent(index)
        receivers = [hosts[c] for c in tree_children(index, len(hosts))]
        offer, outs = None, []
        try:
            if receivers:  # first: the tree connects while the data is on its way
                offer = Offer(settings_file, job_id, host, broadcast_address(settings, host))
            if parent is None:  # the submission's one read of the shared file system
                copy_here(settings["model"], target)
                cache = (settings.get("env") or {}).get("VLLM_CACHE_ROOT")
                if cache and Path(cache).is_dir():
                    copy_here(cache, staged_cache_root(settings["stage_dir"], job_id, host))
                how = "read from the shared file system"
                if offer is not None:
                    outs = offer.gather(
                        receivers, settings.get("gather_timeout_s", GATHER_TIMEOUT_S)
                    )
                    send_copy(target.parent, outs)
            else:
                source = hosts[parent]
                # Connected to the source first, then the receivers: every node connects
                # as soon as its checks are done, whatever happens below it.
                with take_offer(
                    settings_file, job_id, host, source, BROADCAST_TIMEOUT_S
                ) as connection:
                    if offer is not None:
                        outs = offer.gather(
                            receivers, settings.get("gather_timeout_s", GATHER_TIMEOUT_S)
                        )
                    relay_copy(connection, target.parent, outs)
                how = f"broadcast from {source}"
        except (OSError, RuntimeError, ValueError) as error:
            problem = f"node {host}: copying the model failed: {error}"
            print(f"stage_model: {problem}", file=sys.stderr, flush=True)
            done_file(settings_file, job_id, host).write_text(f"failed\n{problem}\n")
            return 1
        finally:
            for out in outs:
                out.close()
            if offer is not None:
                offer.close()
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        print(
            f"stage_model: {host}: {size / 2**20:.1f} MiB to {target} "
            f"in {time.monotonic() - started:.1f} s ({how})",
            flush=True,
        )
    else:
        shutil.rmtree(target.parent, ignore_errors=True)
        # The job's folder, once no node's copy is left in it.
        with contextlib.suppress(OSError):
            target.parent.parent.rmdir()
        print(f"stage_model: {host}: removed {target.parent}", flush=True)
    done_file(settings_file, job_id, host).write_text(f"ok {action} {target}\n")
    return 0


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
    argv = launcher.node_launcher_argv(settings["node_launcher"], len(hosts)) + [
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
    texts = {}
    for host, report in zip(hosts, reports, strict=True):
        with contextlib.suppress(OSError):
            texts[host] = report.read_text()
        report.unlink(missing_ok=True)
    missing = [host for host in hosts if host not in texts]
    causes = [
        line
        for text in texts.values()
        if text.startswith("failed")
        for line in text.split("\n")[1:]
        if line
    ]
    if code != 0 or missing or causes:
        causes += [f"node {host}: no report (launcher exit {code})" for host in missing]
        print(
            f"stage_model: {action} failed on {len(causes)} node(s); no engine is started:\n"
            + "".join(f"  {cause}\n" for cause in causes),
            file=sys.stderr,
            flush=True,
        )
        if settings.get("failure_file") and action == "prepare":
            # what the main Snakemake reports for the submission
            preflight_failure.write_failure(settings["failure_file"], job_id, causes)
        return code or 1
    return 0


def main(argv: Sequence[str]) -> int:
    if len(argv) == 4 and argv[0] in ("prepare-node", "remove-node"):
        action, settings_file, job_id, hosts = argv
        return node_step(action, settings_file, job_id, hosts.split(","))
    if len(argv) != 2 or argv[0] not in ("prepare", "remove"):
        print("usage: stage_model.py prepare|remove <stage.json>", file=sys.stderr)
        return 2
    return run_on_every_node(*argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
