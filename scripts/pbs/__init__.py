"""PBS provider for profiles/aurora.

Snakemake's cluster-generic executor calls three small commands of the profile:
``pbs-submit <jobscript>``, ``pbs-status <jobid>`` and ``pbs-cancel <jobid>...``
(`commands`). They are children of the main Snakemake process and read this
provider's settings from the environment variable ``AURORA_PBS_SETTINGS``, which the
Snakefile fills with `export_settings` when it loads. No config value ever passes
through a shell: qsub, qstat and qdel are started with argument lists.

- `settings`: what the commands need of the run's settings;
- `plan`: Aurora's queues, the checks of a plan, packing, the dry run's plan;
- `submission`: one submission's plan, jobscript and qsub;
- `parse`: what qstat prints, JSON and text, read into running/success/failed;
- `status`: one query per polling round, holds, vanished jobs, qdel, the watchdog.

May import formats/, console, placement/, engine/ (the key file, the supervisor's
variable, the client's health check), rank/ (rank files), model/ (rule fetch_model's
checks) and reporting/ (the progress lines of its status rounds). Stdlib only, so the
commands work with whatever Python runs Snakemake.
"""

from .parse import FAILED, FINAL, RUNNING, SUCCESS, QueryError, Verdict, verdict
from .plan import (
    AURORA_QUEUES,
    QueueLimits,
    announce_plan,
    check_settings,
    describe_plan,
    expected_group_size,
    export_settings,
    format_walltime,
    group_packing_problems,
    node_group,
    plan_run,
    queue_problems,
    settings_problems,
)
from .settings import (
    SETTINGS_VARIABLE,
    PbsConfigError,
    RunInfo,
    load_settings,
    profile_in_use,
    provider_settings,
)
from .state import StateStore, new_job_record
from .status import cancel, job_status, query_scheduler, watch
from .submission import (
    SETUP_MARKER,
    Plan,
    SubmitError,
    insert_setup,
    job_name,
    job_ranks,
    plan_submission,
    qsub_argv,
    read_properties,
    submit,
)

__all__ = [
    "AURORA_QUEUES",
    "FAILED",
    "FINAL",
    "RUNNING",
    "SETTINGS_VARIABLE",
    "SETUP_MARKER",
    "SUCCESS",
    "PbsConfigError",
    "Plan",
    "QueryError",
    "QueueLimits",
    "RunInfo",
    "StateStore",
    "SubmitError",
    "Verdict",
    "announce_plan",
    "cancel",
    "check_settings",
    "describe_plan",
    "expected_group_size",
    "export_settings",
    "format_walltime",
    "group_packing_problems",
    "insert_setup",
    "job_name",
    "job_ranks",
    "job_status",
    "load_settings",
    "new_job_record",
    "node_group",
    "plan_run",
    "plan_submission",
    "profile_in_use",
    "provider_settings",
    "qsub_argv",
    "query_scheduler",
    "queue_problems",
    "read_properties",
    "settings_problems",
    "submit",
    "verdict",
    "watch",
]
