"""Put a hub model into the shared Hugging Face cache, once, on the login node.

Run as ``fetch_model.py <hub id> <marker.json>`` by the interpreter that runs
inference (config key ``python``), so the cache is the one the jobs read. Compute
jobs then run with ``HF_HUB_OFFLINE=1``. A model already in the cache is not
downloaded again (on Aurora, ALCF's shared cache often has it).
"""

import json
import sys

from prompts import write_atomic


def main(model: str, marker: str) -> int:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(model, local_files_only=True)
        how = "found in the cache"
    except LocalEntryNotFoundError:
        print(f"{model}: not in the cache, downloading", file=sys.stderr)
        path = snapshot_download(model)
        how = "downloaded"
    print(f"{model}: {how} at {path}", file=sys.stderr)
    write_atomic(marker, json.dumps({"model": model, "path": path, "how": how}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
