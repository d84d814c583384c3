"""Cost of the progress lines in one PBS status round (scripts/reporting/progress.py through
pbs.status.progress_lines) at Aurora's largest run: one prod submission of 30,720
ranks on 256 nodes (3,072 engines), against the status interval (goal: under 5 %).

Baseline, measured in the same run on the same files: a reader that opens every
record and registry entry each round. Rounds measured: steady (nothing new since the
round before), busy (1 % of the ranks and 1 % of the engine entries new or replaced),
and the worst one (all 30,720 records new at once). File reads are counted, folder
listings too; times are the median of the repeats, with a warm page cache (on Lustre
every open is a metadata request, so the reads count more than the milliseconds here).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import common

NAME = "progress_reader"
RANKS, ENGINES, NODES = 30_720, 3_072, 256
INTERVAL_S = 10  # pbs.status_interval in profiles/aurora


def record(rank: int, written: float) -> str:
    """A record of the size and shape scripts/rank/task.py writes (warm engines)."""
    return json.dumps(
        {
            "rank": rank,
            "prompts": 4,
            "output_tokens": 64,
            "load_s": 0.1,
            "generate_s": 1.2,
            "tokens_per_s": 53.3,
            "import_s": 0.0,
            "python_start_s": None,
            "host": f"x1000c0s{rank % 256}b0n0",
            "hostname": "x1000c0s0b0n0",
            "mask": str(rank % 12),
            "tiles": str(rank % 12),
            "model": "/tmp/model-123/meta-llama-3-8b",
            "engine": "vllm",
            "truncated": [],
            "versions": {"vllm": "0.15.0", "torch": "2.8.0", "ipex": "2.8.10"},
            "engine_name": f"x1000c0s{rank % 256}b0n0/tile{rank % 12}",
            "engine_log": f"/flare/p/logs/engines/123/x1000c0s{rank % 256}b0n0-tile{rank % 12}.log",
            "client_pid": 4242,
            "client_node": f"x1000c0s{rank % 256}b0n0",
            "wait_s": 0.01,
            "request_s": 1.2,
            "engine_deaths": [],
            "written_at": written,
            "out_sha256": "0" * 64,
        },
        indent=2,
    )


def engine_entry(name: str, state: str, restarts: int = 0) -> str:
    return json.dumps(
        {
            "name": name,
            "url": "http://127.0.0.1:30500",
            "log": f"/flare/p/logs/engines/123/{name}.log",
            "state": state,
            "restarts": restarts,
            "time": time.time(),
            "env": {"ZE_AFFINITY_MASK": "0", "TILE_HOST": name, "TILE_IDS": "0"},
            "versions": {"vllm": "0.15.0"},
            "ready_s": 31.2,
        }
    )


def atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def naive_round(records: Path, registry: Path) -> tuple[float, int]:
    """Open every record and registry entry (the baseline)."""
    t0 = time.perf_counter()
    reads, tokens, ready = 0, 0, 0
    for path in records.glob("*.json"):
        tokens += json.loads(path.read_text())["output_tokens"]
        reads += 1
    for path in registry.glob("*.json"):
        ready += json.loads(path.read_text())["state"] == "ready"
        reads += 1
    return time.perf_counter() - t0, reads


class CountingReads:
    """Counts the files progress.py opens and the folders it lists in one round."""

    def __init__(self, progress):
        self.progress = progress
        self.files = self.listings = 0
        self._read, self._listing = progress._read, progress.listing

    def __enter__(self):
        outer = self

        def read(reader, path, reads):
            outer.files += 1
            return outer._read(reader, path, reads)

        def listing(folder, suffix, reads):
            outer.listings += 1
            return outer._listing(folder, suffix, reads)

        self.progress._read, self.progress.listing = read, listing
        return self

    def __exit__(self, *exc):
        self.progress._read, self.progress.listing = self._read, self._listing


def run(quick: bool = False, repeats: int = 3, shared: dict | None = None) -> dict:
    from pbs import parse, state, status
    from reporting import progress

    ranks, engines = (3_072, 308) if quick else (RANKS, ENGINES)
    rows, summary = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-progress-") as tmp:
        work = Path(tmp)
        records = work / "results" / "records"
        registry = work / "logs" / "engines" / "123.aurora-pbs"
        for folder in (records, registry, work / "logs" / "pbs", work / "state"):
            folder.mkdir(parents=True)
        names = [f"x1000c0s{i // 12}b0n0-tile{i % 12}" for i in range(engines)]
        for name in names:
            atomic(registry / f"{name}.json", engine_entry(name, "ready"))
            (registry / f"{name}.log").write_text("")
        owner = {"pid": os.getpid(), "start": "bench"}
        settings = {
            "state_dir": str(work / "state"),
            "log_dir": str(work / "logs" / "pbs"),
            "results_dir": str(work / "results"),
            "failed_dir": str(work / "logs" / "infer" / "failed"),
            "registry_root": str(work / "logs" / "engines"),
            "tiles_per_node": 12,
            "tiles_per_job": 1,
            "warm_engines": True,
            "owner": owner,
        }
        job_id = "123.aurora-pbs"
        (work / "logs" / "pbs" / "submissions.tsv").write_text(
            f"2026-12-03 07:00:00\t{job_id}\tr0-{ranks - 1}\t{engines // 12}\t00:45:00\tprod\t"
            + ",".join(map(str, range(ranks)))
            + "\n"
        )
        state = {
            "jobs": {job_id: state.new_job_record(0, f"r0-{ranks - 1}", status.run_id(settings))}
        }
        answers = {job_id: parse.verdict({"job_state": "R", "stime": "Thu Dec  3 07:00:00 2026"})}

        def our_round() -> tuple[float, int, int, str]:
            with CountingReads(progress) as counted:
                t0 = time.perf_counter()
                (line,) = status.progress_lines(state, answers, settings, time.time())
                took = time.perf_counter() - t0
            return took, counted.files, counted.listings, line

        def measure(label: str, change) -> None:
            ours, base = [], []
            for _ in range(repeats):
                change()
                ours.append(our_round())
                base.append(naive_round(records, registry))
            ms = statistics.median(o[0] for o in ours) * 1000
            base_ms = statistics.median(b[0] for b in base) * 1000
            files = max(o[1] for o in ours)
            rows.append(
                [
                    label,
                    f"{ms:,.1f}",
                    f"{ms / (INTERVAL_S * 1000) * 100:.2f} %",
                    f"{files:,}",
                    ours[-1][2],
                    f"{base_ms:,.0f}",
                    f"{base[-1][1]:,}",
                    f"{base_ms / max(ms, 1e-3):,.1f}x",
                ]
            )
            summary[label] = {"ms": ms, "files": files, "baseline_ms": base_ms}
            common.log(f"{label}: {ms:.1f} ms, {files} files; baseline {base_ms:.0f} ms")
            summary.setdefault("lines", []).append(ours[-1][3])

        written = iter(range(ranks))
        now = time.time()

        def add(count: int, engine_changes: int):
            def change():
                for _ in range(count):
                    rank = next(written, None)
                    if rank is not None:
                        atomic(records / f"{rank}.json", record(rank, now + rank * 0.01))
                for name in names[:engine_changes]:
                    atomic(registry / f"{name}.json", engine_entry(name, "ready", 1))

            return change

        # everything read once, then the rounds
        add(ranks // 2, 0)()
        our_round()
        measure("steady: nothing new", add(0, 0))
        measure("busy: 1 % of ranks and engines new", add(ranks // 100, engines // 100))
        fresh = ranks - ranks // 2 - repeats * (ranks // 100)
        state_file = Path(settings["state_dir"]) / "progress.json"
        memory_kb = state_file.stat().st_size / 1024
        # the worst round: the rest of the records new at once (one measurement)
        add(fresh, 0)()
        with CountingReads(progress) as counted:
            t0 = time.perf_counter()
            status.progress_lines(state, answers, settings, time.time())
            worst_ms = (time.perf_counter() - t0) * 1000
        base_s, base_reads = naive_round(records, registry)
        rows.append(
            [
                f"worst: {fresh:,} records new at once",
                f"{worst_ms:,.1f}",
                f"{worst_ms / (INTERVAL_S * 1000) * 100:.2f} %",
                f"{counted.files:,}",
                counted.listings,
                f"{base_s * 1000:,.0f}",
                f"{base_reads:,}",
                "",
            ]
        )
        summary["worst"] = {"ms": worst_ms, "files": counted.files}
    steady_share = summary["steady: nothing new"]["ms"] / (INTERVAL_S * 1000)
    busy_share = summary["busy: 1 % of ranks and engines new"]["ms"] / (INTERVAL_S * 1000)
    goal_met = max(steady_share, busy_share) < 0.05
    header = [
        "round",
        "ms",
        f"of a {INTERVAL_S} s status interval",
        "files read",
        "folders listed",
        "baseline ms (read all)",
        "baseline files",
        "baseline / ours",
    ]
    return {
        "name": NAME,
        "title": (
            f"Progress lines: cost of one status round at {ranks:,} ranks and {engines:,} "
            f"engines (one submission; median of {repeats}); progress.json "
            f"{memory_kb:,.0f} KiB"
        ),
        "table": common.markdown_table(header, rows),
        "summary": {
            **summary,
            "goal_met": goal_met,
            "goal": [
                f"progress reader per status round, {ranks:,} ranks + {engines:,} engines "
                "(steady; busy), share of the status interval",
                f"{steady_share * 100:.2f} %; {busy_share * 100:.2f} %",
                "< 5 %",
            ],
        },
    }


if __name__ == "__main__":
    import sys

    result = run(quick="--quick" in sys.argv)
    print(result["title"], result["table"], sep="\n\n")
