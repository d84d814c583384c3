"""Developer tools, not runtime: `build_model` (tiny models for the tests and
benchmarks), `unlock_stale` (a stale Snakemake lock) and install-openpbs.sh.

Run as files; may import any package of scripts/, and none imports them.
"""
