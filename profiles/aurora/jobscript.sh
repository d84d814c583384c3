#!/bin/bash -l
# properties = {properties}
# One PBS submission of the Aurora profile: a Snakemake group job whose members run
# in parallel, one per GPU tile (scripts/placement/tiles.py places them on the PBS_NODEFILE hosts).
# A str.format template: literal braces are doubled. pbs-submit replaces the
# "@site-setup@" line by the lines of config pbs.setup (e.g. module load frameworks).
# bash -l (as in ALCF's examples): a login shell defines the `module` command.

# PBS starts jobs in $HOME; Slurm's PBS wrappers in the submit folder.
cd "${{PBS_O_WORKDIR:-.}}" || exit 1
echo "aurora-pbs: job ${{PBS_JOBID:-?}} on $(hostname), nodes: $(sort -u "${{PBS_NODEFILE:-/dev/null}}" | tr '\n' ' ')"
# @site-setup@
{exec_job}
