"""The config key ``dataset`` and the folders of a dataset's run: ranks cut into
``<data_dir>/<name>/``, their answers in ``<results_dir>/<name>/``, the one answer file
``<results_dir>/<name>.jsonl`` (``.parquet`` for a Parquet input)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".jsonl", ".parquet")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class DatasetError(ValueError):
    """A dataset that cannot be read or cut, named by its file (and line)."""


@dataclass(frozen=True)
class Dataset:
    source: str  # inputs/<name>.jsonl or .parquet
    rank_size: int
    column: str  # Parquet: the prompt's (or messages', or texts') column
    carry: tuple[str, ...]  # Parquet: columns copied beside the answers
    embed: bool  # Parquet: the column holds texts to embed

    @property
    def name(self) -> str:
        return Path(self.source).stem

    @property
    def parquet(self) -> bool:
        return self.source.endswith(".parquet")


def dataset_of(config: dict) -> Dataset | None:
    """The run's dataset (config key ``dataset.input``), None for rank files in data_dir."""
    given = config.get("dataset") or {}
    source = str(given.get("input") or "")
    if not source:
        return None
    path = Path(source)
    if path.suffix not in SUFFIXES:
        raise DatasetError(
            f"config key dataset.input {source!r}: a dataset is a .jsonl or a .parquet file"
        )
    if not NAME.fullmatch(path.stem) or path.stem.isdigit():
        raise DatasetError(
            f"config key dataset.input {source!r}: its name must be letters, digits, '.', "
            "'_' or '-' and not a number (a number names a rank)"
        )
    if not path.is_file():
        raise DatasetError(f"config key dataset.input: no file {source!r}")
    return Dataset(
        source=source,
        rank_size=int(given.get("rank_size", 1000)),
        column=str(given.get("column") or "prompt"),
        carry=tuple(given.get("carry") or ()),
        embed=bool(given.get("embed", False)),
    )


def folders(config: dict, dataset: Dataset | None) -> tuple[str, str]:
    """The rank files' folder and their answers' folder."""
    data, results = config["data_dir"], config["results_dir"]
    if dataset is None:
        return data, results
    return f"{data}/{dataset.name}", f"{results}/{dataset.name}"


def answer_file(config: dict, dataset: Dataset) -> str:
    """The one answer file: ``results/<name>.jsonl``, or ``.parquet`` for a Parquet input."""
    return f"{config['results_dir']}/{dataset.name}{Path(dataset.source).suffix}"
