# A dataset (config key dataset.input) cut into the ranks of data/<name>/ and answered
# in one file, results/<name>.jsonl or .parquet (scripts/dataset/). Its files: the file,
# or a datasets folder's state.json and shards (a rewritten shard cuts anew).


localrules:
    cut_dataset,
    merge_dataset,


checkpoint cut_dataset:
    input:
        tables.files(DATASET.source),
    output:
        f"{DATA}/{cut.MANIFEST}",
    log:
        "logs/cut_dataset.log",
    params:
        settings=cut.cut_settings(DATASET),
    run:
        cut.cut(DATASET, DATA, log[0])


rule merge_dataset:
    input:
        answers=dataset_answers,
        source=tables.files(DATASET.source),
    output:
        source.answer_file(CONFIG, DATASET),
    log:
        "logs/merge_dataset.log",
    run:
        merge.merge(DATASET, input.answers, output[0])
