# One vLLM engine per GPU tile: data/<rank>.in -> results/<rank>.out,
# data/<rank>.jsonl (requests, OpenAI batch lines too) -> results/<rank>.jsonl.
# Profiles decide where jobs run: profiles/local (this machine's CPU) or
# profiles/aurora (PBS submissions packing 12 tile-jobs per node).
import gc
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.27")


configfile: "config/config.yaml"


sys.path.insert(0, str(Path(workflow.basedir, "scripts")))
import pbs  # noqa: E402
from pbs import snakemake_fixes  # noqa: E402
from formats import workflow_config  # noqa: E402
from formats import engine_spec  # noqa: E402
from formats import settings as run_settings  # noqa: E402
from formats import record as rank_record  # noqa: E402
from pbs.settings import run_info  # noqa: E402
from dataset import bill, cut, merge, source, tables  # noqa: E402
from model import prepare  # noqa: E402
from pipeline import rank_job  # noqa: E402
from rank import layout  # noqa: E402
from reporting import progress, summary  # noqa: E402

# --config 'pbs={nodes_per_submission: 8}' passes "8": read it as the schema's type.
workflow_config.load_config(config, "config/schema.yaml")


validate(config, "config/schema.yaml")
# The run's settings: made once from the checked config by the main Snakemake and written
# as one file, which the Snakemakes of its PBS jobs read instead (formats/settings.py).
SETTINGS, SETTINGS_FILE = run_settings.of_process(config, main=run_info(workflow).main)
# Their config keys, for the code that takes the config's shape.
CONFIG = SETTINGS.config()

DATASET = source.dataset_of(CONFIG)  # None: rank files in data_dir
DATA, RESULTS = source.folders(CONFIG, DATASET)
RECORDS = f"{RESULTS}/{rank_record.FOLDER}"  # the rank records: <RECORDS>/<rank>.json
# rank -> its .in or .jsonl (a dataset's: as far as its last cut knows them)
RANK_FILES = (
    cut.known_rank_files(DATASET, DATA) if DATASET else layout.discover_rank_files(DATA)
)
RANKS = list(RANK_FILES)
# Ranks a killed Snakemake left marked "incomplete" although their outputs are whole.
layout.report_kept(layout.forget_finished_incomplete(RESULTS))
MODEL = prepare.check_model(CONFIG["model"])
prepare.check_chat_template(SETTINGS)
MODEL_MARKER = prepare.model_marker(SETTINGS, MODEL)  # [] for the echo engine
# A dataset's bill (dry runs too); the settings of the ranks' side (rank folders, walltime).
RUN = bill.prepare(
    workflow, SETTINGS, DATASET, DATA, RESULTS, MODEL, RANKS, MODEL_MARKER
)
# Settings for profiles/aurora's commands; checked and planned when that profile is in use.
pbs.export_settings(
    RUN,
    workflow=workflow,
    model=MODEL,
    marker="".join(MODEL_MARKER),
    engines=engine_spec.from_settings(SETTINGS),
    settings_file=str(SETTINGS_FILE),
)


include: "rules/common.smk"


# With profiles/aurora: print the PBS plan of the pending ranks.
pbs.announce_plan(workflow, RUN, count_pending)
# Run here: a progress line every progress_interval_s (the first rank job starts it).
progress.LOCAL.configure(
    workflow, RESULTS, SETTINGS.progress_interval_s, rank_job.engine_states(SETTINGS)
)


wildcard_constraints:
    rank=r"\d+",


localrules:
    all,
    fetch_model,
    summary,


if DATASET:

    include: "rules/dataset.smk"


ANSWERS = dataset_answers if DATASET else layout.outputs(RESULTS, RANK_FILES)


rule all:
    input:
        ANSWERS,
        f"{RESULTS}/summary.tsv",
        [source.answer_file(CONFIG, DATASET)] if DATASET else [],


rule fetch_model:
    output:
        f"{SETTINGS.results_dir}/model/{prepare.model_slug(MODEL)}.json",
    log:
        "logs/fetch_model.log",
    run:
        beside = rank_job.start_beside_fetch(
            workflow, SETTINGS, MODEL, output[0], log[0]
        )
        prepare.fetch_model(SETTINGS, MODEL, output[0], log[0], beside)


rule infer:
    input:
        prompts=f"{DATA}/{{rank}}.in",
        model=ancient(MODEL_MARKER),
    output:
        out=f"{RESULTS}/{{rank}}.out",
        record=f"{RECORDS}/{{rank}}.json",
    log:
        "logs/infer/{rank}.log",
    group:
        pbs.node_group(workflow, RUN)
    threads: 1
    resources:
        tiles=SETTINGS.tiles.per_job,
        runtime=SETTINGS.runtime_minutes,
        # per-rank engines: profiles/local caps how many start at once
        engines=0 if SETTINGS.warm_engines else 1,
    params:
        model=MODEL,
    run:
        rank_job.run_rank(SETTINGS, params.model, wildcards.rank, input, output, log[0])


# JSONL ranks: the same job, answers in results/<rank>.jsonl.
use rule infer as infer_jsonl with:
    input:
        prompts=f"{DATA}/{{rank}}.jsonl",
        model=ancient(MODEL_MARKER),
    output:
        out=f"{RESULTS}/{{rank}}.jsonl",
        record=f"{RECORDS}/{{rank}}.json",


rule summary:
    input:
        # each written with its record; asking for the records themselves would make
        # Snakemake try both infer rules for each (-n at 10,000 ranks: 29 s, not 24 s)
        answers=ANSWERS,
    output:
        table=reported("summary.tsv", "summary"),
        plot=reported("summary.png", "throughput"),
        submissions=reported("submissions.tsv", "submissions"),
        engines=reported("engines.tsv", "engines"),
        timeline=reported("timeline.png", "timeline"),
    log:
        "logs/summary.log",
    run:
        write_summary(input.answers, output, log[0])


onsuccess:
    rank_job.stop_engines()
    snakemake_fixes.end_without_rate_limit_timers()  # exit now, not a second later
    progress.LOCAL.finish()
    summary.print_run_summary(RECORDS, cut.ranks_now(DATA, RANKS), config=CONFIG)
    bill.print_against_spending(CONFIG, RESULTS, cut.ranks_now(DATA, RANKS))
    # Snakemake's exit collects its heap (the DAG, the jobs): 0.6 s of 1.6 s at 480 ranks.
    gc.freeze()


onerror:
    rank_job.stop_engines()
    snakemake_fixes.end_without_rate_limit_timers()
    progress.LOCAL.finish()
    # What did finish, then what failed.
    summary.print_run_summary(RECORDS, cut.ranks_now(DATA, RANKS), config=CONFIG)
    summary.report_failures(
        cut.ranks_now(DATA, RANKS), RESULTS, "logs/infer/{rank}.log"
    )
