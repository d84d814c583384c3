"""The bill before the qsub: what a dataset's run will cost, from the history of earlier
runs of the same model and engine settings (formats/history.py), printed by the dry run
and at the start of a real run; the walltime each PBS submission asks for; the budget
(config key pbs.budget_node_hours).

The estimate: a request costs the node-seconds that requests of the history's run cost
while engines served them or waited between them (reporting/accounting.py's "serving" and
"idle"; engines that served no request, idle for want of ranks, left out); each node of
a submission adds the history's set-up, engine start and stop.
A submission's walltime is its estimate plus pbs.estimate_margin_percent, plus
pbs.walltime_margin_minutes; warm.start_minutes and warm.rank_minutes, when set, are
used instead (unset and with no history: 15 and 1, as before).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from formats import history
from formats.settings import Settings
from pbs import plan, submission
from pbs.settings import PbsConfigError, profile_in_use, provider_settings, run_info
from placement import node_layout
from reporting import accounting


@dataclass(frozen=True)
class Estimate:
    entry: Mapping  # the history line it rests on

    @property
    def node_s_per_request(self) -> float:
        return self.entry["work_node_s"] / self.entry["requests"]

    @property
    def fixed_s(self) -> float:
        return self.entry["fixed_s"]

    def seconds(self, requests: int, nodes: int) -> float:
        """Wall seconds of ``requests`` on ``nodes`` nodes (one submission)."""
        return self.fixed_s + requests * self.node_s_per_request / max(1, nodes)

    @property
    def ranks_at_once(self) -> int | None:
        """Most ranks a node had in flight in the run it rests on (None in history lines
        written before 2026-12-07)."""
        return self.entry.get("ranks_at_once")

    def rests_on(self) -> str:
        e = self.entry
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["written_at"]))
        return (
            f"the run of {when} ({e['where']}, {e['requests']:,} requests, "
            f"{e['output_tokens']:,} output tokens, model {e['model']}, engine {e['engine']}): "
            f"{1000 * self.node_s_per_request:.3g} node-ms per request, "
            f"{self.fixed_s:.0f} s of set-up and engine start per node"
        )


def where(workflow) -> str:
    return "pbs" if profile_in_use(run_info(workflow).configfiles) else "local"


def estimate_of(config: Mapping, model: str, where: str, path=history.PATH) -> Estimate | None:
    entry = history.latest(history.settings_key(config, model, where), path)
    return Estimate(entry) if entry else None


def run_config(
    settings: Settings, data: str, results: str, estimate: Estimate | None, rank_size: int
) -> Settings:
    """The settings the ranks and the PBS provider see: data_dir and results_dir the rank
    folders; warm.start_minutes and warm.rank_minutes, when unset, from the estimate of a
    dataset's ranks plus the margin."""
    warm, tiles = settings.warm, settings.tiles
    margin = 1 + settings.pbs.estimate_margin_percent / 100
    engines = node_layout.engines_per_node(tiles.per_node, tiles.per_job)
    minutes = {}
    for key in ("start_minutes", "rank_minutes"):
        if getattr(warm, key) is not None or estimate is None:
            continue  # unset and no estimate: pbs/settings.py's 15 and 1
        if key == "start_minutes":
            minutes[key] = math.ceil(estimate.fixed_s * margin / 60)
        else:  # one rank's minutes on one engine of a node
            minutes[key] = rank_size * estimate.node_s_per_request * engines * margin / 60
    warm = dataclasses.replace(warm, **minutes)
    return dataclasses.replace(settings, data_dir=data, results_dir=results, warm=warm)


def spent_node_hours(log_dir: str = "logs/pbs") -> float:
    return submission.spent_node_hours(log_dir)


def bill(
    requests: int,
    ranks: int,
    pending: Sequence[int],
    settings: Mapping,
    estimate: Estimate | None,
    pbs: bool,
    margin_percent: float = 0,
    budget: float | None = None,
    spent: float = 0.0,
    dataset: bool = True,
) -> tuple[str, float | None]:
    """The bill's text, and the estimated node-hours of the ``pending`` ranks (their
    request counts); without a history, with PBS the node-hours the walltimes ask for
    (else None)."""
    left = sum(pending)
    text = f"Bill: {requests:,} requests in {ranks:,} ranks; to run: {left:,} requests in "
    text += f"{len(pending):,} ranks"
    hours = asked = submissions = None
    if pbs:
        submissions = plan.plan_run(len(pending), settings)
        shapes, at, hours, walls = Counter(), 0, 0.0, []
        for jobs, nodes in submissions:
            shapes[nodes] += 1
            share = sum(pending[at : at + jobs])
            at += jobs
            if estimate is not None:
                hours += nodes * estimate.seconds(share, nodes) / 3600
            walls.append(plan.format_walltime(plan.submission_minutes(settings, jobs, nodes)))
        nodes_text = ", ".join(
            f"{n} x {k} node(s)" for k, n in sorted(shapes.items(), reverse=True)
        )
        text += f"; {len(submissions)} submission(s) ({nodes_text or 'none'})"
        if submissions:
            asked = sum(
                nodes * plan.submission_minutes(settings, jobs, nodes) / 60
                for jobs, nodes in submissions
            )
            text += f", walltime {', '.join(dict.fromkeys(walls))}, at most {asked:.2f} node-hours"
        if estimate is None:
            hours = asked
    elif estimate is not None:
        hours = estimate.seconds(left, 1) / 3600
    busiest = at_once(pending, settings, submissions)
    if estimate is None:
        # as many ranks as a node of this run has at once: a sample as busy bills it closest
        ranks = max(1, busiest)
        sample = (
            f"the first {max(1, sum(pending[:ranks])):,} lines as a dataset of their own"
            if dataset
            else f"a data_dir of {ranks} of the rank files"
        )
        text += (
            ". No estimate: no earlier run of this model and these engine settings here "
            f"({history.PATH}); run a small sample first (e.g. {sample}: {ranks} ranks, as "
            "many as a node of this run has at once) and the next dry run bills from it"
        )
    else:
        text += f". Estimate {hours:.3g} node-hours, resting on {estimate.rests_on()}"
        text += busier_note(estimate, busiest)
        if pbs:
            text += (
                f"; walltimes are the estimate + {margin_percent:g}% "
                f"+ {settings['walltime_margin_minutes']} min"
            )
    if budget is not None and estimate is None and hours is not None:
        text += f". Held against the budget: the {hours:.2f} node-hours the walltimes ask for"
    if budget is not None:
        text += f". Budget {budget:g} node-hours (pbs.budget_node_hours), {spent:.3f} spent"
    return text + ".", hours


# A run this many times busier than the one its estimate rests on gets a note in the bill.
BUSIER = 1.5


def at_once(pending: Sequence[int], settings: Mapping, submissions=None) -> int:
    """Most ranks a node will have in flight in this run: its engines' rank slots
    (engines x warm.ranks_per_engine), or fewer when a submission has fewer ranks."""
    slots = plan.jobs_per_node(settings) * plan.ranks_per_job_slot(settings)
    if submissions is None:  # local: one node
        return min(len(pending), slots)
    return max((min(math.ceil(j / n), slots) for j, n in submissions), default=0)


def busier_note(estimate: Estimate, ranks: int) -> str:
    """When this run keeps its nodes busier than the run the estimate rests on: engines
    answer more requests per second with more in flight, so the estimate is likely high
    (OpenPBS test cluster, echo engines, 2026-12-07: 10,000 requests, 20 ranks at once
    on a node, billed from a sample of 2 ranks at 1.78 times what they cost, from a
    sample of 20 ranks at 0.97 times)."""
    sample = estimate.ranks_at_once
    if not sample or ranks < BUSIER * sample:
        return ""
    return (
        f"; the run it rests on had up to {sample} ranks at once on a node, this one up to "
        f"{ranks}: engines answer more per second when busier, so the estimate is likely "
        f"high (a sample of {ranks} ranks bills at this run's load)"
    )


def budget_problem(hours: float | None, budget: float | None, spent: float) -> str | None:
    """Why the run must not start, or None."""
    if budget is None or hours is None:
        return None
    left = budget - spent
    if hours > left:
        return (
            f"the estimate of {hours:.3f} node-hours is above the budget left ({left:.3f} of "
            f"{budget:g} node-hours, config key pbs.budget_node_hours) by {hours - left:.3f}: "
            "raise the budget, or run fewer requests"
        )
    return None


def announce(workflow, text_and_hours, budget, spent, stream=None) -> None:
    """Print the bill in the main Snakemake (dry runs too); stop on the budget."""
    import sys

    if not run_info(workflow).main:
        return
    text, hours = text_and_hours()
    print(text, file=stream or sys.stderr)
    problem = budget_problem(hours, budget, spent)
    if problem:
        raise PbsConfigError(f"Stopped before any qsub: {problem}")


# ------------------------------------------------------------------ the Snakefile's calls


def pending_requests(dataset, data: str, results: str, ranks: list[str], marker) -> tuple:
    """(requests, ranks, request counts of the ranks to run) of a dataset's run (counted
    once per process: the bill and the PBS plan line both ask)."""
    key = (dataset, data, results, tuple(ranks), tuple(marker))
    if key not in _PENDING:
        _PENDING[key] = _pending_requests(dataset, data, results, ranks, marker)
    return _PENDING[key]


_PENDING: dict = {}


def _pending_requests(dataset, data: str, results: str, ranks: list[str], marker) -> tuple:
    from rank import layout

    from . import cut

    if dataset is None:  # rank files: each one's requests
        counts = {r: layout.count_requests(layout.input_file(data, r)) for r in ranks}
        pending = layout.pending_ranks(ranks, data, results, marker)
        return sum(counts.values()), len(ranks), [counts[r] for r in pending]
    manifest = cut.current_manifest(dataset, data)
    if manifest is not None:
        sizes = manifest["sizes"]
        pending = layout.pending_ranks(ranks, data, results, marker)
        return manifest["requests"], len(sizes), [sizes[int(r)] for r in pending]
    # not cut yet, or changed since: its requests now; an earlier cut's full ranks are
    # taken as kept (lines appended), whose answers exist
    requests = cut.count_requests(dataset)
    size = dataset.rank_size
    count = math.ceil(requests / size)
    sizes = [min(size, requests - r * size) for r in range(count)]
    old = cut.read_manifest(cut.manifest_path(data))
    kept = 0
    if old and old.get("settings") == cut.cut_settings(dataset) and old["requests"] <= requests:
        kept = old["requests"] // size
        done = set(layout.pending_ranks([str(r) for r in range(kept)], data, results, marker))
        kept = kept if not done else min(int(r) for r in done)
    return requests, count, sizes[kept:]


def prepare(workflow, settings: Settings, dataset, data, results, model, ranks, marker) -> Settings:
    """The run's settings for the ranks and the PBS provider (`run_config`); the bill
    printed (dry runs too) and the budget checked, in the main Snakemake. Rank files: a
    rank's size for the walltime is the mean of the ranks to run."""
    place = where(workflow)
    main = run_info(workflow).main
    estimate = estimate_of(settings.config(), model, place) if dataset or main else None
    if dataset:
        size = dataset.rank_size
    elif estimate is not None:
        pending = pending_requests(dataset, data, results, ranks, marker)[2]
        size = math.ceil(sum(pending) / len(pending)) if pending else 1
    else:
        size = 0
    resolved = run_config(settings, data, results, estimate, size)
    if not main:
        return resolved
    budget = settings.pbs.budget_node_hours if place == "pbs" else None
    spent = spent_node_hours() if budget is not None else 0.0

    def text_and_hours():
        requests, count, pending = pending_requests(dataset, data, results, ranks, marker)
        return bill(
            requests, count, pending, provider_settings(resolved), estimate, place == "pbs",
            settings.pbs.estimate_margin_percent, budget, spent, dataset is not None,
        )  # fmt: skip

    def remembered():
        text, hours = text_and_hours()
        ESTIMATE["node_hours"] = hours if estimate is not None else None
        return text, hours

    announce(workflow, remembered, budget, spent)
    return resolved


ESTIMATE: dict = {}  # this run's estimate, for the end-of-run summary


def estimate_against_spending(config: Mapping, record_paths, since: float) -> str:
    """The end of a dataset's run: the bill's estimate beside the node-hours used."""
    from reporting import summary

    mine = [r for r in summary.read_records(record_paths) if r.get("_end", 0) >= since]
    if not mine or "node_hours" not in ESTIMATE:
        return ""
    subs = accounting.submissions(mine, tile_slots=accounting.tile_slots(config))
    used = sum(s.used_s for s in subs) / 3600
    hours = ESTIMATE["node_hours"]
    if hours is None:
        return f"Bill against spending: no estimate (no earlier run); used {used:.4f} node-hours."
    ratio = f" ({100 * (used - hours) / hours:+.0f}%)" if hours > 0 else ""
    return f"Bill against spending: estimated {hours:.4f} node-hours, used {used:.4f}{ratio}."


def unused_node_s(sub: accounting.Submission, tile_slots: int | None) -> float:
    """Node-seconds of ``sub``'s engines (per-rank engines: tile slots) that served no
    request between its set-up and its last rank: idle the whole time, as when a sample
    has fewer ranks than engines. A run with work for every engine does not pay them
    per request, so the estimate leaves them out of a request's cost."""
    times = (sub.start, sub.staged, sub.ranks_done, sub.end)
    served = accounting.account(sub.slots, sub.hosts, *times, tile_slots, served_only=True)
    return sum(sub.parts[part] - served[part] for part in ("serving", "idle"))


def ranks_at_once(subs: Sequence[accounting.Submission], settings: Mapping) -> int:
    """Most ranks a node of this run had in flight (`at_once` of its submissions)."""
    ranks = [(sum(len(slot.records) for slot in sub.slots), sub.nodes) for sub in subs]
    return at_once([1] * sum(r for r, _ in ranks), settings, ranks)


def record_run(settings: Settings, model: str, workflow, record_paths, since: float) -> None:
    """Rule summary: the history line of the ranks this run answered (none: no line)."""
    from reporting import summary

    mine = [r for r in summary.read_records(record_paths) if r.get("_end", 0) >= since]
    if not mine:
        return
    config = settings.config()
    slots = accounting.tile_slots(config)
    subs = accounting.submissions(mine, tile_slots=slots)
    nodes = sum(s.nodes for s in subs) or 1
    place = where(workflow)
    history.append(
        {
            "settings": history.settings_key(config, model, place),
            "model": model,
            "engine": config["engine"],
            "where": place,
            "requests": sum(r["prompts"] for r in mine),
            "ranks": len(mine),
            "output_tokens": sum(r["output_tokens"] for r in mine),
            "prompt_tokens": sum(r.get("prompt_tokens", 0) for r in mine),
            "nodes": nodes,
            "node_s": sum(s.used_s for s in subs),
            "work_node_s": sum(
                s.parts["serving"] + s.parts["idle"] - unused_node_s(s, slots) for s in subs
            ),
            "fixed_s": sum(s.parts[p] for s in subs for p in ("setup", "engine_start", "stop"))
            / nodes,
            "ranks_at_once": ranks_at_once(subs, provider_settings(settings)),
        }
    )


def print_against_spending(config: Mapping, results: str, ranks, stream=None) -> None:
    """onsuccess: `estimate_against_spending`, never failing the run."""
    import sys

    from rank import layout
    from reporting import summary

    try:
        text = estimate_against_spending(config, layout.records(results, ranks), summary.STARTED)
    except (OSError, ValueError, KeyError, TypeError) as error:
        text = f"Bill against spending unavailable: {error}"
    if text:
        print(text, file=stream or sys.stderr, flush=True)
