"""Helpers shared by the benchmarks: paths, settings, timed commands, result files."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from base64 import urlsafe_b64encode
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PYTHON = sys.executable
TINY_MODEL = "./models/tiny-opt"
BENCH_MODEL = "./models/opt-125m-shaped"
GNU_TIME = "/usr/bin/time"

for folder in ("scripts", "tests"):  # the workflow's modules and the e2e helpers
    if str(REPO / folder) not in sys.path:
        sys.path.insert(0, str(REPO / folder))

from workflow import deep_merge  # noqa: E402  (re-exported for the benchmarks)

# ----------------------------------------------------------------------------- settings


def local_profile_config() -> dict:
    """config/config.yaml with profiles/local/local.yaml on top, read now (not copied)."""
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    local = yaml.safe_load((REPO / "profiles" / "local" / "local.yaml").read_text())
    return deep_merge(base, local)


def engine_environment(config: Mapping) -> dict[str, str]:
    """The environment variables a rank's engine gets from the config (not the placement)."""
    env = {name: str(value) for name, value in (config.get("task_env") or {}).items()}
    kv = config["vllm"].get("cpu_kv_cache_gib")
    if kv is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(math.ceil(kv))  # as scripts/rank/task.py sets it
    return env


def jsonl_ranks(ranks: Mapping[int, list[dict]], extra: Mapping) -> dict[str, str]:
    """Rank files of short JSONL lines (``id`` "<rank>-<i>"), each request with ``extra``."""
    return {
        f"{rank}.jsonl": "".join(
            json.dumps({"id": f"{rank}-{i}", **r, **extra}) + "\n" for i, r in enumerate(requests)
        )  # fmt: skip
        for rank, requests in ranks.items()
    }


def local_argv(work: Path, config: Mapping) -> list[str]:
    """`snakemake --profile profiles/local` for ``work`` with ``config`` on top (written to
    ``work``/bench.yaml)."""
    overrides = work / "bench.yaml"
    overrides.write_text(json.dumps(config))
    argv = [PYTHON, "-m", "snakemake", "--profile", "profiles/local", "--configfile"]
    return argv + [str(REPO / "profiles" / "local" / "local.yaml"), str(overrides)]


def local_run(work: Path, config: Mapping) -> Timed:
    """`local_argv` run in ``work``."""
    return run_timed(local_argv(work, config), cwd=work, timeout=5400)


def run_batch(
    folder: Path,
    model: str,
    ranks: Mapping[int, list[dict]],
    extra: Mapping,
    chat_template: str | None = None,
):
    """The ranks' requests (each with ``extra``) as ONE OpenAI batch file of chat lines
    (``custom_id`` "<rank>-<i>") through vLLM's `run-batch`, with the local profile's
    engine settings (those of our CPU engines, scripts/engine/lifecycle.py), its sampling
    and every core; its timing and its output lines.

    Each line carries the profile's temperature and top_p (config sampling), as the
    warm side's requests do: run-batch's own default (temperature 1, top_p 1) skips
    top-p's sort of the vocabulary at every step: 480 requests of 64 tokens on the
    125M-shaped model took it 65.6 s without them, 125.8 s with them (2026-12-07)."""
    from engine import lifecycle

    folder.mkdir(parents=True)
    batch = folder / "batch.jsonl"
    model = str((REPO / model).resolve())
    config = local_profile_config()
    sampling = {key: config["sampling"][key] for key in ("temperature", "top_p")}
    with batch.open("w") as handle:
        for rank, requests in ranks.items():
            for i, request in enumerate(requests):
                body = {"model": model, **sampling, **request, **extra}
                line = {"custom_id": f"{rank}-{i}", "method": "POST",
                        "url": "/v1/chat/completions", "body": body}  # fmt: skip
                handle.write(json.dumps(line) + "\n")
    vllm = config["vllm"]
    argv = [PYTHON, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(batch), "-o",
            str(folder / "out.jsonl"), "--model", model, "--dtype", vllm["dtype"]]  # fmt: skip
    if vllm["enforce_eager"]:
        argv.append("--enforce-eager")
    if chat_template:  # a model without one (its path, as config vllm.chat_template)
        argv += ["--chat-template", str(REPO / chat_template)]
    argv += lifecycle.cpu_engine_flags(vllm)
    # both cores: the warm side runs two engines
    env = {**os.environ, **engine_environment(config), "OMP_NUM_THREADS": str(os.cpu_count() or 2)}
    timed = run_timed(argv, cwd=folder, env=env, timeout=5400)
    return timed, read_jsonl(folder / "out.jsonl")


def read_jsonl(path: Path) -> list[dict]:
    """A JSONL file's objects, one per "\n"-ended line: not str.splitlines, which also
    breaks at U+2028, U+0085 and other characters a generated text may hold unescaped."""
    return [json.loads(line) for line in Path(path).read_text().split("\n") if line]


def bench_prompts(count: int) -> list[str]:
    """``count`` prompts: the sample data's lines in rank order, repeated as needed."""
    lines = []
    for path in sorted((REPO / "data").glob("*.in"), key=lambda p: int(p.stem)):
        lines += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise RuntimeError("data/ has no prompts")
    return [lines[i % len(lines)] for i in range(count)]


# Top-level entries of the repository that a run folder does not link: its own data
# and results, and what only the repository needs.
NOT_LINKED = {"data", "results", "logs", "benchmarks", "tests", "report.html"}


def run_folder(path: Path, ranks: dict[str, str]) -> Path:
    """A scratch run folder: links to everything the workflow reads, and its own data/.

    Like tests/workflow.make_workdir, but it links every top-level entry of the
    repository (Snakefile, config, scripts, profiles, models, envs, report, ...), so
    a new folder the Snakefile comes to need does not break the benchmarks.
    """
    path.mkdir(parents=True)
    for entry in REPO.iterdir():
        if not entry.name.startswith(".") and entry.name not in NOT_LINKED:
            (path / entry.name).symlink_to(entry)
    data = path / "data"
    data.mkdir()
    for name, content in ranks.items():
        (data / name).write_text(content, encoding="utf-8")
    return path


def model_path(model: str) -> Path:
    path = (REPO / model).resolve()
    if not (path / "config.json").is_file():
        raise RuntimeError(f"{model} is not built: run `make bench` (it builds the models first)")
    return path


# ----------------------------------------------------------------------------- commands


@dataclass
class Timed:
    wall_s: float
    max_rss_mb: float | None
    cpu_s: float | None  # user + system seconds of the command and its children
    returncode: int
    stdout: str
    stderr: str


def run_timed(
    argv: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 1800,
    check: bool = True,
) -> Timed:
    """Run a command; its wall time, and its peak RSS and CPU time (GNU time) when available."""
    rss_file = None
    command = list(argv)
    if os.path.exists(GNU_TIME):
        handle, rss_file = tempfile.mkstemp(prefix="bench-time-", suffix=".txt")
        os.close(handle)
        command = [GNU_TIME, "-f", "%M %U %S", "-o", rss_file, *command]
    t0 = time.monotonic()
    result = subprocess.run(
        command,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.monotonic() - t0
    rss = cpu = None
    if rss_file:
        try:
            lines = Path(rss_file).read_text().strip().splitlines()
            fields = lines[-1].split() if lines else []  # earlier lines: "Command exited ..."
            if len(fields) == 3:
                rss = int(fields[0]) / 1024
                cpu = float(fields[1]) + float(fields[2])
        finally:
            os.unlink(rss_file)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} failed ({result.returncode}):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    return Timed(wall, rss, cpu, result.returncode, result.stdout, result.stderr)


def metadata_path(work: Path, output: str) -> Path:
    """Snakemake's job metadata record of ``output``:
    ``.snakemake/metadata/<urlsafe base64 of the path>`` (record format 6)."""
    return work / ".snakemake" / "metadata" / urlsafe_b64encode(output.encode()).decode()


def job_window(work: Path, output: str) -> tuple[float, float] | None:
    """Start and end (epoch s) of the job that wrote ``output``, from its
    `metadata_path` record (Snakemake records each output's job start and end time
    there); None without one."""
    path = metadata_path(work, output)
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("starttime") is None or meta.get("endtime") is None:
        return None
    return meta["starttime"], meta["endtime"]


def job_seconds(work: Path, output: str) -> float | None:
    """Wall seconds of the job that wrote ``output`` (`job_window`)."""
    window = job_window(work, output)
    return None if window is None else window[1] - window[0]


WARM_EVENTS = (
    ("fetch_model_start", "rule fetch_model starts (model check, model-info cache)"),
    ("engines_started", "the engines start (beside fetch_model, or at the first rank job)"),
    ("fetch_model_end", "rule fetch_model ends (its checks ran in the first engine)"),
    ("first_engine_ready", "the first engine is ready"),
    ("first_rank_began", "the first rank's requests are sent"),
    ("last_rank_written", "the last rank is written"),
    ("exit", "the command exits (summary written, engines stopped)"),
)


def warm_breakdown(work: Path, started: float, ended: float) -> dict:
    """When the events of WARM_EVENTS happened in a local warm run, seconds after the
    snakemake command started (``started``/``ended``: its epoch seconds). From
    Snakemake's job metadata of the model marker, the engines' registry entries
    (started_at, ready_at) and the ranks' records."""
    from formats import record as rank_record
    from formats.registry import REGISTRY_ROOT, read_registry

    (marker,) = (work / "results" / "model").glob("*.json")
    fetch_start, fetch_end = job_window(work, str(marker.relative_to(work)))
    folders = [f for f in (work / REGISTRY_ROOT).iterdir() if f.is_dir()]
    entries = [e for f in folders for e in read_registry(f).values() if e.get("started_at")]
    records = rank_record.records_dir(work / "results").glob("*.json")
    records = [json.loads(p.read_text()) for p in records]
    times = {
        "fetch_model_start": fetch_start,
        "engines_started": min(e["started_at"] for e in entries),
        "fetch_model_end": fetch_end,
        "first_engine_ready": min(e["ready_at"] for e in entries if e.get("ready_at")),
        "first_rank_began": min(rank_record.began(r) for r in records),
        "last_rank_written": max(float(r["written_at"]) for r in records),
        "exit": ended,
    }
    return {name: at - started for name, at in times.items()}


class EngineLoad:
    """vLLM's own gauges of a local warm run's engines over time: requests running (the
    batch its scheduler steps) and waiting, read from each ready engine's /metrics every
    ``interval_s`` while the run lasts (a thread of the benchmark, two small GETs a
    second per engine: its cost is in the run it measures)."""

    # running and waiting requests, KV cache in use (0-1), preemptions so far (a counter)
    GAUGES = (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total",
    )

    def __init__(self, work: Path, interval_s: float = 0.5):
        import threading

        self.work, self.interval_s = work, interval_s
        # (t, engine, running, waiting, kv cache used, preemptions so far)
        self.samples: list[tuple[float, str, float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> EngineLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import urllib.request

        from formats.registry import READY, REGISTRY_ROOT, read_registry

        while not self._stop.wait(self.interval_s):
            root = self.work / REGISTRY_ROOT
            folders = [f for f in root.iterdir() if f.is_dir()] if root.is_dir() else []
            for entry in [e for f in folders for e in read_registry(f).values()]:
                if entry.get("state") != READY or not entry.get("url"):
                    continue
                try:
                    with urllib.request.urlopen(f"{entry['url']}/metrics", timeout=2) as got:
                        text = got.read().decode()
                except OSError:
                    continue
                values = [
                    sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith(gauge + "{") or line.startswith(gauge + " "))
                    for gauge in self.GAUGES
                ]  # fmt: skip
                self.samples.append((time.time(), entry["name"], *values))

    def summary(self, started: float) -> dict:
        """While an engine served (some request running): its mean and largest batch and
        queue, its largest share of KV cache in use; the engines' preemptions (a request
        put back to wait for KV cache, its tokens computed again); how long the last
        engine ran after the first one ran dry (a core idle at the end of the run); and
        the run's total running and waiting per second (``series``)."""
        busy = [s for s in self.samples if s[2] > 0]
        # engine -> its last sample with a request running (the samples are in time order)
        last_busy = {engine: t for t, engine, *_ in busy}
        series: dict[int, list[float]] = {}
        for t, _, running, waiting, *_ in self.samples:
            second = series.setdefault(int(t - started), [0.0, 0.0])
            second[0] += running
            second[1] += waiting
        return {
            "interval_s": self.interval_s,
            "samples": len(self.samples),
            "running_mean": statistics.mean(s[2] for s in busy) if busy else 0.0,
            "running_max": max((s[2] for s in busy), default=0.0),
            "waiting_mean": statistics.mean(s[3] for s in busy) if busy else 0.0,
            "waiting_max": max((s[3] for s in busy), default=0.0),
            "kv_cache_used_max": max((s[4] for s in busy), default=0.0),
            # each engine's counter as last read, summed
            "preemptions": sum({s[1]: s[5] for s in self.samples}.values()),
            # the last engine ran this long after the first had nothing left to run
            "finish_spread_s": max(last_busy.values()) - min(last_busy.values())
            if last_busy
            else 0.0,
            # second of the run -> [running, waiting] summed over its samples' engines
            "series": dict(sorted(series.items())),
        }


def serving_parts(work: Path, load: Mapping) -> dict:
    """What the serving costs beside the events of `warm_breakdown`: the engines' batch
    (`EngineLoad.summary`), each rank's request time (its record's ``request_s``: its
    requests sent to its answers kept), and rule summary's job."""
    from formats import record as rank_record

    records = rank_record.records_dir(work / "results").glob("*.json")
    request_s = [float(json.loads(p.read_text()).get("request_s") or 0) for p in records]
    window = job_window(work, "results/summary.tsv")
    return {
        "engine_batch": load,
        "rank_request_s_median": median(request_s) if request_s else None,
        "rank_request_s_sum": sum(request_s),
        "summary_rule_s": window[1] - window[0] if window else None,
    }


def serving_rows(parts: Mapping) -> list[list[str]]:
    """`serving_parts` as table rows."""
    batch = parts["engine_batch"]
    rows = [
        [f"engines' batch while serving (vLLM's gauges every {batch['interval_s']} s): "
         "requests running per engine, mean / largest",
         f"{batch['running_mean']:.1f} / {batch['running_max']:.0f}"],
        ["requests waiting in an engine's queue meanwhile, mean / largest",
         f"{batch['waiting_mean']:.1f} / {batch['waiting_max']:.0f}"],
        ["an engine's KV cache in use, largest share; requests preempted (all engines)",
         f"{100 * batch['kv_cache_used_max']:.0f} %; {batch['preemptions']:.0f}"],
        ["the last engine's requests ran on after the first engine's had all ended, s",
         f"{batch['finish_spread_s']:.1f}"],
    ]  # fmt: skip
    if parts["rank_request_s_median"] is not None:
        median_s, sum_s = parts["rank_request_s_median"], parts["rank_request_s_sum"]
        rows.append(
            ["a rank's requests, sent to answered: median s (sum over ranks)",
             f"{median_s:.2f} ({sum_s:.0f})"]
        )  # fmt: skip
    if parts["summary_rule_s"] is not None:
        rows.append(["rule summary (tables, plots), s", f"{parts['summary_rule_s']:.2f}"])
    return rows


def breakdown_rows(events: Mapping[str, float]) -> list[list[str]]:
    """`warm_breakdown` as table rows, in the order the events happened."""
    text = dict(WARM_EVENTS)
    order = sorted(text, key=lambda name: events[name])
    return [[f"time breakdown: {text[name]}", f"at {events[name]:.1f} s"] for name in order]


def finish_window_s(work: Path, rank: str) -> float | None:
    """Seconds from rank ``rank``'s last write (its record's ``written_at``) to Snakemake
    recording its job finished (the .out's metadata record is written as its incomplete
    marker is removed): a kill in between makes `--rerun-incomplete` redo the rank
    although its outputs are whole. (The .out's own mtime will not do: Snakemake touches
    outputs when it checks them.)"""
    output = f"results/{rank}.out"
    path = metadata_path(work, output)
    record = work / "results" / "records" / f"{rank}.json"
    if not (path.is_file() and record.is_file()):
        return None
    return path.stat().st_mtime - json.loads(record.read_text())["written_at"]


def finish_windows(work: Path, ranks) -> dict:
    """`finish_window_s` of every rank's .out: median and max, in ms."""
    windows = [finish_window_s(work, name.removesuffix(".in")) for name in ranks]
    windows = [w for w in windows if w is not None]
    return {
        "ranks": len(windows),
        "median_ms": 1000 * median(windows),
        "max_ms": 1000 * max(windows, default=float("nan")),
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """ "median (min-max)" of a few runs."""
    if not values:
        return "-"
    return f"{fmt(median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


# ----------------------------------------------------------------------------- results


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    import snakemake

    try:
        from importlib.metadata import version

        vllm_version = version("vllm-cpu")
    except Exception:
        vllm_version = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "snakemake": snakemake.__version__,
        "vllm_cpu": vllm_version,
        "load_average_at_start": os.getloadavg()[0],
    }


def write_result(name: str, data: Mapping) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
