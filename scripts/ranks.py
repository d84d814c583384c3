"""Find the rank files of a run: ``<data_dir>/<rank>.in`` with ``rank`` a non-negative integer."""

import re
from collections import defaultdict
from pathlib import Path

RANK_FILE = re.compile(r"(\d+)\.in")


class RankFileError(ValueError):
    """The data folder does not describe a clean set of ranks."""


def discover_ranks(data_dir: str | Path) -> list[str]:
    """The ranks of the data folder, as spelled in their file names, in numeric order.

    Every ``*.in`` must be named by a non-negative integer, and no two files may
    name the same rank (``7.in`` and ``07.in``): the user meant one of them, and
    guessing which would silently drop prompts.
    """
    data = Path(data_dir)
    if not data.is_dir():
        raise RankFileError(f"data folder {str(data)!r} does not exist (config key data_dir)")
    bad, names_of = [], defaultdict(list)
    for path in sorted(data.glob("*.in")):
        match = RANK_FILE.fullmatch(path.name)
        if match:
            names_of[int(match.group(1))].append(path.name)
        else:
            bad.append(path.name)
    problems = []
    if bad:
        problems.append(
            "input files whose name is not a non-negative integer rank: " + ", ".join(bad)
        )
    clashes = [names for names in names_of.values() if len(names) > 1]
    if clashes:
        problems.append(
            "several files for one rank: " + "; ".join(" and ".join(n) for n in clashes)
        )
    if problems:
        raise RankFileError(f"data folder {str(data)!r}: " + "; ".join(problems))
    if not names_of:
        raise RankFileError(f"data folder {str(data)!r} has no <rank>.in files")
    return [names[0].removesuffix(".in") for _, names in sorted(names_of.items())]
