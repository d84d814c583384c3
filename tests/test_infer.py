"""scripts/rank/task.py end to end: real subprocesses, the real vLLM engine, a real tiny model.

The tiny OPT model is built once per session by scripts/tools/build_model.py. vLLM runs
are grouped in two waves of concurrent processes (the machine has 2 cores; a
vLLM start costs ~20 s here, mostly `import vllm`), shared by the tests through
module fixtures.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rank import warm

REPO = Path(__file__).resolve().parent.parent
INFER = REPO / "scripts" / "rank" / "task.py"
BUILD_MODEL = REPO / "scripts" / "tools" / "build_model.py"
PYTHON = sys.executable

SEED_PROMPTS = [
    "The most important invention of the 21st century is",
    "When humans first make contact with aliens, the conversation begins with",
    "To solve climate change, the world must",
    "The secret to a long and fulfilling life is",
]
MAX_TOKENS = 16

# CPU settings for vLLM on this kind of machine (engine in-process, one OpenMP
# thread per engine so that concurrent engines do not fight over the 2 cores).
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
}


def settings(model: Path | str, **over) -> dict:
    sampling = {
        "temperature": 1.0,
        "top_p": 1.0,
        "max_tokens": MAX_TOKENS,
        "seed": 1234,
        "ignore_eos": True,
    }
    sampling.update(over.pop("sampling", {}))
    base = {
        "engine": "vllm",
        "model": str(model),
        "dtype": "bfloat16",
        "max_model_len": None,
        "enforce_eager": True,
        "cpu_kv_cache_gib": 1,
        "gpu_memory_utilization": 0.9,
        "long_prompts": "error",
        "sampling": sampling,
    }
    base.update(over)
    return base


class Run:
    """One task.py process: its files, and after wait() its outcome."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        prompts: bytes,
        config: dict,
        env=None,
        rank=0,
        session=False,
    ):
        self.session = session  # a session of its own: its processes can be found by it
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        self.prompts = self.dir / f"{rank}.in"
        self.prompts.write_bytes(prompts)
        self.output = self.dir / "results" / f"{rank}.out"
        self.record = self.dir / "results" / "records" / f"{rank}.json"
        self.args = [
            PYTHON,
            str(INFER),
            "--rank",
            str(rank),
            "--prompts",
            str(self.prompts),
            "--output",
            str(self.output),
            "--record",
            str(self.record),
            "--settings",
            json.dumps(config),
        ]
        self.env = {**os.environ, **VLLM_ENV, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Run:
        self.started, self.started_at = time.monotonic(), time.time()
        self.proc = subprocess.Popen(
            self.args,
            env=self.env,
            cwd=self.dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=self.session,
        )
        return self

    def wait(self, timeout: float = 600) -> Run:
        assert self.proc is not None
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.stdout, self.stderr = self.proc.communicate()
            raise
        self.returncode = self.proc.returncode
        self.wall = time.monotonic() - self.started
        return self

    def run(self, timeout: float = 600) -> Run:
        return self.start().wait(timeout)

    def load_record(self) -> dict:
        return json.loads(self.record.read_text())

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stderr (tail) ---\n{self.stderr[-4000:]}"


def run_all(runs: list[Run]) -> list[Run]:
    for r in runs:
        r.start()
    return [r.wait() for r in runs]


def parse_out(text: str) -> list[tuple[str, str]]:
    """Seed records back into (prompt, generated) pairs."""
    pairs = []
    assert text == "" or text.endswith("\n\n")
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("Prompt: ") and "\n" not in block, block
        for match in re.finditer(", Generated text: ", block):
            try:
                prompt = ast.literal_eval(block[len("Prompt: ") : match.start()])
                generated = ast.literal_eval(block[match.end() :])
            except (ValueError, SyntaxError):
                continue
            pairs.append((prompt, generated))
            break
        else:
            raise AssertionError(f"unparseable record {block!r}")
    return pairs


def prompt_file(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny OPT model, built by scripts/tools/build_model.py (idempotently)."""
    dest = tmp_path_factory.mktemp("models") / "tiny-opt"
    for attempt in ("built", "exists, left alone"):
        res = subprocess.run(
            [PYTHON, str(BUILD_MODEL), "tiny", str(dest)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert attempt in res.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (dest / name).is_file(), name
    assert not [p for p in dest.parent.iterdir() if p.name != "tiny-opt"], "temp folder left"
    return dest


@pytest.fixture
def poisoned_env(tmp_path) -> dict:
    """PYTHONPATH with a `vllm` and a `torch` that fail when imported."""
    poison = tmp_path / "poison"
    for name in ("vllm", "torch"):
        (poison / name).mkdir(parents=True)
        (poison / name / "__init__.py").write_text(
            f"raise ImportError('POISON: {name} was imported')\n"
        )
    return {"PYTHONPATH": str(poison)}


# ----------------------------------------------------------------------------- vLLM waves


@pytest.fixture(scope="module")
def seeded_runs(tiny_model, tmp_path_factory) -> list[Run]:
    """Wave 1: the same 4-prompt rank twice with seed 1234, concurrently."""
    work = tmp_path_factory.mktemp("seeded")
    env = {"TILE_HOST": "x1921c0s0b0n0", "ZE_AFFINITY_MASK": "3", "TILE_IDS": "3"}
    runs = []
    for name in ("a", "b"):
        env_i = {**env, "TMPDIR": str(work / name / "missing-tmp" / "deeper")}
        runs.append(Run(work, name, prompt_file(SEED_PROMPTS), settings(tiny_model), env_i, rank=5))
    return run_all(runs)


LONG_LINE = 3  # the long prompt's line number in the file below


@pytest.fixture(scope="module")
def long_prompt(tiny_model) -> tuple[bytes, int]:
    """A prompt file whose line 3 is longer than the tiny model's 256 positions."""
    from tokenizers import Tokenizer

    long_text = " ".join(f"word{i} climate aliens" for i in range(120))
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    n_tokens = len(tokenizer.encode(long_text).ids)  # with the leading </s>, as vLLM counts
    assert n_tokens > 256
    return prompt_file([SEED_PROMPTS[0], "", long_text, SEED_PROMPTS[2]]), n_tokens


@pytest.fixture(scope="module")
def wave2(tiny_model, long_prompt, tmp_path_factory) -> dict[str, Run]:
    """Wave 2: long prompt with "error", with "truncate", and another seed."""
    work = tmp_path_factory.mktemp("wave2")
    data, _ = long_prompt
    runs = {
        "error": Run(work, "error", data, settings(tiny_model), rank=2),
        "truncate": Run(
            work,
            "truncate",
            data,
            settings(tiny_model, long_prompts="truncate", max_model_len=128),
            rank=2,
        ),
        "other_seed": Run(
            work,
            "other_seed",
            prompt_file(SEED_PROMPTS),
            settings(tiny_model, sampling={"seed": 99}),
        ),
        # vLLM's default: the engine in an EngineCore process, a child of the task
        "multiprocess": Run(
            work,
            "multiprocess",
            prompt_file(SEED_PROMPTS),
            settings(tiny_model),
            {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
            session=True,
        ),
    }
    run_all(list(runs.values()))
    return runs


@pytest.mark.vllm
def test_four_prompts_four_records_in_order(seeded_runs):
    run = seeded_runs[0]
    assert run.returncode == 0, run.describe()
    pairs = parse_out(run.output.read_text(encoding="utf-8"))
    assert [p for p, _ in pairs] == SEED_PROMPTS
    assert all(isinstance(g, str) and g for _, g in pairs)
    # no temporary file left; the rank's partial answers are gone (their folder stays)
    left = [p for p in run.output.parent.iterdir() if p.name.startswith(".")]
    assert all(p.name == ".partial" and not any(p.iterdir()) for p in left), left


@pytest.mark.vllm
def test_record_fields(seeded_runs, tiny_model):
    run = seeded_runs[0]
    assert run.returncode == 0, run.describe()
    rec = run.load_record()
    expected_keys = {
        "rank",
        "prompts",
        "output_tokens",
        "load_s",
        "generate_s",
        "tokens_per_s",
        "import_s",
        "python_start_s",
        "host",
        "hostname",
        "mask",
        "tiles",
        "model",
        "engine",
        "written_at",
    }
    assert expected_keys <= set(rec), expected_keys - set(rec)
    assert rec["rank"] == 5
    assert rec["prompts"] == 4
    assert rec["output_tokens"] == 4 * MAX_TOKENS  # ignore_eos: every prompt gets all
    assert rec["engine"] == "vllm"
    assert rec["model"] == str(tiny_model)
    assert rec["host"] == "x1921c0s0b0n0"
    assert rec["hostname"] == socket.gethostname()
    assert rec["mask"] == "3" and rec["tiles"] == "3"
    assert rec["truncated"] == []
    assert 0 < rec["import_s"] < run.wall
    assert 0 < rec["load_s"] < run.wall
    assert 0 < rec["generate_s"] < run.wall
    assert rec["import_s"] + rec["load_s"] + rec["generate_s"] < run.wall
    assert rec["python_start_s"] is not None and 0 <= rec["python_start_s"] < 30
    # written after generation, before the process ended
    assert run.started_at < rec["written_at"] < time.time()
    assert math.isclose(rec["tokens_per_s"], 64 / rec["generate_s"], rel_tol=0.01)


@pytest.mark.vllm
def test_summary_line_and_tmpdir(seeded_runs):
    run = seeded_runs[0]
    assert run.returncode == 0, run.describe()
    summary = [line for line in run.stderr.splitlines() if line.startswith("rank 5:")]
    assert len(summary) == 1, run.stderr[-2000:]
    assert re.fullmatch(
        r"rank 5: 4 prompts, 64 tokens, load [\d.]+ s, generate [\d.]+ s, [\d.]+ tok/s, "
        r"host x1921c0s0b0n0, mask 3",
        summary[0],
    ), summary[0]
    assert Path(run.env["TMPDIR"]).is_dir()  # created before vLLM was imported


@pytest.mark.vllm
def test_seed_gives_identical_output_across_processes(seeded_runs, wave2):
    a, b = seeded_runs
    other = wave2["other_seed"]
    for run in (a, b, other):
        assert run.returncode == 0, run.describe()
    assert a.output.read_bytes() == b.output.read_bytes()
    # ... and the seed is what fixes it: another seed gives other text.
    assert other.output.read_bytes() != a.output.read_bytes()
    assert [p for p, _ in parse_out(other.output.read_text())] == SEED_PROMPTS


def processes_of_session(session: int) -> list[str]:
    """Command lines of the live processes of session ``session``."""
    from engine import watchdog

    found = []
    for pid in watchdog.live_processes(watchdog.SESSION, session):
        with contextlib.suppress(OSError):  # gone meanwhile
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


@pytest.mark.vllm
def test_a_finished_rank_exits_at_once_and_its_engine_process_ends_too(wave2):
    # The task ends right after its last write, without vLLM's teardown (seconds
    # during which Snakemake still marks the rank incomplete), and sends its
    # EngineCore SIGTERM: nothing of the rank outlives it for long.
    run = wave2["multiprocess"]
    assert run.returncode == 0, run.describe()
    assert "(EngineCore pid=" in run.stdout + run.stderr  # the engine ran in a child
    assert [p for p, _ in parse_out(run.output.read_text())] == SEED_PROMPTS
    assert run.load_record()["prompts"] == 4
    deadline = time.monotonic() + 60
    while processes_of_session(run.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_of_session(run.proc.pid) == []


@pytest.mark.vllm
def test_long_prompt_error_names_file_line_and_tokens(wave2, long_prompt):
    run = wave2["error"]
    _, n_tokens = long_prompt
    assert run.returncode == 2, run.describe()
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, run.stderr[-3000:]
    message = errors[0]
    assert str(run.prompts) in message
    assert re.search(rf"\bline {LONG_LINE}\b", message), message
    assert f"{n_tokens} tokens" in message, message
    assert "Traceback" not in run.stderr
    assert not run.output.exists()
    assert not run.record.exists()


@pytest.mark.vllm
def test_long_prompt_truncate_keeps_going(wave2, long_prompt):
    run = wave2["truncate"]
    data, n_tokens = long_prompt
    assert run.returncode == 0, run.describe()
    pairs = parse_out(run.output.read_text())
    lines = [line.strip() for line in data.decode().splitlines() if line.strip()]
    assert [p for p, _ in pairs] == lines  # the record keeps the full original prompt
    rec = run.load_record()
    assert rec["prompts"] == 3
    assert rec["truncated"] == [LONG_LINE]
    assert rec["output_tokens"] == 3 * MAX_TOKENS
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING:")]
    long_warnings = [w for w in warnings if f"line {LONG_LINE}" in w]
    assert len(long_warnings) == 1, warnings
    # max_model_len 128 - max_tokens 16 = 112 tokens kept
    assert f"{n_tokens} tokens" in long_warnings[0]
    assert "kept its last 112 tokens" in long_warnings[0]


# ----------------------------------------------------------------------------- no engine


def test_empty_rank_file(tmp_path, tiny_model, poisoned_env):
    # engine vllm, but vllm must not even be imported: no prompts, no engine.
    run = Run(tmp_path, "empty", b"\n   \r\n\t\n", settings(tiny_model), poisoned_env, rank=7)
    run.run(timeout=60)
    assert run.returncode == 0, run.describe()
    assert run.output.read_bytes() == b""
    rec = run.load_record()
    assert rec["prompts"] == 0 and rec["output_tokens"] == 0 and rec["rank"] == 7
    assert f"WARNING: {run.prompts} has no prompts" in run.stderr.splitlines()
    assert "POISON" not in run.stderr


def test_invalid_utf8_fails_before_engine(tmp_path, tiny_model, poisoned_env):
    data = b"fine prompt\n\nbroken \xff\xfe prompt\nanother\n"
    run = Run(tmp_path, "badutf8", data, settings(tiny_model), poisoned_env)
    run.run(timeout=60)
    assert run.returncode == 2, run.describe()
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, run.stderr
    assert str(run.prompts) in errors[0]
    assert re.search(r"\bline 3\b", errors[0]), errors[0]
    assert "POISON" not in run.stderr and "Traceback" not in run.stderr
    assert not run.output.exists() and not run.record.exists()


def test_echo_engine_never_imports_vllm_or_torch(tmp_path, poisoned_env):
    lines = SEED_PROMPTS + ['it\'s "quoted", with \\ backslash', "東京 😀"]
    data = b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n"
    config = {"engine": "echo", "model": "facebook/opt-125m"}
    run = Run(tmp_path, "echo", data, config, poisoned_env, rank=11)
    run.run(timeout=60)
    assert run.returncode == 0, run.describe()
    assert "POISON" not in run.stderr
    assert run.wall < 10
    assert parse_out(run.output.read_text(encoding="utf-8")) == [(t, t) for t in lines]
    rec = run.load_record()
    assert rec["engine"] == "echo" and rec["prompts"] == len(lines)
    assert rec["output_tokens"] == sum(len(t.split()) for t in lines)
    assert rec["load_s"] == 0
    assert rec["import_s"] == 0


def test_poison_really_poisons(tmp_path, poisoned_env):
    """Guard for the tests above: with the poisoned path, importing vllm fails."""
    res = subprocess.run(
        [PYTHON, "-c", "import vllm"],
        env={**os.environ, **poisoned_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "POISON: vllm" in res.stderr


def test_bad_settings_rejected(tmp_path, poisoned_env):
    for bad, word in [
        ({"engine": "gpu"}, "engine"),
        ({"long_prompts": "drop"}, "long_prompts"),
        ({"sampling": {"max_tokens": 0}}, "max_tokens"),
        ({"max_model_len": "256"}, "max_model_len"),
        ({"devcie": "xpu"}, "devcie"),
    ]:
        run = Run(tmp_path, f"bad-{word}", prompt_file(["hi"]), bad, poisoned_env)
        run.run(timeout=60)
        assert run.returncode == 2, (bad, run.describe())
        assert run.stderr.startswith("ERROR:") and word in run.stderr, run.stderr
        assert not run.output.exists()


def test_existing_out_is_replaced_whole(tmp_path, poisoned_env):
    run = Run(tmp_path, "replace", prompt_file(["a b", "c"]), {"engine": "echo"}, poisoned_env)
    run.output.parent.mkdir(parents=True)
    run.output.write_text("stale\n")
    run.run(timeout=60)
    assert run.returncode == 0, run.describe()
    assert parse_out(run.output.read_text()) == [("a b", "a b"), ("c", "c")]


# ----------------------------------------------------------------------------- no /tokenize

# Texts that grow under a tokenizer's normalizer or split into many tokens.
HOSTILE_TEXTS = [
    "\ufdfa" * 12,  # NFKC: one character becomes 18
    "\u337f" * 20,  # NFKC: one character becomes four
    "\u0130" * 30,  # lower case: 2 bytes become 3
    " " * 200,  # SentencePiece: a space becomes "▁"
    "a\u0301" * 40,  # combining marks
    "\U0001f600\U0001f680" * 25,  # 4-byte characters, byte fallback
    "漢字かな交じり文" * 10,
    "\x00\x01\x1f\x7f" * 10,  # control characters
    SEED_PROMPTS[0],
    "",
]


def sentencepiece_like_tokenizer():
    """A Llama-2-style tokenizer (NFKC, lower case, "▁" for spaces, BPE with byte
    fallback) trained here on a few words: most characters of HOSTILE_TEXTS are unknown
    to it, the worst case for token counts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", *byte_tokens])
    tokenizer.train_from_iterator(SEED_PROMPTS * 3, trainer)
    return lambda text: tokenizer.encode(f"<s>{text}").ids


def test_token_bound_holds_for_real_tokenizers(tiny_model):
    from transformers import AutoTokenizer

    opt = AutoTokenizer.from_pretrained(str(tiny_model))
    counters = {"tiny-opt (byte-level BPE)": lambda t: opt(t)["input_ids"]}
    counters["SentencePiece-like, byte fallback"] = sentencepiece_like_tokenizer()
    for name, encode in counters.items():
        for text in HOSTILE_TEXTS:
            tokens = len(encode(text))
            assert tokens <= warm.token_bound(text), (name, text[:20], tokens)
    assert warm.token_bound("") == warm.SPECIAL_TOKENS_BOUND


def test_prompts_that_surely_fit_skip_tokenize(monkeypatch):
    """Once an engine's context length is known, a rank of short prompts goes without
    /tokenize (the URL here answers nothing: any request would fail); a long prompt, a
    chat or an unknown engine still asks."""
    from engine import client
    from rank.jsonl import Request

    url = "http://127.0.0.1:9"  # discard port: nothing listens
    settings = {"sampling": {"max_tokens": 16}, "long_prompts": "error"}
    short = [
        Request(line=i + 1, id=i + 1, batch=False, prompt=p) for i, p in enumerate(SEED_PROMPTS)
    ]
    with pytest.raises(client.EngineUnavailable):  # context length not known yet
        warm.engine_inputs(short, settings, "r.in", url)
    monkeypatch.setitem(warm._MAX_MODEL_LEN, url, 2048)
    assert warm.engine_inputs(short, settings, "r.in", url) == (SEED_PROMPTS, [], None)
    long = short + [Request(line=5, id=5, batch=False, prompt="x " * 700)]
    chat = [Request(line=1, id=1, batch=False, messages=[{"role": "user", "content": "hi"}])]
    tight = {"sampling": {"max_tokens": 2048 - 20}, "long_prompts": "error"}
    for requests, given in ((long, settings), (chat, settings), (short, tight)):
        with pytest.raises(client.EngineUnavailable):
            warm.engine_inputs(requests, given, "r.jsonl", url)
    # JSONL lines answered as error lines (vllm.bad_requests "error_line"): not tokenized,
    # their answers are checked against the context instead (once the engine is known to
    # render chats); a request with no room at all is refused unsent
    monkeypatch.setattr(warm, "_RENDERS_CHATS", {url})
    refused = {}
    no_room = Request(line=2, id=2, batch=False, prompt="a", sampling={"max_tokens": 2048})
    inputs = warm.engine_inputs([*chat, no_room], settings, "r.jsonl", url, None, refused)
    assert inputs == ([chat[0].messages, "a"], [], 2048)
    assert refused == {1: "max_tokens 2048 leaves no room for a request in max_model_len 2048"}
