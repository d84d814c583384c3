"""A table dataset read batch by batch: a Parquet file, or a folder written by Hugging Face
``datasets``' ``Dataset.save_to_disk``. The one place that knows both forms: the cut reads
the prompt column through it, the merge the carried columns, the bill the row count, and
the workflow the files a dataset is made of (its rules' inputs, the manifest's staleness).

The folder's layout, as ``datasets`` 2.0 to 5.0 write and read it (arrow_dataset.py,
``save_to_disk`` and ``load_from_disk``): ``state.json`` lists the shards in order in
``_data_files`` (``[{"filename": "data-00000-of-00002.arrow"}, ...]``; one
``dataset.arrow`` before 2.8), each an Arrow IPC *stream* (``datasets`` opens them with
``pyarrow.ipc.open_stream``) holding the rows as they are, indices flattened.
``dataset_info.json`` (the features) is not needed to read the rows. A DatasetDict's
folder holds ``dataset_dict.json`` (``{"splits": [...]}``) and one such folder per split.
The ``datasets`` library itself is not needed: pyarrow reads the shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

STATE = "state.json"  # datasets' config.DATASET_STATE_JSON_FILENAME
DATASET_DICT = "dataset_dict.json"  # datasets' config.DATASETDICT_JSON_FILENAME
BATCH_ROWS = 8192  # rows of a Parquet batch; a folder's batches are as its shards hold them
KEY = "config key dataset.input"


class DatasetError(ValueError):
    """A dataset that cannot be read or cut, named by its file (and line)."""


def is_folder(source: str | os.PathLike) -> bool:
    return Path(source).is_dir()


def files(source: str | os.PathLike) -> list[str]:
    """The files a dataset is made of: the file itself, or a folder's state.json and its
    shards in order. Raises DatasetError (naming the file and the config key) for a folder
    that is not one ``Dataset.save_to_disk`` wrote, or one whose shard is missing."""
    if not is_folder(source):
        return [str(source)]
    folder = Path(source)
    state = folder / STATE
    if not state.is_file():
        splits = dict_splits(folder)
        if splits is not None:
            raise DatasetError(
                f"{KEY}: {str(folder)!r} is a DatasetDict ({DATASET_DICT}): give one of its "
                f"splits, {', '.join(repr(str(folder / s)) for s in splits)}"
            )
        raise DatasetError(
            f"{KEY}: no {state} (a folder of Hugging Face datasets' save_to_disk holds "
            f"{STATE} and the Arrow shards it lists)"
        )
    try:
        listed = json.loads(state.read_text())["_data_files"]
        names = [entry["filename"] for entry in listed]
    except (OSError, ValueError, KeyError, TypeError):
        raise DatasetError(
            f"{KEY}: {state}: not a state.json of save_to_disk (its _data_files lists "
            'the shards as {"filename": ...})'
        ) from None
    if not names:
        raise DatasetError(f"{KEY}: {state} lists no shards")
    shards = []
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise DatasetError(f"{KEY}: {state}: shard {name!r} is not a file of {folder}")
        if not (folder / name).is_file():
            raise DatasetError(f"{KEY}: no shard {folder / name} (listed in {state})")
        shards.append(str(folder / name))
    return [str(state), *shards]


def dict_splits(folder: Path) -> list[str] | None:
    """A DatasetDict folder's splits (None: not one)."""
    try:
        splits = json.loads((folder / DATASET_DICT).read_text())["splits"]
        return [str(s) for s in splits]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(p.parent.name for p in folder.glob(f"*/{STATE}"))


def newest_change(source: str | os.PathLike) -> float:
    """The newest modification time of the dataset's files (OSError: one is gone)."""
    return max(os.stat(path).st_mtime for path in files(source))


def columns(source: str | os.PathLike) -> list[str]:
    """The dataset's column names."""
    return schema(source).names


def schema(source: str | os.PathLike):
    """The dataset's pyarrow schema (a folder's: its first shard's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not is_folder(source):
        try:
            return pq.ParquetFile(source).schema_arrow
        except (OSError, pa.ArrowException) as error:
            raise DatasetError(f"{source}: not a Parquet file: {error} ({KEY})") from None
    first = files(source)[1]
    with pa.memory_map(first) as stream:
        return open_shard(first, stream).schema


def open_shard(path: str, stream):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(stream)
    except (OSError, pa.ArrowException) as error:
        raise DatasetError(f"{path}: not an Arrow stream shard: {error} ({KEY})") from None


def batches(source: str | os.PathLike, names: Sequence[str]) -> Iterator:
    """The dataset's rows in order as pyarrow record batches of the columns ``names``, one
    batch in memory at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not is_folder(source):
        yield from pq.ParquetFile(source).iter_batches(batch_size=BATCH_ROWS, columns=names)
        return
    expected = schema(source)
    for shard in files(source)[1:]:
        with pa.memory_map(shard) as stream:
            reader = open_shard(shard, stream)
            if not reader.schema.equals(expected):
                raise DatasetError(
                    f"{shard}: its columns differ from the first shard's ({KEY}): "
                    f"{described(reader.schema)}, not {described(expected)}"
                )
            try:
                for batch in reader:
                    yield batch.select(names)
            except pa.ArrowException as error:
                raise DatasetError(f"{shard}: a broken Arrow stream: {error} ({KEY})") from None


def described(schema) -> str:
    return ", ".join(f"{field.name}: {field.type}" for field in schema)


def count_rows(source: str | os.PathLike) -> int:
    """The dataset's rows (a Parquet file's from its footer)."""
    import pyarrow.parquet as pq

    if not is_folder(source):
        return pq.ParquetFile(source).metadata.num_rows
    return sum(batch.num_rows for batch in batches(source, []))
