"""A dataset as the run's input: ``inputs/<name>.jsonl`` (request lines, as JSONL ranks
take them), or a table with a column of prompts or messages, ``inputs/<name>.parquet`` or
the folder ``inputs/<name>`` that Hugging Face ``datasets``' ``save_to_disk`` wrote, cut
into ranks of ``dataset.rank_size`` requests and answered in one file,
``results/<name>.jsonl`` (or ``.parquet``), in input order.

- `tables`: a table dataset (Parquet file or datasets folder) read batch by batch, its
  files and its errors (``DatasetError``);
- `source`: the config key ``dataset``, the folders and files a dataset's run uses;
- `cut`: the streaming, deterministic cut into rank files and its manifest (the format's
  owner), for the Snakefile's checkpoint ``cut_dataset``;
- `merge`: the rank answers put back together, streaming and atomically;
- `bill`: the estimate of a run's node-hours before any qsub, from the history of earlier
  runs (formats/history.py), and the budget.

May import formats/, rank/ (the line checks of rank/jsonl.py), reporting/ (the bill from
the accounting) and pbs/; pyarrow only for tables. The Snakefile's dataset rules import
it.
"""
