"""Make a model ready for the engines, once, on the login side (rule fetch_model).

    fetch_model.py --model M --marker results/model/<slug>.json \
        --shared-hf-home /flare/datasets/model-weights --hf-home cache/huggingface

1. Weights: a local folder is used as it is. A hub id is looked up in the read-only
   shared cache first (ALCF keeps common models there), then in ``--hf-home``, and
   only then downloaded into ``--hf-home`` (compute nodes have no internet).
2. vLLM's model-info cache (``VLLM_CACHE_ROOT/modelinfos``) is built for the
   model's architectures with vLLM itself: without it an engine's first run on a
   node can fail with "validation error for ModelConfig".
3. The marker (written last, atomically) names the folder the engines load.

Run by the interpreter that runs inference (config key ``python``), with
VLLM_CACHE_ROOT set to the folder every engine uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from prompts import write_atomic


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
    print(f"{model}: in no cache, downloading into {hf_home}", file=sys.stderr)
    return snapshot_download(
        model, cache_dir=str(Path(hf_home) / "hub")
    ), f"downloaded to {hf_home}"


def build_modelinfo_cache(folder: str) -> list[str]:
    """vLLM's model-info cache for the architectures the model's config names."""
    architectures = json.loads((Path(folder) / "config.json").read_text()).get("architectures")
    if not architectures:
        raise SystemExit(f"{folder}/config.json names no architectures")
    from vllm.model_executor.models import registry

    # vLLM inspects a model class in a second interpreter (one more `import vllm`,
    # ~20 s on 2 cores) only to keep CUDA uninitialised in its caller. This process
    # never touches a device: inspect here; vLLM still hashes the module and writes
    # the cache file itself.
    registry._run_in_subprocess = lambda inspect: inspect()
    built = []
    for arch in architectures:
        registered = registry.ModelRegistry.models.get(arch)
        if registered is None:
            raise SystemExit(f"vLLM does not support architecture {arch!r} of {folder}")
        registered.inspect_model_cls()  # writes VLLM_CACHE_ROOT/modelinfos/<class>.json
        built.append(arch)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--shared-hf-home", default="")
    parser.add_argument("--hf-home", required=True)
    args = parser.parse_args(argv)
    folder, how = find_weights(args.model, args.shared_hf_home, args.hf_home)
    print(f"{args.model}: weights from {how}: {folder}", file=sys.stderr)
    cache_root = os.environ.get("VLLM_CACHE_ROOT", "")
    architectures = build_modelinfo_cache(folder)
    cached = sorted(p.name for p in Path(cache_root, "modelinfos").glob("*.json"))
    print(f"model-info cache in {cache_root}: {', '.join(cached)}", file=sys.stderr)
    marker = {
        "model": args.model,
        "path": folder,
        "how": how,
        "vllm_cache_root": cache_root,
        "architectures": architectures,
    }
    Path(args.marker).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.marker, json.dumps(marker, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
