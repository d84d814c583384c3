"""The profile's three commands (profiles/aurora/pbs-submit, pbs-status, pbs-cancel)
and the watchdog (``python -m pbs watchdog``).

A terminal's Ctrl-C signals the whole foreground process group: the main Snakemake,
and also a status or submit command it is running. The main Snakemake handles it
(it cancels the active submissions); the commands ignore it and finish their work.
Killed halfway, a status command trips cluster-generic 1.0.9 ("cannot access local
variable 'ret'": no cancel at all) and a submit command leaves a job Snakemake never
learns of.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence

from .plan import check_settings
from .settings import PbsConfigError, load_settings
from .state import submitting
from .status import cancel, job_status, start_watchdog, watch
from .submission import SubmitError, submit


def ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _submit_detached(jobscript: str, settings: dict) -> dict:
    """Run `submit` in a child of its own session and return what it reported.

    Snakemake submits from its main thread: on Ctrl-C it waits 0.25 s for this
    command, then SIGKILLs it. The child lives on, finishes qsub and records the job
    for the watchdog, which deletes it when Snakemake is gone.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        os.setsid()
        try:
            with submitting(settings):  # the watchdog waits for it
                answer = {"id": submit(jobscript, settings)}
        except (SubmitError, PbsConfigError, OSError, ValueError) as error:
            answer = {"error": str(error)}
        except BaseException as error:  # noqa: BLE001  (report anything, then leave)
            answer = {"error": f"{type(error).__name__}: {error}"}
        try:
            with os.fdopen(write_end, "w") as out:
                out.write(json.dumps(answer))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        text = reader.read()
    os.waitpid(pid, 0)
    return json.loads(text) if text else {"error": "the submitting process died"}


def main_submit(argv: Sequence[str]) -> int:
    ignore_ctrl_c()
    if len(argv) != 1:
        print("usage: pbs-submit <jobscript>", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        check_settings(settings)
        start_watchdog(settings)
    except (PbsConfigError, OSError, ValueError) as error:
        print(f"pbs-submit: {error}", file=sys.stderr)
        return 1
    answer = _submit_detached(argv[0], settings)
    if "error" in answer:
        # stderr reaches the user's terminal (Snakemake 9.27.1 does not show the stdout
        # of a failed submission for group jobs); qsub refusals also go to the PBS log.
        print(f"pbs-submit: {answer['error']}", file=sys.stderr)
        return 1
    print(answer["id"])
    return 0


def main_status(argv: Sequence[str]) -> int:
    ignore_ctrl_c()
    if len(argv) != 1:
        print("usage: pbs-status <jobid>", file=sys.stderr)
        return 2
    print(job_status(argv[0], load_settings()))
    return 0


def main_cancel(argv: Sequence[str]) -> int:
    ignore_ctrl_c()
    if argv:
        cancel(list(argv), load_settings())
    return 0


def main_watchdog(argv: Sequence[str] = ()) -> int:
    ignore_ctrl_c()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    deleted = watch(load_settings())
    if deleted:
        print(f"pbs watchdog: deleted {' '.join(deleted)}", file=sys.stderr)
    return 0
