# One vLLM engine per GPU tile: data/<rank>.in -> results/<rank>.out.
# Profiles decide where jobs run: profiles/local (this machine's CPU) or
# profiles/aurora (PBS submissions packing 12 tile-jobs per node).
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.27")


configfile: "config/config.yaml"


sys.path.insert(0, str(Path(workflow.basedir, "scripts")))
import pbs, pipeline, ranks, summarize  # noqa: E402, E401

# --config 'pbs={nodes_per_submission: 8}' passes "8": read it as the schema's type.
pipeline.load_config(config, "config/schema.yaml")


validate(config, "config/schema.yaml")

DATA, RESULTS = config["data_dir"], config["results_dir"]
RANKS = ranks.discover_ranks(DATA)
# Ranks a killed Snakemake left marked "incomplete" although their outputs are whole.
ranks.report_kept(ranks.forget_finished_incomplete(RESULTS))
MODEL = pipeline.check_model(config["model"])
MODEL_MARKER = pipeline.model_marker(config, MODEL)  # [] for the echo engine
# Settings for profiles/aurora's commands; checked and planned when that profile is in use.
pbs.export_settings(
    config,
    workflow=workflow,
    model=MODEL,
    marker="".join(MODEL_MARKER),
    engines=pipeline.engine_spec(config),
)


def count_pending():  # ranks whose outputs are missing or outdated
    return len(pipeline.pending_ranks(RANKS, DATA, RESULTS, MODEL_MARKER))


# With profiles/aurora: print the PBS plan of the pending ranks.
pbs.announce_plan(workflow, config, count_pending)


wildcard_constraints:
    rank=r"\d+",


localrules:
    all,
    fetch_model,
    summary,


rule all:
    input:
        expand(f"{RESULTS}/{{rank}}.out", rank=RANKS),
        f"{RESULTS}/summary.tsv",


rule fetch_model:
    output:
        f"{RESULTS}/model/{pipeline.model_slug(MODEL)}.json",
    log:
        "logs/fetch_model.log",
    run:
        pipeline.fetch_model(config, MODEL, output[0], log[0])


rule infer:
    input:
        prompts=f"{DATA}/{{rank}}.in",
        model=ancient(MODEL_MARKER),
    output:
        out=f"{RESULTS}/{{rank}}.out",
        record=f"{RESULTS}/records/{{rank}}.json",
    log:
        "logs/infer/{rank}.log",
    group:
        pbs.node_group(workflow, config)
    threads: 1
    resources:
        tiles=config["tiles"]["per_job"],
        runtime=config["runtime_minutes"],
        # per-rank engines: profiles/local caps how many start at once
        engines=0 if config["warm_engines"] else 1,
    params:
        model=MODEL,
    run:
        pipeline.run_rank(config, params.model, wildcards.rank, input, output, log[0])


def reported(name, caption):  # a results file in the --report, with its caption
    return report(
        f"{RESULTS}/{name}", caption=f"report/{caption}.rst", category="Run summary"
    )


rule summary:
    input:
        records=expand(f"{RESULTS}/records/{{rank}}.json", rank=RANKS),
    output:
        table=reported("summary.tsv", "summary"),
        plot=reported("summary.png", "throughput"),
        submissions=reported("submissions.tsv", "submissions"),
        engines=reported("engines.tsv", "engines"),
        timeline=reported("timeline.png", "timeline"),
    log:
        "logs/summary.log",
    run:
        summarize.write_run_summary(input.records, output, log[0], len(RANKS), config)


onsuccess:
    pipeline.stop_engines()
    summarize.print_run_summary(f"{RESULTS}/records", RANKS, config=config)


onerror:
    pipeline.stop_engines()
    # What did finish, then what failed.
    summarize.print_run_summary(f"{RESULTS}/records", RANKS, config=config)
    pipeline.report_failures(RANKS, RESULTS, "logs/infer/{rank}.log")
