"""The run report: per-rank records -> results/summary.tsv, a plot, and one paragraph.

Every rank's task writes a JSON record (scripts/formats/record.py). This module turns the
records of a run into what a user reads at the end of it:

* ``summary.tsv``: one row per rank (rank, prompts, output tokens, load s,
  generation s, output tok/s, host, tile mask), written atomically;
* ``summary.png``: output tok/s and load time per rank;
* a paragraph: ranks done, prompts, tokens, aggregate tok/s, slowest ranks.

Stdlib only at import time: the Snakefile imports it on every dry run, so
matplotlib is imported inside :func:`plot_png` only.
"""

from __future__ import annotations

import io
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: scripts/, not this file's folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from formats import faults, preflight_failure
from formats.files import write_atomic
from formats.record import END_KEY, RecordError, existing_records, read_records
from reporting.accounting import engines_tsv, submissions, submissions_tsv
from reporting.timeline import timeline_png

# (TSV header, record key). Headers keep the record's names, so a row can be
# checked against its record by eye; only the mask gets a clearer name.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("rank", "rank"),
    ("prompts", "prompts"),
    ("output_tokens", "output_tokens"),
    ("load_s", "load_s"),
    ("generate_s", "generate_s"),
    ("tokens_per_s", "tokens_per_s"),
    ("host", "host"),
    ("tile_mask", "mask"),
)
HEADER = tuple(name for name, _ in COLUMNS)
SLOWEST = 3

# ----------------------------------------------------------------------------- table


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # the record's own digits: the table reads back exactly
    # No tab or newline may break the table.
    return " ".join(str(value).split())


def summary_rows(records: Sequence[dict]) -> list[dict]:
    """One row per record: the TSV's columns, values as in the record."""
    return [{name: record[key] for name, key in COLUMNS} for record in records]


def tsv_text(rows: Sequence[dict]) -> str:
    lines = ["\t".join(HEADER)]
    lines += ["\t".join(_cell(row[name]) for name in HEADER) for row in rows]
    return "\n".join(lines) + "\n"


def parse_tsv(text: str) -> list[dict]:
    """The rows of a summary.tsv, numbers as numbers (for tests and tools)."""
    lines = text.splitlines()
    if not lines or tuple(lines[0].split("\t")) != HEADER:
        raise ValueError(f"not a summary table: header is {lines[:1]}")
    numeric = {"rank": int, "prompts": int, "output_tokens": int}
    rows = []
    for line in lines[1:]:
        cells = dict(zip(HEADER, line.split("\t"), strict=True))
        for name in ("load_s", "generate_s", "tokens_per_s"):
            cells[name] = float(cells[name])
        for name, kind in numeric.items():
            cells[name] = kind(cells[name])
        rows.append(cells)
    return rows


# ----------------------------------------------------------------------------- totals


def generation_intervals(
    records: Sequence[dict], counted: str = "output_tokens"
) -> list[tuple[float, float]]:
    """(start, end) of each generating rank's generation, in seconds since the epoch
    (``counted="embedded"``: of each embedding rank's embedding)."""
    return [
        (r[END_KEY] - r["generate_s"], r[END_KEY])
        for r in records
        if r.get(END_KEY) is not None and r.get(counted) and r["generate_s"] > 0
    ]


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of the intervals: seconds in which some engine was generating.

    Engines overlap (12 per Aurora node, ``cores`` at a time locally) and wait
    (queue, model load) in between; the run's aggregate rate is its tokens over
    the time in which at least one of them was generating.
    """
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def totals(records: Sequence[dict]) -> dict:
    """The run's numbers: counts, token rates, and the slowest ranks."""
    tokens = sum(r["output_tokens"] for r in records)
    generate_s = sum(r["generate_s"] for r in records)
    busy = busy_seconds(generation_intervals(records))
    generating = [r for r in records if r["output_tokens"] and r["generate_s"] > 0]
    slowest = sorted(generating, key=lambda r: (r["tokens_per_s"], int(r["rank"])))[:SLOWEST]
    return {
        "ranks": len(records),
        "prompts": sum(r["prompts"] for r in records),
        "output_tokens": tokens,
        "generating_s": busy,
        "aggregate_tokens_per_s": tokens / busy if busy > 0 else 0.0,
        "per_engine_tokens_per_s": tokens / generate_s if generate_s > 0 else 0.0,
        "median_load_s": statistics.median(r["load_s"] for r in records) if records else 0.0,
        "hosts": len({r["host"] for r in records}),
        # embedding ranks: texts embedded, and their tokens
        "embedded": sum(r.get("embedded", 0) for r in records),
        "embedded_tokens": sum(r.get("prompt_tokens", 0) for r in records if r.get("embedded")),
        "embedding_s": busy_seconds(generation_intervals(records, "embedded")),
        # JSONL requests answered with an error line (config vllm.bad_requests)
        "request_errors": sum(r.get("request_errors", 0) for r in records),
        "first_request_errors": [
            e
            for r in sorted(records, key=lambda r: int(r["rank"]))
            for e in r.get("request_error_lines", ())
        ][:SLOWEST],
        "slowest": [
            {key: r[key] for key in ("rank", "tokens_per_s", "host", "mask")} for r in slowest
        ],
    }


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def paragraph(records: Sequence[dict], expected: int | None = None) -> str:
    """The one-paragraph summary printed at the end of a run."""
    t = totals(records)
    done = f"{t['ranks']:,} of {expected:,}" if expected is not None else f"{t['ranks']:,}"
    if not records:
        return f"Run summary: {done} ranks done; no rank has a record yet."
    wait = "median wait for an engine" if warm(records) else "median model load"
    if t["embedded"] and not t["output_tokens"]:  # embedding ranks only
        busy = t["embedding_s"]
        seconds = f"{busy:,.1f}" if busy >= 1 else f"{busy:.3f}"  # a small rank: ms
        text = (
            f"Run summary: {done} ranks done on {t['hosts']:,} host(s): "
            f"{t['prompts']:,} requests, {t['embedded']:,} texts embedded "
            f"({t['embedded_tokens']:,} input tokens), "
            f"{_number(t['embedded'] / busy if busy > 0 else 0.0)} texts/s in the "
            f"{seconds} s in which some engine was embedding; {wait} "
            f"{t['median_load_s']:.1f} s."
        )
    else:
        text = (
            f"Run summary: {done} ranks done on {t['hosts']:,} host(s): "
            f"{t['prompts']:,} prompts, {t['output_tokens']:,} output tokens. "
            f"Aggregate {_number(t['aggregate_tokens_per_s'])} output tok/s in the "
            f"{t['generating_s']:,.1f} s in which some engine was generating "
            f"({_number(t['per_engine_tokens_per_s'])} tok/s per engine); "
            f"{wait} {t['median_load_s']:.1f} s."
        )
        if t["embedded"]:
            text += (
                f" Embedding ranks: {t['embedded']:,} texts embedded "
                f"({t['embedded_tokens']:,} input tokens)."
            )
    if t["slowest"]:
        slow = ", ".join(
            f"{s['rank']} ({_number(s['tokens_per_s'])} tok/s, {s['host']}"
            + (f" tile {s['mask']}" if s["mask"] else "")
            + ")"
            for s in t["slowest"]
        )
        text += f" Slowest ranks: {slow}."
    if t["request_errors"]:
        named = "; ".join(
            f"{e['file']} line {e['line']}: {e['message']}" for e in t["first_request_errors"]
        )
        text += f" {t['request_errors']:,} request(s) answered with an error line (first: {named})."
    return text


# ----------------------------------------------------------------------------- plot


def warm(records: Sequence[dict]) -> bool:
    """Records of warm engines: a wait for an engine and a request, no model load."""
    return bool(records) and all("wait_s" in r and "request_s" in r for r in records)


def plot_png(records: Sequence[dict]) -> bytes:
    """PNG of output tok/s (top) and, per rank, coloured by host (bottom): the model
    load (per-rank engines), or the wait for an engine and the request (warm engines)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    ranks = [int(r["rank"]) for r in records]
    hosts = list(dict.fromkeys(r["host"] for r in records))
    palette = matplotlib.colormaps["tab10"]
    colours = [palette(hosts.index(r["host"]) % 10) for r in records]
    width = min(16.0, max(7.0, 0.2 * len(ranks)))
    figure = Figure(figsize=(width, 6.5), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    panels = [(top, "tokens_per_s", "output tok/s", "generation throughput", "tok/s")]
    if warm(records):
        # Stacked: the wait below (hatched), the request on top of it.
        waits = [float(r["wait_s"]) for r in records]
        requests = [float(r["request_s"]) for r in records]
        if len(ranks) <= 400:
            bottom.bar(ranks, waits, width=0.8, color=colours, alpha=0.35, hatch="//")
            bottom.bar(ranks, requests, width=0.8, bottom=waits, color=colours)
        else:
            bottom.scatter(ranks, waits, s=2, color=colours, alpha=0.35)
            bottom.scatter(
                ranks, [w + q for w, q in zip(waits, requests, strict=True)], s=2, color=colours
            )
        bottom.set_ylabel("s")
        bottom_title = (
            "per rank: wait for an engine (hatched) and request time (solid) "
            f"(medians {_number(statistics.median(waits))} s and "
            f"{_number(statistics.median(requests))} s)"
        )
        bottom.set_title(bottom_title, fontsize=10)
    else:
        panels.append((bottom, "load_s", "load s", "model load time", "s"))
    for axes, key, label, title, unit in panels:
        values = [float(r[key]) for r in records]
        if len(ranks) <= 400:
            axes.bar(ranks, values, width=0.8, color=colours)
        else:  # thousands of bars draw slowly and show nothing more
            axes.scatter(ranks, values, s=2, color=colours)
        if values:
            median = statistics.median(values)
            axes.axhline(median, color="black", linewidth=1, linestyle="--")
            title += f" per rank (dashed: median {_number(median)} {unit})"
        axes.set_ylabel(label)
        axes.set_title(title, fontsize=10)
        if axes is bottom:
            bottom_title = title
    bottom.set_xlabel("rank")
    if ranks and len(ranks) <= 64:
        bottom.set_xticks(ranks)
        bottom.tick_params(axis="x", labelsize=7)
    if 1 < len(hosts) <= 12:
        from matplotlib.patches import Patch

        handles = [Patch(color=palette(i % 10), label=h) for i, h in enumerate(hosts)]
        figure.legend(handles=handles, loc="outside right upper", title="host", fontsize=8)
    t = totals(records)
    figure.suptitle(
        f"{t['ranks']:,} ranks on {t['hosts']:,} host(s): {t['output_tokens']:,} output tokens, "
        f"{_number(t['aggregate_tokens_per_s'])} tok/s aggregate"
    )
    buffer = io.BytesIO()
    # What the lower panel shows, also as text (tests, tools).
    figure.savefig(buffer, format="png", dpi=100, metadata={"Description": bottom_title})
    return buffer.getvalue()


# ----------------------------------------------------------------------------- entry points


def write_summary(record_paths, table_path, plot_path, log_path=None, expected=None) -> str:
    """The summary rule: write the table and the plot; return (and log) the paragraph."""
    records = read_records(record_paths)
    for target in (table_path, plot_path):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(table_path, tsv_text(summary_rows(records)))
    write_atomic(plot_path, plot_png(records))
    text = paragraph(records, expected)
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text(text + "\n", encoding="utf-8")
    return text


def write_run_summary(record_paths, output, log_path, expected, config=None) -> None:
    """Rule summary: summary.tsv and .png, then (scripts/reporting/accounting.py) where the
    node-hours went: submissions.tsv, engines.tsv, timeline.png; ``output``: the
    rule's named outputs; ``config``: the run's (its tiles per node)."""
    from reporting import accounting

    write_summary(record_paths, output.table, output.plot, log_path, expected)
    write_accounting(
        read_records(record_paths),
        output.submissions,
        output.engines,
        output.timeline,
        tile_slots=accounting.tile_slots(config or {}),
    )


def print_run_summary(
    records_dir, ranks: Sequence[str], stream=sys.stderr, config=None, **logs
) -> None:
    """The end-of-run paragraphs (Snakefile ``onsuccess``): the ranks, then where the
    node-hours went (scripts/reporting/accounting.py; ``config``: the run's, for its tiles per
    node; ``logs``: the pbs_logs and engine_logs folders); never fails the run."""
    from reporting import accounting

    records = []
    try:
        records = existing_records(records_dir, ranks)
        text = paragraph(records, expected=len(ranks))
    except (RecordError, OSError, ValueError) as exc:
        text = f"Run summary unavailable: {exc}"
    try:
        # A node's Snakemake inside a warm submission (scripts/engine/supervisor.py sets the
        # variable): the submission's node-hours are not known before it ends.
        if records and not os.environ.get("AURORA_ENGINES"):
            slots = accounting.tile_slots(config or {})
            subs = accounting.submissions(records, tile_slots=slots, **logs)
            text += "\n" + accounting.paragraph(subs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        text += f"\nNode-hours unavailable: {exc}"
    if not os.environ.get("AURORA_ENGINES"):
        text += "".join(f"\n{line}" for line in infrastructure_failures(logs.get("pbs_logs")))
    print(text, file=stream, flush=True)


def _main(argv: Sequence[str]) -> int:
    """``python scripts/reporting/summary.py RECORDS_DIR``: print the paragraph of a results
    folder."""
    if len(argv) != 1:
        print(__doc__.split("\n\n")[0], "\nusage: summarize.py RECORDS_DIR", file=sys.stderr)
        return 2
    records = read_records(Path(argv[0]).glob("*.json"))
    print(paragraph(records))
    return 0


# ----------------------------------------------------------------------------- failures

# When this run's Snakemake loaded the workflow: reports older than this are not its.
STARTED = time.time()


def preflight_failures(pbs_logs: str = "logs/pbs", since: float = STARTED) -> list[str]:
    """This run's submissions that ended at their preflight (scripts/model/stage.py)."""
    lines = []
    for name, path, failure in preflight_failure.read_failures(pbs_logs, since):
        lines.append(
            f"Submission {name} (job {failure['job_id']}) ended before any engine started "
            f"(its PBS log: {path.with_name(name + '.log')}); its ranks did not run:"
        )
        lines += [f"  {cause}" for cause in failure["causes"]]
    return lines


def infrastructure_failures(pbs_logs: str | None = None, since: float = STARTED) -> list[str]:
    """This run's infrastructure failures (formats/faults.py), apart from the ranks' own:
    a count per kind, then one line each."""
    found = faults.read_faults(pbs_logs or "logs/pbs", since)
    if not found:
        return []
    counts: dict[str, int] = {}
    for fault in found:
        counts[fault.kind] = counts.get(fault.kind, 0) + 1
    hours = sum(f.node_hours or 0.0 for f in found)
    cost = f", {hours:.3f} node-hours of interrupted runs" if hours else ""
    lines = [
        "Infrastructure failures, not counted against any rank (their ranks ran again; "
        f"logs/pbs/{faults.FILE}): " + ", ".join(f"{n} {k}" for k, n in counts.items()) + cost
    ]
    for fault in found:
        at = time.strftime("%H:%M:%S", time.localtime(fault.time))
        nodes = f" {', '.join(fault.nodes)}" if fault.nodes else ""
        lines.append(f"  {at} {fault.kind}{nodes} (job {fault.job_id} {fault.name}): {fault.what}")
    return lines


def report_failures(
    ranks, results_dir: str, log_pattern: str, stream=None, pbs_logs: str = "logs/pbs"
) -> None:
    """Print which ranks ran and failed (a log but no output), which submissions ended
    at their preflight, and where to look."""
    stream = stream or sys.stderr
    logs = {rank: log_pattern.format(rank=rank) for rank in ranks}
    failed = [
        (rank, log)
        for rank, log in logs.items()
        if not any(os.path.exists(f"{results_dir}/{rank}{x}") for x in (".out", ".jsonl"))
        and os.path.exists(log)
    ]
    preflight = preflight_failures(pbs_logs)
    if preflight:
        print("\n".join(preflight), file=stream)
    if not failed:
        if not preflight:
            print("No rank failed; the error is in the messages above.", file=stream)
        return
    lines = [f"{len(failed)} rank(s) failed; their outputs are missing, the others are kept:"]
    lines += [f"  rank {rank}: {log}" for rank, log in failed]
    lines.append("Fix the cause and run the same command again: only these ranks run.")
    print("\n".join(lines), file=stream)


def write_accounting(records, submissions_path, engines_path, timeline_path, **logs) -> list:
    """The summary rule's part: submissions.tsv, engines.tsv and timeline.png."""
    subs = submissions(records, **logs)
    for target in (submissions_path, engines_path, timeline_path):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(submissions_path, submissions_tsv(subs))
    write_atomic(engines_path, engines_tsv(subs))
    write_atomic(timeline_path, timeline_png(subs))
    return subs


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
