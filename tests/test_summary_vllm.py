"""The run report of a real engine run (profiles/local, the tiny model): the table and
the paragraph equal the records, every rank with its load time and speed. The rest of
the report on echo runs: tests/test_summary.py."""

import pytest

from reporting import summary
from test_summary import check_summary
from workflow import local_config, make_workdir, snakemake

pytestmark = pytest.mark.vllm


def test_summary_of_a_real_engine_run(tmp_path):
    work = make_workdir(tmp_path, {"0.in": "Hello there\nThe sky is\n", "3.in": "Once upon\n"})
    sampling = dict(temperature=0.8, top_p=0.95, max_tokens=8, seed=7, ignore_eos=True)
    result = snakemake(work, configfiles=local_config(work, sampling=sampling))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    check_summary(work, result.stderr, ["0", "3"])
    rows = summary.parse_tsv((work / "results" / "summary.tsv").read_text())
    assert [row["output_tokens"] for row in rows] == [16, 8]  # ignore_eos: max_tokens each
    assert all(row["load_s"] > 0 and row["tokens_per_s"] > 0 for row in rows)
