"""The rank task: a rank's input (`layout`: rank files; `prompts`: prompt files and the
seed's records; `jsonl`: request lines and answer lines), its checks (`checks`), and how
it is answered: by warm engines (`warm`), by an engine of its own (`offline`, `task`)
or by the echo engine (`echo`), its answer files written atomically (`answer_files`).

May import formats/, console and engine/ (the client side and the pool). Knows nothing
of PBS or Snakemake: the rank job (pipeline/) and the PBS provider import it.
"""
