# A dataset (config key dataset.input) cut into the ranks of data/<name>/ and answered
# in one file, results/<name>.jsonl or .parquet (scripts/dataset/).


checkpoint cut_dataset:
    input:
        DATASET.source,
    output:
        f"{DATA}/{cut.MANIFEST}",
    log:
        "logs/cut_dataset.log",
    params:
        settings=cut.cut_settings(DATASET),
    run:
        cut.cut(DATASET, DATA, log[0])


def dataset_answers(wildcards):  # the ranks' answer files, once the cut is known
    manifest = cut.read_manifest(checkpoints.cut_dataset.get().output[0])
    return layout.outputs(RESULTS, cut.rank_files(manifest))


rule merge_dataset:
    input:
        answers=dataset_answers,
        source=DATASET.source,
    output:
        source.answer_file(config, DATASET),
    log:
        "logs/merge_dataset.log",
    run:
        if DATASET.parquet:
            merge.merge_parquet(
                input.source, input.answers, output[0], DATASET.carry, DATASET.embed
            )
        else:
            merge.merge_jsonl(input.answers, output[0])
