"""The config key ``dataset`` and the folders of a dataset's run: ranks cut into
``<data_dir>/<name>/``, their answers in ``<results_dir>/<name>/``, the one answer file
``<results_dir>/<name>.jsonl`` (``.parquet`` for a table input: a Parquet file, or a
folder of Hugging Face datasets' save_to_disk, read by tables.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import tables
from .tables import DatasetError

SUFFIXES = (".jsonl", ".parquet")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Dataset:
    source: str  # inputs/<name>.jsonl or .parquet, or the folder inputs/<name>
    rank_size: int
    column: str  # a table's: the prompt's (or messages', or texts') column
    carry: tuple[str, ...]  # a table's columns copied beside the answers
    embed: bool  # a table's column holds texts to embed

    @property
    def folder(self) -> bool:
        """A folder written by Hugging Face datasets' save_to_disk."""
        return tables.is_folder(self.source)

    @property
    def table(self) -> bool:
        """Rows with columns (a Parquet file or a datasets folder), not request lines."""
        return self.folder or self.source.endswith(".parquet")

    @property
    def name(self) -> str:
        return Path(self.source).name if self.folder else Path(self.source).stem


def dataset_of(config: dict) -> Dataset | None:
    """The run's dataset (config key ``dataset.input``), None for rank files in data_dir."""
    given = config.get("dataset") or {}
    source = str(given.get("input") or "")
    if not source:
        return None
    path = Path(source)
    if path.suffix not in SUFFIXES and not path.is_dir():
        raise DatasetError(
            f"config key dataset.input {source!r}: not a .jsonl or a .parquet file, nor a "
            "folder written by Hugging Face datasets' save_to_disk"
        )
    name = path.name if path.is_dir() else path.stem
    if not NAME.fullmatch(name) or name.isdigit():
        raise DatasetError(
            f"config key dataset.input {source!r}: its name must be letters, digits, '.', "
            "'_' or '-' and not a number (a number names a rank)"
        )
    if path.is_dir():
        tables.files(path)  # a folder of save_to_disk, its shards all there
    elif not path.is_file():
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
    """The one answer file: ``results/<name>.jsonl``, or ``.parquet`` for a table input."""
    return f"{config['results_dir']}/{dataset.name}{'.parquet' if dataset.table else '.jsonl'}"
