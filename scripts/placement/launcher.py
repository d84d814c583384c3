"""Launchers, rendered in one place: config `launcher` (a rank's task on its tile),
`engine_launcher` (every engine of a submission in one call) and `node_launcher` (one
process per node), each a template with known {placeholders}; and `run_placed`, which
places a rank's task on a free tile and runs it with its tile's environment."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import string
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from placement.node_layout import (
    Slot,
    compact_cpus,
    cpu_numbers,
    engine_cpu_lists,
    engines_per_node,
    reserved_core_problems,
    tile_ids,
)
from placement.tiles import (
    _acquire_fds,
    default_lock_dir,
    engine_env,
    read_hosts,
    resolve_hierarchy,
)

# What each launcher setting may name: config launcher (one per-rank engine),
# engine_launcher (all engines of a submission), node_launcher (one process per node).
LAUNCHER_PLACEHOLDERS = ("host", "cpus", "tiles")


ENGINE_LAUNCHER_PLACEHOLDERS = ("nodes", "engines", "engines_per_node", "cpu_lists")


NODE_LAUNCHER_PLACEHOLDERS = ("nodes",)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# Values of these variables are kept out of the job log (they still reach the child).
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY", re.IGNORECASE)


def _placeholders(element: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(element))
    except ValueError as error:
        raise ValueError(f"launcher element {element!r} is malformed: {error}") from error
    return [field for _, field, _, _ in parsed if field is not None]


def launcher_fields(template: Sequence[str], allowed: Sequence[str], key: str) -> set[str]:
    """The {placeholders} a launcher argument list (config ``key``) uses; an unknown or
    malformed one is a ValueError naming the key."""
    used = set()
    for element in template:
        try:
            fields = _placeholders(element)
        except ValueError as error:
            raise ValueError(f"config key {key}: {error}") from None
        unknown = [f for f in fields if f not in allowed]
        if unknown:
            raise ValueError(
                f"config key {key}: placeholder {{{unknown[0]}}} in {element!r} is unknown; "
                f"allowed: {', '.join('{' + p + '}' for p in allowed)}"
            )
        used.update(fields)
    return used


def render_launcher(template: Sequence[str], values: Mapping[str, str], key: str) -> list[str]:
    """A launcher argument list (config ``key``) with its {placeholders} filled in from
    ``values`` (checked by `launcher_fields`)."""
    launcher_fields(template, list(values), key)
    return [element.format_map(values) for element in template]


def engine_launcher_argv(spec: Mapping, hosts: Sequence[str]) -> list[str]:
    """config engine_launcher with {nodes}, {engines}, {engines_per_node}, {cpu_lists}."""
    per_node, per_job = spec["tiles"]["per_node"], spec["tiles"]["per_job"]
    per_host = engines_per_node(per_node, per_job)
    # One CPU list per engine, on its socket, reserved cores refused (slot_cpus).
    binds = spec["tiles"]["cpu_bind"]
    cpu_lists = engine_cpu_lists(per_node, per_job, binds) if binds else ""
    values = {
        "nodes": str(len(hosts)),
        "engines": str(per_host * len(hosts)),
        "engines_per_node": str(per_host),
        "cpu_lists": cpu_lists,
    }
    return render_launcher(spec["launcher"], values, "engine_launcher")


def node_launcher_argv(template: Sequence[str], nodes: int) -> list[str]:
    """config node_launcher with {nodes}: one process on each node."""
    values = dict.fromkeys(NODE_LAUNCHER_PLACEHOLDERS, str(nodes))
    return render_launcher(template, values, "node_launcher")


def launch_argv(
    template: Sequence[str],
    slot: Slot,
    cpus: Sequence[str],
    env: Mapping[str, str],
    command: Sequence[str],
) -> list[str]:
    """The argv that runs `command` on the slot's host with `env` set.

    `cpus` is config `tiles.cpu_bind` (one CPU list per tile; a multi-tile job
    gets its tiles' lists joined by commas, PALS's syntax for one rank). The variables are
    passed through `env` on the command line, since mpiexec/srun may not
    forward the caller's environment.
    """
    used = launcher_fields(template, LAUNCHER_PLACEHOLDERS, "launcher")
    if not cpus:
        if "cpus" in used:
            raise ValueError("the launcher uses {cpus} but tiles.cpu_bind is empty")
        cpu_list = ""
    elif max(slot.tiles) < len(cpus):
        if problems := reserved_core_problems(cpus):
            raise ValueError(problems[0])
        # A multi-tile engine is one rank: it gets the cores of all its tiles.
        cpu_list = compact_cpus([core for tile in slot.tiles for core in cpu_numbers(cpus[tile])])
    else:
        raise ValueError(f"tiles.cpu_bind has {len(cpus)} entries; tile {max(slot.tiles)} has none")
    values = {"host": slot.host, "cpus": cpu_list, "tiles": tile_ids(slot.tiles)}
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"environment variable name {name!r} is not valid")
        if not isinstance(value, str):
            raise ValueError(f"environment variable {name} must be a string, got {value!r}")
    if not command:
        raise ValueError("empty command")
    if "=" in command[0]:
        # `env` would take it for another variable assignment.
        raise ValueError(f"command {command[0]!r} contains '='; `env` cannot run it")
    return (
        render_launcher(template, values, "launcher")
        + ["env"]
        + [f"{name}={env[name]}" for name in sorted(env)]
        + list(command)
    )


def _loggable(argv: Sequence[str]) -> list[str]:
    shown = []
    for arg in argv:
        name, sep, _ = arg.partition("=")
        if sep and _ENV_NAME.match(name) and _SECRET_NAME.search(name):
            arg = f"{name}=<hidden>"
        shown.append(arg)
    return shown


def _extra_env(extra_env: Mapping[str, object], placement: Mapping[str, str]) -> dict[str, str]:
    overridden = sorted(set(extra_env) & set(placement))
    if overridden:
        raise ValueError(
            f"task environment may not set placement variable(s) {', '.join(overridden)}",
        )
    result = {}
    for name, value in extra_env.items():
        # YAML turns HF_HUB_OFFLINE: 1 into an int; bool would become "True".
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"task environment {name} must be a string, got {value!r}")
        result[name] = value
    return result


def default_tmp_root(environ: Mapping[str, str]) -> Path:
    """Parent of the per-engine TMPDIRs (the task creates its own directory)."""
    return Path(environ.get("TMPDIR") or "/tmp") / f"engine-tmp-{os.getuid()}"


def _wait_forwarding_signals(process: subprocess.Popen) -> int:
    if threading.current_thread() is not threading.main_thread():
        # No handlers off the main thread; a signal to the process group reaches the child.
        return process.wait()

    def forward(signum, _frame):
        if process.poll() is None:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


PR_SET_PDEATHSIG = 1


def end_with_parent() -> None:
    """In a child before it runs (Linux): SIGTERM when the thread that started it ends,
    e.g. when its Snakemake is SIGKILLed, so that a rank's task does not outlive its run
    (infer.py ends its engine's processes on SIGTERM)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run_placed(
    command: Sequence[str] | Callable[[Slot], Sequence[str]],
    *,
    log_path: Path | str,
    tiles_per_job: int,
    tiles_per_node: int,
    hierarchy_setting: str,
    base_port: int,
    cpu_bind: Sequence[str],
    launcher: Sequence[str],
    extra_env: Mapping[str, object],
    environ: Mapping[str, str] = os.environ,
    lock_dir: Path | str | None = None,
    tmp_root: Path | str | None = None,
    poll: float = 0.1,
    timeout: float | None = None,
) -> int:
    """Run `command` on a free slot of the allocation; return its exit code.

    `command` may be a function of the slot (e.g. a model copy on the slot's host).
    Output goes to `log_path` after a placement line and the argv. The child
    inherits the slot's lock descriptors, so the tiles stay taken until the
    child (and anything it forked) is gone, even if this process is killed.
    """
    hosts = read_hosts(environ)
    hierarchy = resolve_hierarchy(hierarchy_setting, environ)
    if lock_dir is None:
        lock_dir = default_lock_dir(environ)
    if tmp_root is None:
        tmp_root = default_tmp_root(environ)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with _acquire_fds(lock_dir, hosts, tiles_per_node, tiles_per_job, poll, timeout) as (
        slot,
        fds,
    ):
        env = engine_env(slot, hierarchy, base_port, tmp_root)
        env.update(_extra_env(extra_env, env))
        if callable(command):
            command = command(slot)
        argv = launch_argv(launcher, slot, cpu_bind, env, command)
        with log_path.open("ab") as log:
            log.write(
                (
                    f"placement: host={slot.host} tiles={tile_ids(slot.tiles)} "
                    f"mask={env['ZE_AFFINITY_MASK']} hierarchy={hierarchy} pid={os.getpid()}\n"
                    f"argv: {json.dumps(_loggable(argv))}\n"
                ).encode(),
            )
            log.flush()
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                pass_fds=fds,
                preexec_fn=end_with_parent,
            )
            code = _wait_forwarding_signals(process)
            log.write(f"placement: exit code {code}\n".encode())
    return code
