"""Rule infer's script: place one rank on a free tile and run the task there.

Snakemake runs this file with the interpreter that runs Snakemake and hands it the
``snakemake`` object; scripts/infer.py then runs with config key ``python``.
"""

import pipeline

snakemake = globals()["snakemake"]  # set by Snakemake's script preamble
pipeline.run_rank(
    snakemake.config,
    snakemake.params.model,
    snakemake.wildcards.rank,
    snakemake.input,
    snakemake.output,
    snakemake.log[0],
)
