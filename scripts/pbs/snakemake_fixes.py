"""Work-arounds for Snakemake costs that grow with the square of a group's size.

profiles/aurora packs all rank jobs of a submission into one Snakemake group (30,720
in a ``prod`` submission of 256 nodes x 12 engines x 10 ranks). Snakemake 9.27 takes
n x n steps for n rank jobs in four places of the main Snakemake, three before its
``qsub`` (2026-12-03: ``snakemake -n`` at 10,000 ranks with the first fixed, 240 s of
CPU, 94 % in the other two by py-spy, 17 s with all three; at 30,720 ranks with none,
still in the group check after 10 minutes) and one after:

- ``DAG._check_groups`` loops over ``self._group``, a map from every job to its group,
  so checks each group once per member, every member each time;
- ``DAG.update_ready`` asks ``DAG._ready`` of every member of a group (and once more in
  a debug message that is built even when not shown), and ``_ready`` of a member walks
  the whole group;
- ``GroupResources._get_layers`` re-adds every job already placed in a layer for each
  job it places;
- after the submission, ``Job.prepare`` of rule summary (one input per rank) asks
  ``Job.is_pipe_or_service_input`` of each input, which scans the job's dependencies
  (one per rank) for the one that makes it.

`apply` replaces each with code that gives the same answer in linear time: the group
check and the readiness test are Snakemake's own, asked once per group; the layers are
Snakemake's first-fit packing with each layer's sums kept (its own constraint test on
them; a job that fits no layer goes back to Snakemake's code for its error); while a job
prepares, its inputs' makers are looked up in an index of its dependencies' files.
tests/test_snakemake_fixes.py compares each with the original.
"""

from __future__ import annotations

import functools
import operator
import os
import sys
import threading

# The Snakemake whose code these replacements were written against and tested with
# (requirements.lock pins it); another one runs unpatched, saying so.
FOR_VERSION = "9.27."
# Where JobScheduler._schedule_reevalutation makes its timers' function.
SCHEDULER_FILE = os.path.join("snakemake", "scheduling", "job_scheduler.py")


def apply() -> bool:
    """Install the replacements (idempotent). Only inside Snakemake; False (and a
    warning) when Snakemake is not the version they were written for."""
    import snakemake

    if not snakemake.__version__.startswith(FOR_VERSION):
        print(
            f"snakemake_fixes: Snakemake {snakemake.__version__} is not {FOR_VERSION}x; "
            "its own group handling is used (quadratic in a submission's ranks)",
            file=sys.stderr,
        )
        return False
    from snakemake.dag import DAG
    from snakemake.jobs import GroupJobFactory, Job
    from snakemake.resources import GroupResources

    check_each_group_once(DAG)
    ready_once_per_group(DAG)
    layers_with_sums(GroupResources)
    inputs_indexed_while_preparing(Job)
    no_merged_groups_from_the_cache(GroupJobFactory)
    status_command_survives_ctrl_c()
    return True


def _patch(cls, name: str, make) -> bool:
    original = getattr(cls, name)
    if getattr(original, "snakemake_fix", False):
        return False
    replacement = make(original)
    replacement.snakemake_fix = True
    setattr(cls, name, replacement)
    return True


def status_command_survives_ctrl_c() -> bool:
    """cluster-generic 1.0.9 runs the status command as ``sh -c "<cmd> '<id>'"``. A
    terminal's Ctrl-C reaches that shell too, and dash, which does not exec the command,
    dies of it while pbs-status (which ignores SIGINT) goes on; the plugin then fails
    with "cannot access local variable 'ret'" and never cancels the run's submissions
    (the watchdog deleted them a few seconds later). With ``exec`` the shell becomes
    the status command. Not a cost fix: a wrong answer of the plugin fixed."""
    try:
        from snakemake_executor_plugin_cluster_generic import Executor
    except ImportError:
        return False

    def make(original):
        def __post_init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            settings = self.workflow.executor_settings
            command = settings.status_cmd
            if command and not command.startswith("exec "):
                settings.status_cmd = f"exec {command}"

        return __post_init__

    patched = _patch(Executor, "__post_init__", make)
    return cancel_covers_the_jobs_being_checked(Executor) and patched


def cancel_covers_the_jobs_being_checked(executor_class) -> bool:
    """RemoteExecutor._wait_for_jobs takes the jobs out of ``active_jobs`` while it asks
    for their status, and puts back those still running: a Ctrl-C in that window (a
    status query takes a second or more) cancelled none of them, as ``cancel`` read the
    empty list (the watchdog deleted them once Snakemake was gone). The jobs being asked
    about are kept aside, and ``cancel`` passes them on too (pbs-cancel skips ended ones).
    """

    def make_check(original):
        async def check_active_jobs(self, active_jobs):
            self.jobs_being_checked = list(active_jobs)
            try:
                async for job in original(self, active_jobs):
                    yield job
            finally:
                self.jobs_being_checked = []

        return check_active_jobs

    def make_cancel(original):
        def cancel(self):
            with self.lock:
                listed = {id(job) for job in self.active_jobs}
                checked = getattr(self, "jobs_being_checked", ())
                self.active_jobs.extend(j for j in checked if id(j) not in listed)
            return original(self)

        return cancel

    checks = _patch(executor_class, "check_active_jobs", make_check)
    return _patch(executor_class, "cancel", make_cancel) and checks


def end_without_rate_limit_timers() -> int:
    """Cancel the timers that Snakemake's job rate limiter (``--max-jobs-per-timespan``,
    100/1s by default) left behind; their number. Each scheduling round that leaves
    jobs waiting starts a ``threading.Timer`` of the timespan (one second) to wake the
    scheduler again; the timers are not daemon threads, so Python's exit waits for the
    last one: 0.9 s of a 20 s local run of 480 ranks (2026-12-07), and as long at the
    end of every PBS node's Snakemake. Called from onsuccess and onerror, once the
    scheduler is done: a timer there would only wake a scheduler that has returned."""
    cancelled = 0
    for thread in threading.enumerate():
        code = getattr(getattr(thread, "function", None), "__code__", None)
        if (
            isinstance(thread, threading.Timer)
            and code is not None
            and code.co_filename.endswith(SCHEDULER_FILE)
            and not thread.finished.is_set()
        ):
            thread.cancel()
            cancelled += 1
    return cancelled


def no_merged_groups_from_the_cache(factory_class) -> bool:
    """A second ``DAG.update_groups`` (the DAG growing after a checkpoint, e.g. a
    dataset's ranks when its cut is already there) gets new groups, not the cached ones
    of its first pass: those were merged into a submission's worth of jobs
    (group-components), and handing a merged one back for one job made overlapping
    groups: two submissions holding one rank, and "Multiple different external jobids
    registered" for the third. Not a cost fix: a wrong answer of 9.27 fixed."""

    def make(original):
        @functools.wraps(original)
        def new(self, id, jobs, resources):
            jobs = frozenset(jobs)
            cached = self.cache.get((id, jobs))
            if cached is not None and frozenset(cached.jobs) != jobs:
                del self.cache[(id, jobs)]
            return original(self, id, jobs, resources)

        return new

    return _patch(factory_class, "new", make)


def check_each_group_once(dag_class) -> bool:
    """``_check_groups`` sees each group once (one entry per distinct group)."""

    def make(original):
        @functools.wraps(original)
        def _check_groups(self):
            by_job = self._group
            self._group = {group: group for group in set(by_job.values())}
            try:
                return original(self)
            finally:
                self._group = by_job

        return _check_groups

    return _patch(dag_class, "_check_groups", make)


def ready_once_per_group(dag_class) -> bool:
    """Within one ``update_ready`` call, ``_ready`` of a grouped job is asked once per
    group: its answer is about the whole group, and nothing it reads changes during the
    call."""

    def make(original):
        @functools.wraps(original)
        def update_ready(self, jobs=None):
            ready = type(self)._ready
            answers = {}

            def once_per_group(job):
                group = self._group.get(job)
                if group is None:
                    return ready(self, job)
                if group not in answers:
                    answers[group] = ready(self, job)
                return answers[group]

            self._ready = once_per_group  # shadows the method for this call only
            try:
                return original(self, jobs)
            finally:
                del self._ready

        return update_ready

    return _patch(dag_class, "update_ready", make)


def layers_with_sums(resources_class) -> bool:
    """``_get_layers`` keeps each layer's resource sums instead of re-adding the layer."""

    def make(original):
        function = original.__func__

        @functools.wraps(function)
        def _get_layers(cls, resources, constraints, sortby=None):
            rows = first_fit_layers(cls._check_constraint, resources, constraints, sortby)
            if rows is None:  # a job fits no layer: Snakemake's code raises its error
                return function(cls, resources, constraints, sortby)
            return rows

        _get_layers.snakemake_fix = True  # seen through the class's bound method
        return classmethod(_get_layers)

    return _patch(resources_class, "_get_layers", make)


def first_fit_layers(check, resources, constraints, sortby=None):
    """Snakemake's ``GroupResources._get_layers`` (9.27): jobs (one tuple of resource
    values each) sorted by their largest share of a constraint, then by ``sortby``, each
    put into the first layer where ``check`` (Snakemake's ``_check_constraint``) passes
    for the layer's sums plus the job. None if a job fits no layer."""

    def highest_proportion(group):
        return max([r / c if c else 0 for r, c in zip(group, constraints, strict=False)])

    ordered = sorted(zip(*resources.values(), strict=False), key=highest_proportion, reverse=True)
    for res in sortby or []:
        if res in resources:
            key = operator.itemgetter(list(resources).index(res))
            ordered = sorted(ordered, key=key, reverse=True)
    rows, sums = [], []
    for group in ordered:
        for row, total in zip(rows, sums, strict=True):
            trial = tuple(s + g for s, g in zip(total, group, strict=False))
            if check([trial], constraints):
                row.append(group)
                total[:] = trial
                break
        else:
            if not check([group], constraints):
                return None
            rows.append([group])
            sums.append(list(group))
    return rows


def inputs_indexed_while_preparing(job_class) -> bool:
    """During ``Job.prepare``, ``is_pipe_or_service_input`` answers from an index of the
    job's dependencies' files (the first dependency making a file decides, as Snakemake's
    scan does), built once per prepare."""
    indexes = {}  # job -> {file: whether its maker marks it pipe or service output}

    def make_prepare(original):
        @functools.wraps(original)
        async def prepare(self):
            index = {}
            for dep, files in self.dag.dependencies[self].items():
                for f in files:
                    if f not in index:
                        index[f] = f in dep.pipe_or_service_output
            indexes[self] = index
            try:
                return await original(self)
            finally:
                indexes.pop(self, None)

        return prepare

    def make_lookup(original):
        @functools.wraps(original)
        def is_pipe_or_service_input(self, path) -> bool:
            index = indexes.get(self)
            return original(self, path) if index is None else index.get(path, False)

        return is_pipe_or_service_input

    patched = _patch(job_class, "prepare", make_prepare)
    return _patch(job_class, "is_pipe_or_service_input", make_lookup) or patched
