# Input functions and helpers of the Snakefile's rules (Snakemake's lint: functions
# apart from rules).


def count_pending():  # ranks whose outputs are missing or outdated, as the bill counted them
    return len(bill.pending_requests(DATASET, DATA, RESULTS, RANKS, MODEL_MARKER)[2])


def write_summary(answers, output, log):  # and the history line the next bill rests on
    rank_job.stop_engines(wait=False)  # every rank is answered: they stop meanwhile
    records = layout.records(RESULTS, [Path(a).stem for a in answers])
    summary.write_run_summary(records, output, log, len(records), CONFIG)
    bill.record_run(SETTINGS, MODEL, workflow, records, summary.STARTED)


def reported(name, caption):  # a results file in the --report, with its caption
    return report(
        f"{RESULTS}/{name}", caption=f"report/{caption}.rst", category="Run summary"
    )


def dataset_answers(wildcards):  # the ranks' answer files, once the cut is known
    manifest = cut.read_manifest(checkpoints.cut_dataset.get().output[0])
    return layout.outputs(RESULTS, cut.rank_files(manifest))
