"""scripts/rank/task.py end to end without vLLM: real subprocesses, the echo engine, bad
input, a `vllm` and a `torch` that fail when imported; the prompt token bound against real
tokenizers. The tiny OPT model is built once per session by scripts/tools/build_model.py.
With the real vLLM engine: tests/test_infer_vllm.py (it shares this file's helpers).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rank import warm

REPO = Path(__file__).resolve().parent.parent
INFER = REPO / "scripts" / "rank" / "task.py"
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


def test_a_rank_job_passes_the_runs_settings_file_and_its_model(tmp_path, poisoned_env):
    """A rank job with an engine of its own (rank_job.run_rank) passes the run's settings
    file and the model folder instead of the settings themselves: the same answers and
    record as with the settings given whole."""
    from formats import settings as run_settings
    from workflow import local_profile_config

    vllm = local_profile_config()["vllm"] | {"served_model_name": ["served"]}
    made = run_settings.from_config(local_profile_config(engine="echo", vllm=vllm))
    path = run_settings.write_settings(made, tmp_path / "settings")
    data = "\n".join(SEED_PROMPTS).encode() + b"\n"
    whole = Run(tmp_path, "whole", data, made.task("/models/m"), poisoned_env, rank=3)
    by_file = Run(tmp_path, "file", data, {}, poisoned_env, rank=3)
    by_file.args[-2:] = ["--settings-file", str(path), "--model", "/models/m"]
    for run in (whole, by_file):
        run.run(timeout=60)
        assert run.returncode == 0, run.describe()
    assert by_file.output.read_bytes() == whole.output.read_bytes()
    fields = ("engine", "model", "served_model_name", "prompts", "output_tokens")
    records = [{k: r.load_record()[k] for k in fields} for r in (whole, by_file)]
    assert records[0] == records[1] and records[1]["served_model_name"] == "served"
    no_model = Run(tmp_path, "no-model", data, {}, poisoned_env, rank=3)
    no_model.args[-2:] = ["--settings-file", str(path)]
    no_model.run(timeout=60)
    assert no_model.returncode == 2 and "needs --model" in no_model.stderr


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
