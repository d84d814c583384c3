"""Make a model ready for the engines, once, on the login side (rule fetch_model).

    fetch_model.py --model M --marker results/model/<slug>.json \
        --shared-hf-home /flare/datasets/model-weights --hf-home cache/huggingface

1. Weights: a local folder is used as it is. A hub id is looked up in the read-only
   shared cache first (ALCF keeps common models there), then in ``--hf-home``, and
   only then downloaded into ``--hf-home`` (compute nodes have no internet).
2. The engines' command line of this config (``--engine-argv``) is parsed with the
   installed vLLM's own parser: a flag or value this vLLM does not know stops the run
   here, before any job is submitted, naming the flag, its config key and the version.
   The model's tokenizer is loaded as the engines load it (scripts/engine/vllm_versions.py):
   a class their transformers lacks stops the run here too.
3. vLLM's model-info cache (``VLLM_CACHE_ROOT/modelinfos``) is built for the
   model's architectures with vLLM itself: without it an engine's first run on a
   node can fail with "validation error for ModelConfig".
4. The marker (written last, atomically; its format: scripts/formats/marker.py) names
   the folder the engines load and the versions of vLLM, torch and IPEX they will run
   with.

Run by the interpreter that runs inference (config key ``python``), with
VLLM_CACHE_ROOT set to the folder every engine uses.

Beside a local run's in-process engines (pipeline/rank_job.py `start_beside_fetch`), the
same checks run in an engine instead of a process of their own:

    fetch.py --model M --marker ... --log logs/fetch_model.log --serve <server argv>

starts an engine (engine/vllm_server.py) through this file. The first engine to claim the
preparation (``<log>.claim``, its pid) runs `main` in its own process once vLLM is imported,
its output in the rule's log and its status in ``<log>.status``, then serves: the machine
imports vLLM once less while the engines start (benchmarks/chat_batch.py: the first engine
ready ~2.5 s sooner on 2 cores). The rule waits for that status (model/prepare.py); it runs
this file itself when no engine claimed the preparation, and fails when the engine that
claimed it died first.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import re
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: scripts/, not this file's folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from engine import vllm_versions
from formats.files import write_atomic
from formats.marker import folder_bytes, write_marker

SERVE = "--serve"  # what follows is an engine's argv (engine/vllm_server.py)
CLAIM, STATUS = ".claim", ".status"  # beside the rule's log: who prepares, how it ended


class CheckError(Exception):
    """What stops the rule: printed as one line naming the cause."""


# Where model configs keep their attention heads: most, GPT-2 style, multimodal ones.
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads")


def attention_heads(folder: str | os.PathLike) -> int | None:
    """The model's attention heads from its config.json (a multimodal model's text part
    first); None when the file or the field is missing."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for part in (config.get("text_config"), config.get("llm_config"), config):
        if isinstance(part, dict):
            for key in HEAD_KEYS:
                if isinstance(part.get(key), int) and part[key] > 0:
                    return part[key]
    return None


def tensor_parallel_problem(folder: str | os.PathLike, model: str, tp: int) -> str | None:
    """Why ``tp`` tiles per engine (config tiles.per_job) cannot serve the model: vLLM
    splits the attention heads evenly over the tiles of an engine and refuses the model
    otherwise, on every node, after the weights are read. None if it can, or if the
    model's config does not say."""
    heads = attention_heads(folder)
    if tp <= 1 or heads is None or heads % tp == 0:
        return None
    fits = [n for n in range(1, 13) if heads % n == 0]
    return (
        f"model {model} has {heads} attention heads (config.json), which tensor parallel "
        f"{tp} (config key tiles.per_job) does not divide; vLLM refuses it on every engine. "
        f"Use tiles.per_job in {', '.join(map(str, fits))} (ALCF prefers 4 or 8 where the "
        "heads allow it)"
    )


def versions() -> dict:
    """vLLM, torch and (where installed) IPEX, as the engines will import them."""
    import torch
    import vllm

    try:
        ipex = importlib.metadata.version("intel-extension-for-pytorch")
    except importlib.metadata.PackageNotFoundError:
        ipex = None
    return {"vllm": vllm.__version__, "torch": torch.__version__, "ipex": ipex}


def check_engine_argv(argv: list[str], server: str, keys: dict, vllm_version: str) -> None:
    """Parse the engines' argv (from --model on) with the installed vLLM's parser:
    vLLM's OpenAI server's for `warm.server: vllm`, vllm_server.py's (vLLM's engine
    arguments) otherwise. ``keys``: flag -> the config key it comes from."""
    if server == "vllm":
        parser = vllm_versions.server_arg_parser()
    else:
        from engine import vllm_server

        parser = vllm_server.argument_parser()

    def refuse(message: str):
        flags = re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w.-]*)", message)
        named = "; ".join(
            f"{flag} comes from config key {keys.get(flag, 'vllm.engine_args')}" for flag in flags
        )
        raise CheckError(
            f"vLLM {vllm_version} does not accept the engines' command line "
            f"(warm.server: {server}): {message}" + (f" ({named})" if named else "")
        )

    parser.error = refuse  # argparse reports every refusal through error()
    parser.parse_args(argv[argv.index("--model") :])


def find_weights(model: str, shared_hf_home: str, hf_home: str) -> tuple[str, str]:
    """(folder, how) of the model's weights, downloading only when no cache has them."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve()), "local folder"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for home, how in ((shared_hf_home, "shared cache"), (hf_home, "project cache")):
        if not home:
            continue
        try:
            return snapshot_download(
                model, cache_dir=str(Path(home) / "hub"), local_files_only=True
            ), f"{how} {home}"
        except (LocalEntryNotFoundError, OSError):
            pass
    from huggingface_hub.errors import GatedRepoError

    print(f"{model}: in no cache, downloading into {hf_home}", file=sys.stderr)
    try:
        folder = snapshot_download(model, cache_dir=str(Path(hf_home) / "hub"))
    except GatedRepoError as error:
        raise CheckError(
            f"model {model} is gated: accept its licence on huggingface.co, then set "
            "HF_TOKEN (or run `hf auth login` once) in the shell that runs snakemake; "
            f"the hub said: {str(error).splitlines()[0]}"
        ) from None
    return folder, f"downloaded to {hf_home}"


def build_modelinfo_cache(folder: str) -> list[str]:
    """vLLM's model-info cache for the architectures the model's config names."""
    architectures = json.loads((Path(folder) / "config.json").read_text()).get("architectures")
    if not architectures:
        raise SystemExit(f"{folder}/config.json names no architectures")
    from vllm.model_executor.models import registry

    # vLLM inspects a model class in a second interpreter (one more `import vllm`,
    # ~20 s on 2 cores) only to keep CUDA uninitialised in its caller. This process
    # never touches a device: inspect here; vLLM still hashes the module and writes
    # the cache file itself. Private names: checked, not assumed.
    if not vllm_versions.inspect_models_in_process(registry):
        print(
            "fetch_model: this vLLM has no vllm.model_executor.models.registry."
            "_run_in_subprocess; the model class is inspected in vLLM's own second "
            "interpreter (one more import of vLLM)",
            file=sys.stderr,
        )
    models = getattr(getattr(registry, "ModelRegistry", None), "models", None)
    if not isinstance(models, dict):
        raise CheckError(
            "this vLLM has no vllm.model_executor.models.registry.ModelRegistry.models; "
            "scripts/model/fetch.py cannot build the model-info cache with it"
        )
    built = []
    for arch in architectures:
        registered = models.get(arch)
        if registered is None:
            raise SystemExit(f"vLLM does not support architecture {arch!r} of {folder}")
        registered.inspect_model_cls()  # writes VLLM_CACHE_ROOT/modelinfos/<class>.json
        built.append(arch)
    return built


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--shared-hf-home", default="")
    parser.add_argument("--hf-home", required=True)
    parser.add_argument("--engine-argv", default="[]", help="JSON: the engines' argv")
    parser.add_argument("--server", default="inprocess", help="config warm.server")
    parser.add_argument("--flag-keys", default="{}", help="JSON: flag -> config key")
    parser.add_argument("--log", default="", help=f"with {SERVE}: the rule's log")
    return parser


# ---------------------------------------------------- in an engine, beside rule fetch_model


def claim(log: str) -> bool:
    """Take the preparation of the run whose rule logs to ``log`` (False: taken)."""
    try:
        fd = os.open(log + CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as stream:
        stream.write(f"{os.getpid()}\n")
    return True


def claimant(log: str) -> int | None:
    """The pid that claimed the preparation; 0 while it writes it; None: unclaimed."""
    try:
        text = Path(log + CLAIM).read_text()
    except FileNotFoundError:
        return None
    return int(text) if text.strip().isdigit() else 0


def status(log: str) -> int | None:
    """How the preparation claimed in an engine ended (main's status); None: not yet."""
    try:
        return int(Path(log + STATUS).read_text())
    except (FileNotFoundError, ValueError):
        return None


def forget(log: str) -> None:
    """An earlier run's claim and status (the rule, before its engines start)."""
    for suffix in (CLAIM, STATUS):
        Path(log + suffix).unlink(missing_ok=True)


def prepare_here(argv: list[str], log: str) -> None:
    """`main` in this engine, its output in ``log``, its status in ``<log>.status``; on a
    failure the engine goes on waiting for the marker that never comes (the rule fails,
    and the run's onerror stops the engines)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "w") as stream:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
    try:
        code = main(argv)
    except SystemExit as end:  # build_modelinfo_cache's refusals, as in a process of its own
        if end.code is not None and not isinstance(end.code, int):
            print(end.code, file=sys.stderr)
        code = end.code if isinstance(end.code, int) else int(end.code is not None)
    except Exception:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
    # said before the status: the rule acts on the status, and a failed run stops the engines
    print(f"fetch: the model's checks ended with status {code} here ({log})", file=sys.stderr)
    sys.stderr.flush()
    write_atomic(log + STATUS, f"{code}\n")


def serve(argv: list[str], server_argv: list[str]) -> int:
    """An engine beside rule fetch_model (``fetch.py ... --serve <server argv>``): it
    prepares the model first if it is the first to claim it."""
    from engine import vllm_server

    args = argument_parser().parse_args(argv)
    mine = bool(args.log) and not os.path.exists(args.marker) and claim(args.log)
    prepare = functools.partial(prepare_here, argv, args.log) if mine else None
    return vllm_server.main(server_argv, prepare)


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        found = versions()
        print(f"versions: {json.dumps(found)}", file=sys.stderr)
        engine_argv = json.loads(args.engine_argv)
        if engine_argv:
            check_engine_argv(engine_argv, args.server, json.loads(args.flag_keys), found["vllm"])
            print(f"engine command line parses with vLLM {found['vllm']}", file=sys.stderr)
        folder, how = find_weights(args.model, args.shared_hf_home, args.hf_home)
        print(f"{args.model}: weights from {how}: {folder}", file=sys.stderr)
        if "--tensor-parallel-size" in engine_argv:  # before any qsub
            tp = int(engine_argv[engine_argv.index("--tensor-parallel-size") + 1])
            if problem := tensor_parallel_problem(folder, args.model, tp):
                raise CheckError(problem)
        remote = "--trust-remote-code" in engine_argv
        if problem := vllm_versions.tokenizer_problem(folder, remote):  # before any qsub
            raise CheckError(f"model {args.model}: {problem}")
        cache_root = os.environ.get("VLLM_CACHE_ROOT", "")
        architectures = build_modelinfo_cache(folder)
    except CheckError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    cached = sorted(p.name for p in Path(cache_root, "modelinfos").glob("*.json"))
    print(f"model-info cache in {cache_root}: {', '.join(cached)}", file=sys.stderr)
    marker = {
        "model": args.model,
        "path": folder,
        "how": how,
        "vllm_cache_root": cache_root,
        "architectures": architectures,
        "versions": found,
        # config warm.ready_timeout_s null: engines.ready_timeout of this size
        "weights_bytes": folder_bytes(folder),
    }
    write_marker(args.marker, marker)
    return 0


if __name__ == "__main__":
    if SERVE in sys.argv:
        at = sys.argv.index(SERVE)
        sys.exit(serve(sys.argv[1:at], sys.argv[at + 1 :]))
    code = main()
    # No teardown: the interpreter's last garbage collections over vLLM's and torch's
    # modules take 2 s on 2 cores, and the ranks wait for this rule's end. The marker is
    # written and closed; nothing here holds a child or a lock.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
