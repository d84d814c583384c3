"""scripts/pbs/snakemake_fixes.py: the same answers as Snakemake's own code, each group
handled once (real Snakemake dry runs of a grouped workflow, and Snakemake's own layer
packing on random resources)."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from snakemake.exceptions import ResourceError
from snakemake.resources import GroupResources

from pbs import snakemake_fixes

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
JOBS = 200

# One group of JOBS jobs (as profiles/aurora packs a submission) that all need one job
# outside the group (as rule infer needs fetch_model); counts how often Snakemake asks
# whether a group is ready and how often it tests a job's membership of a group.
SNAKEFILE = """
import atexit
import os
import sys
from snakemake.dag import DAG
from snakemake.jobs import GroupJob

counts = {{"ready": 0, "member": 0}}
ready, member = DAG._ready, GroupJob.__contains__


def counted_ready(self, job):
    counts["ready"] += 1
    return ready(self, job)


def counted_member(self, job):
    counts["member"] += 1
    return member(self, job)


DAG._ready, GroupJob.__contains__ = counted_ready, counted_member
atexit.register(lambda: print("COUNTS", counts["ready"], counts["member"], file=sys.stderr))
if os.environ.get("FIXES"):
    sys.path.insert(0, {scripts!r})
    from pbs import snakemake_fixes

    snakemake_fixes.apply()


rule all:
    input:
        expand("out/{{i}}.txt", i=range({jobs})),


rule prepare:
    output:
        "prepared.txt",
    shell:
        "touch {{output}}"


rule job:
    input:
        {job_input},
    output:
        "out/{{i}}.txt",
    group:
        "node"
    resources:
        tiles=1,
    shell:
        "touch {{output}}"


rule back:
    input:
        "out/0.txt",
    output:
        "back.txt",
    shell:
        "touch {{output}}"
"""


def dry_run(tmp_path: Path, fixes: bool, job_input: str = '"prepared.txt"'):
    """(return code, the plan without times and ids, ready asks, membership tests)."""
    folder = tmp_path / ("fixed" if fixes else "original")
    folder.mkdir()
    (folder / "Snakefile").write_text(
        SNAKEFILE.format(scripts=str(SCRIPTS), jobs=JOBS, job_input=job_input)
    )
    env = {**os.environ, "FIXES": "1" if fixes else ""}
    argv = [sys.executable, "-m", "snakemake", "-n", "--cores", str(JOBS)]
    argv += ["--group-components", f"node={JOBS}", "--executor", "cluster-generic"]
    argv += ["--cluster-generic-submit-cmd", "false", "--jobs", "1"]
    result = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True)
    counts = re.search(r"COUNTS (\d+) (\d+)", result.stderr)
    assert counts, result.stderr[-3000:]
    plan = sorted(
        # file lists come in set order: compare each line's words sorted
        " ".join(sorted(re.split(r"[ ,]+", re.sub(r"\[[^]]*\d\d:\d\d:\d\d[^]]*\]", "", line))))
        for line in (result.stdout + result.stderr).replace(str(folder), "FOLDER").splitlines()
        if not re.match(r"COUNTS|\s*(Date|Workflow ID):", line)
    )
    return result.returncode, plan, int(counts.group(1)), int(counts.group(2)), result


def test_grouped_dry_run_same_plan_each_group_once(tmp_path):
    code, plan, ready, member, result = dry_run(tmp_path, fixes=False)
    assert code == 0, result.stderr[-3000:]
    fixed_code, fixed_plan, fixed_ready, fixed_member, fixed = dry_run(tmp_path, fixes=True)
    assert fixed_code == 0, fixed.stderr[-3000:]
    assert fixed_plan == plan
    assert (fixed.stdout + fixed.stderr).count("Group job node") == 1  # one submission
    # Snakemake alone asks about the group once per member (and walks it each time) and
    # checks each member's membership once per member: JOBS x JOBS
    assert ready >= JOBS and member >= JOBS * JOBS
    # with the fixes: once per group (plus the jobs outside it), once per member
    assert fixed_ready <= 20
    assert fixed_member <= 3 * JOBS


def test_group_that_depends_on_itself_still_refused(tmp_path):
    # job 0 -> back (outside the group) -> every other member: leaves the group and
    # comes back, which Snakemake's group check refuses
    job_input = 'lambda w: [] if w.i == "0" else ["back.txt"]'
    for fixes in (False, True):
        code, _, _, _, result = dry_run(tmp_path, fixes=fixes, job_input=job_input)
        assert code != 0
        assert "depends on itself" in result.stdout + result.stderr, result.stdout[-3000:]


def original_layers():
    """Snakemake's own ``_get_layers`` (the fixes may be applied in this process)."""
    function = GroupResources.__dict__["_get_layers"].__func__
    return getattr(function, "__wrapped__", function).__get__(GroupResources)


@pytest.mark.parametrize("seed", range(40))
def test_layers_as_snakemake_packs_them(seed):
    rng = random.Random(seed)
    jobs = rng.randint(0, 60)
    resources = {
        "_cores": [rng.randint(0, 4) for _ in range(jobs)],
        "tiles": [rng.choice([0, 1, 1, 2]) for _ in range(jobs)],
        "runtime": [rng.choice([5, 10, 10, 30]) for _ in range(jobs)],
    }
    constraints = [rng.choice([None, 4, 8, 100]), rng.choice([None, 2, 12]), None]
    sortby = rng.choice([None, ["runtime"], ["missing"]])
    expected = original_layers()(resources, constraints, sortby)
    got = snakemake_fixes.first_fit_layers(
        GroupResources._check_constraint, resources, constraints, sortby
    )
    assert got == expected


def test_layers_too_big_job_gets_snakemakes_error():
    class Patched(GroupResources):
        pass

    Patched._get_layers = GroupResources.__dict__["_get_layers"]  # own attribute to patch
    assert snakemake_fixes.layers_with_sums(Patched)
    assert not snakemake_fixes.layers_with_sums(Patched)  # once only
    resources = {"_cores": [1, 9], "tiles": [1, 1]}
    with pytest.raises(ResourceError, match="_cores: 9/4"):
        Patched._get_layers(resources, [4, None])
    assert Patched._get_layers({"_cores": [3, 2, 1]}, [4]) == [[(3,), (1,)], [(2,)]]


# A local run: rule gather has one input per job (as rule summary has one per rank);
# a pipe pair checks that a pipe input is still seen as one. Every answer of
# Job.is_pipe_or_service_input is compared with Snakemake's own scan.
RUN_SNAKEFILE = """
import atexit
import os
import sys
from snakemake.jobs import Job

answers = {{"checked": 0, "pipe": 0, "scans": 0}}
scan = Job.is_pipe_or_service_input


def counted_scan(self, path):
    answers["scans"] += 1
    return scan(self, path)


Job.is_pipe_or_service_input = counted_scan
if os.environ.get("FIXES"):
    sys.path.insert(0, {scripts!r})
    from pbs import snakemake_fixes

    snakemake_fixes.apply()
answer = Job.is_pipe_or_service_input


def compared(self, path):
    got = answer(self, path)
    assert got == scan(self, path), path
    answers["checked"] += 1
    answers["pipe"] += got
    return got


Job.is_pipe_or_service_input = compared
atexit.register(lambda: print("ANSWERS", *answers.values(), file=sys.stderr))


rule all:
    input:
        "gathered.txt",
        "read.txt",


rule job:
    output:
        "out/{{i}}.txt",
    run:
        open(output[0], "w").close()


rule gather:
    input:
        expand("out/{{i}}.txt", i=range({jobs})),
    output:
        "gathered.txt",
    run:
        open(output[0], "w").write(str(len(input)))


rule write_pipe:
    output:
        pipe("piped.txt"),
    shell:
        "echo through > {{output}}"


rule read_pipe:
    input:
        "piped.txt",
    output:
        "read.txt",
    shell:
        "cat {{input}} > {{output}}"
"""


@pytest.mark.parametrize("fixes", [False, True])
def test_preparing_a_job_with_many_inputs(tmp_path, fixes):
    jobs = 60
    (tmp_path / "Snakefile").write_text(RUN_SNAKEFILE.format(scripts=str(SCRIPTS), jobs=jobs))
    env = {**os.environ, "FIXES": "1" if fixes else ""}
    argv = [sys.executable, "-m", "snakemake", "--cores", "2", "--force-use-threads"]
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "gathered.txt").read_text() == str(jobs)
    assert (tmp_path / "read.txt").read_text() == "through\n"
    checked, pipe, scans = map(int, re.search(r"ANSWERS (\d+) (\d+) (\d+)", result.stderr).groups())
    assert checked >= jobs + 1 and pipe == 1  # every input asked; the pipe seen as one
    # Snakemake scans the dependencies for every input; with the fixes, never
    assert scans == (0 if fixes else checked)


def test_the_fixes_apply_only_to_the_snakemake_they_were_written_for(monkeypatch, capsys):
    import snakemake
    import snakemake.api  # noqa: F401  (loads snakemake.dag as Snakemake itself does)

    assert snakemake_fixes.apply() is True  # the pinned one (requirements.lock)
    monkeypatch.setattr(snakemake, "__version__", "9.28.0")
    assert snakemake_fixes.apply() is False
    assert "Snakemake 9.28.0 is not 9.27.x" in capsys.readouterr().err


def test_a_second_grouping_pass_gets_fresh_groups_not_merged_ones():
    from types import SimpleNamespace

    import snakemake.api  # noqa: F401  (loads snakemake.dag as Snakemake itself does)

    snakemake_fixes.apply()
    from snakemake.jobs import GroupJobFactory

    dag = SimpleNamespace(workflow=SimpleNamespace(execution_settings=SimpleNamespace(attempt=1)))

    class Job(SimpleNamespace):  # what GroupJob asks of a member: its DAG
        __hash__, __eq__ = object.__hash__, object.__eq__

    a, b = Job(dag=dag), Job(dag=dag)
    factory = GroupJobFactory()
    first, second = factory.new("node", [a], None), factory.new("node", [b], None)
    first.merge(second)  # group-components packed them into one submission
    assert set(first.jobs) == {a, b}
    again = factory.new("node", [a], None)  # the DAG grouped anew (after a checkpoint)
    assert set(again.jobs) == {a} and again is not first
    assert factory.new("node", [a], None) is again  # unmerged ones still cached


TIMERS_SNAKEFILE = """
import sys
import threading

sys.path.insert(0, {scripts!r})
from pbs import snakemake_fixes


def scheduler_timers():
    return sum(
        1
        for t in threading.enumerate()
        if isinstance(t, threading.Timer)
        and not t.finished.is_set()  # pending: neither run nor cancelled
        and t.function.__code__.co_filename.endswith(snakemake_fixes.SCHEDULER_FILE)
    )


rule all:
    input:
        expand("out/{{i}}.txt", i=range(6)),


rule job:
    output:
        "out/{{i}}.txt",
    run:
        open(output[0], "w").close()


onsuccess:
    print("LEFT", scheduler_timers(), file=sys.stderr)
    if {fix}:
        print("CANCELLED", snakemake_fixes.end_without_rate_limit_timers(), file=sys.stderr)
    print("AFTER", scheduler_timers(), file=sys.stderr)
"""


@pytest.mark.parametrize("fix", [False, True])
def test_a_finished_run_leaves_no_rate_limit_timer_to_wait_for(tmp_path, fix):
    """Snakemake's job rate limiter starts a one-second timer (not a daemon thread) in
    each round that leaves jobs waiting: Python's exit waited for the last one. After
    end_without_rate_limit_timers none is left; without it, one is."""
    (tmp_path / "Snakefile").write_text(TIMERS_SNAKEFILE.format(scripts=str(SCRIPTS), fix=fix))
    # one core: five of the six jobs wait in the first rounds
    argv = [sys.executable, "-m", "snakemake", "--cores", "1", "--force-use-threads"]
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    left = int(re.search(r"LEFT (\d+)", result.stderr).group(1))
    after = int(re.search(r"AFTER (\d+)", result.stderr).group(1))
    assert left >= 1  # what the fix is for: a timer still pending when the run ends
    if fix:
        assert int(re.search(r"CANCELLED (\d+)", result.stderr).group(1)) == left
        assert after == 0
    else:
        assert after == left
