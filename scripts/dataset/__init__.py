"""A dataset as the run's input: ``inputs/<name>.jsonl`` (request lines, as JSONL ranks
take them) or ``inputs/<name>.parquet`` (a column of prompts or messages), cut into ranks
of ``dataset.rank_size`` requests and answered in one file, ``results/<name>.jsonl`` (or
``.parquet``), in input order.

- `source`: the config key ``dataset``, the folders and files a dataset's run uses;
- `cut`: the streaming, deterministic cut into rank files and its manifest (the format's
  owner), for the Snakefile's checkpoint ``cut_dataset``;
- `merge`: the rank answers put back together, streaming and atomically;
- `bill`: the estimate of a run's node-hours before any qsub, from the history of earlier
  runs (formats/history.py), and the budget.

May import formats/, rank/ (the line checks of rank/jsonl.py), reporting/ (the bill from
the accounting) and pbs/; pyarrow only for Parquet. The Snakefile's dataset rules import
it.
"""
