"""One rank of the inference test: read a rank file, generate, write the results.

This is the seed's simple_test.py made robust. It knows nothing of PBS, Snakemake
or tiles: whoever starts it sets the device environment (ZE_AFFINITY_MASK, ...)
and passes everything else on the command line:

    python scripts/rank/task.py --rank 0 --prompts data/0.in --output results/0.out \\
        --record results/records/0.json --settings '{"engine": "vllm", ...}' \\
        [--log logs/infer/0.log]

A rank job of the workflow passes the run's settings file instead (formats/settings.py,
written once per run) and the model folder this rank loads (a node's copy, when
staged): ``--settings-file .snakemake/settings/<digest>.json --model /path/to/model``.

A rank file is a ``.in`` (one prompt a line) or a ``.jsonl`` of requests
(scripts/rank/jsonl.py: prompts or chat messages, per-request sampling, OpenAI batch
lines). Each answer is kept in ``results/.partial/`` (scripts/formats/partial.py) as it
finishes, so a rank stopped mid-way and run again generates only the rest.

Launchers may start it in another folder ($HOME under pbs_tmrsh): give absolute paths.

Settings (JSON object; missing keys take the defaults below, unknown keys are an
error):
    engine                 "vllm" runs the model; "echo" returns each prompt as its
                           generated text (never imports vllm or torch)
    model                  hub id or local folder
    dtype                  vLLM dtype ("auto", "bfloat16", ...)
    max_model_len          int or null (null: the model's own limit)
    enforce_eager          bool
    cpu_kv_cache_gib       number or null: sets VLLM_CPU_KVCACHE_SPACE (GiB) before
                           vllm is imported, unless the environment already sets it
    gpu_memory_utilization number in (0, 1]
    long_prompts           "error" or "truncate" (see check_prompt_lengths)
    chat_template          a chat template file for models without one, or null
    sampling               {temperature, top_p, max_tokens, seed, ignore_eos}

Outputs, both written atomically, the record first and the .out last (so an
existing .out means the rank is complete):
    --record   the rank record (its fields: scripts/formats/record.py)
    --output   .in: one seed record per prompt, in input order:
               Prompt: '...', Generated text: '...'<blank line>
               .jsonl: one answer line per request, in input order

Exit status: 0 success; 2 an expected error (bad settings, unreadable prompt file,
prompt too long with long_prompts "error"), reported as one "ERROR: ..." line on
stderr and nothing written; anything else is a bug and shows a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: scripts/, not this file's folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from formats.partial import resume
from formats.settings import read_settings
from rank.answer_files import finish_rank
from rank.checks import (
    UsageError,
    _warn,
    check_model_folder,
    fail_on_refused,
    parse_settings,
)
from rank.echo import run_echo
from rank.jsonl import read_rank, with_served_models
from rank.offline import run_vllm
from rank.prompts import PromptFileError

# ----------------------------------------------------------------------------- settings


# ----------------------------------------------------------------------------- helpers


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None if unknown."""
    try:
        with open("/proc/self/stat") as handle:
            stat = handle.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        start_ticks = int(fields[19])  # field 22, starttime, in clock ticks after boot
        started = start_ticks / os.sysconf("SC_CLK_TCK")
        return round(max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started), 3)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def prepare_environment(settings: dict) -> None:
    """Environment that must be in place before vllm or torch is imported."""
    tmpdir = os.environ.get("TMPDIR")
    if tmpdir and not os.path.isdir(tmpdir):
        os.makedirs(tmpdir, exist_ok=True)
    kv = settings["cpu_kv_cache_gib"]
    # An empty value counts as unset, as vLLM reads it.
    if kv is not None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # vLLM reads a whole number of GiB: round a fraction up.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(math.ceil(kv))


# ----------------------------------------------------------------------------- engines


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="One rank of the inference test.")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument(
        "--prompts", required=True, help="rank file: .in (one prompt a line) or .jsonl"
    )
    parser.add_argument("--output", required=True, help="results (.out or .jsonl)")
    parser.add_argument("--record", required=True, help="JSON record of the run")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--settings", default="{}", help="JSON object (see module doc)")
    given.add_argument(
        "--settings-file", help="the run's settings file (formats/settings.py), with --model"
    )
    parser.add_argument("--model", help="with --settings-file: the model folder to load")
    parser.add_argument(
        "--log",
        help="append stdout and stderr (also the engine's) to this file: launchers such "
        "as pbs_tmrsh send a command's output elsewhere",
    )
    return parser.parse_args(argv)


def task_settings(args: argparse.Namespace) -> dict:
    """The rank's settings: from the run's settings file with --settings-file (checked
    against config/schema.yaml when the run began: not again), else from --settings."""
    if not args.settings_file:
        return parse_settings(args.settings)
    if not args.model:
        raise UsageError("--settings-file needs --model, the model folder to load")
    try:
        run = read_settings(args.settings_file)
    except (OSError, ValueError, TypeError) as error:
        raise UsageError(f"--settings-file {args.settings_file}: {error}") from None
    return run.task(args.model)


def log_to(path: str) -> None:
    """Send this process's stdout and stderr, and its children's, to ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    # Seconds from process start to here: interpreter start plus module imports.
    started = process_age_s()
    args = parse_args(argv)
    if args.log:
        log_to(args.log)
    try:
        settings = task_settings(args)
        check_model_folder(settings)
        # file errors come before any engine start
        requests = with_served_models(read_rank(args.prompts), settings["served_model_name"])
        fail_on_refused(requests, {}, settings, args.prompts)
        prepare_environment(settings)
        if not requests or settings["engine"] == "echo":
            if not requests:
                _warn(f"{args.prompts} has no prompts")
            result = run_echo(requests)
        else:
            partial, kept = resume(args.output, args.prompts, settings)
            try:
                result = run_vllm(requests, settings, args.prompts, partial, kept)
            finally:
                partial.close()
            result["resumed"] = len(kept)
        paths = (args.prompts, args.output, args.record)
        summary = finish_rank(args.rank, settings, requests, result, paths, started)
    except (UsageError, PromptFileError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr, flush=True)
        return 2
    print(summary, file=sys.stderr)
    return 0


def end_now(code: int) -> None:
    """Exit at once, without vLLM's teardown (seconds): Snakemake records a rank as
    finished only when this process is gone, and a kill between the last write and
    that moment would make a rerun redo a rank whose outputs are whole.

    Child processes (vLLM's EngineCore with multiprocessing) get SIGTERM, their own
    clean shutdown; they hold the tile's lock until they are gone (run_placed).
    """
    from engine import watchdog  # stdlib only

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    for child in watchdog.live_processes(watchdog.PPID, os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)
    os._exit(code)


if __name__ == "__main__":
    # Its Snakemake is gone (tiles.end_with_parent) or the run is stopped: end now,
    # with the engine's processes, writing nothing more.
    signal.signal(signal.SIGTERM, lambda *_: end_now(128 + signal.SIGTERM))
    end_now(main())
