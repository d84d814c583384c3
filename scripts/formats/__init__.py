"""The on-disk formats the parts of a run share, one owner module each: its writer, its
reader, its version (``FORMAT``) and its folder names and words, which no other module
spells (tests/test_house.py).

- `record`: the rank record, ``results/records/<rank>.json``;
- `registry`: the engine registry, ``logs/engines/<job>/``, and an engine's states;
- `engine_spec`: what a submission's (or a local run's) engines need, ``<name>.engines.json``;
- `failure_note`: a rank's failure, ``logs/infer/failed/<rank>.json``;
- `preflight_failure`: a submission stopped by its preflight, ``logs/pbs/<name>.failed.json``;
- `marker`: the model marker of rule fetch_model, ``results/model/<slug>.json``;
- `partial`: a rank's answers so far, ``results/.partial/``;
- `node_report`, `faults`, `history`: what the node Snakemakes report, the
  infrastructure's failures, the finished runs;
- `settings`: the run's settings, checked once and typed, ``.snakemake/settings/<digest>.json``;
- `staged_model`: where a node's copy of the model lies; `workflow_config`: the config
  file read as the schema's types; `files`: the one atomic write and safe file names.

The ground floor: imports nothing of scripts/ but its own modules. Stdlib only: the PBS
provider reads these files under a login node's Python.
"""
