"""Chat requests on a real instruct model (models/tiny-chat: scripts/tools/build_model.py
tiny-chat, a chat template in its tokenizer_config.json) through both kinds of engine:
per-rank (task.py, vLLM in the task) and warm (scripts/engine/vllm_server.py), and through
the whole workflow (profiles/local). The prompt tokens each engine reports are the chat
as vLLM itself renders it offline (``LLM.chat``'s prompt token ids: the reference, apart
from the engines' own front end), the template's markers among them; a seeded rerun is
identical, and a model without a template takes config vllm.chat_template."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from engine import client, lifecycle
from engine.lifecycle import Engine
from formats.partial import Answer, Partial, partial_key
from placement import node_layout, tiles
from rank import checks
from test_infer import VLLM_ENV, settings
from test_jsonl_ranks import registry_pool
from workflow import (
    ENGINE_SETTINGS,
    PYTHON,
    READY_TIMEOUT,
    SCRIPTS,
    TASK_ENV,
    TINY_MODEL,
    free_port,
    local_config,
    make_workdir,
    probe_result,
    read_records,
    serve_rank,
    snakemake,
    tiny_model,
)

MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT = [{"role": "system", "content": "You are brief."},
        {"role": "user", "content": "The secret to a long life is"}]  # fmt: skip
# a chat whose user content is two OpenAI text parts, and the string they join into
PARTS = [{"role": "system", "content": [{"type": "text", "text": "You are brief."}]},
         {"role": "user", "content": [{"type": "text", "text": "The secret"},
                                      {"type": "text", "text": "to a long life is"}]}]  # fmt: skip
JOINED = [CHAT[0], {"role": "user", "content": "The secret\nto a long life is"}]
LINES = [
    {"custom_id": "b-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny-chat", "messages": CHAT, "max_completion_tokens": 8}},
    {"id": "s-1", "messages": CHAT[1:], "seed": 7, "max_tokens": 6},
    {"prompt": "To solve climate change, the world must"},
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_chat() -> Path:
    """The repo's tiny instruct model (`make test-vllm` builds it)."""
    return tiny_model("tiny-chat")


# Reference renderings: name -> (model, messages, with the test's template).
RENDERED = {
    "chat": ("tiny-chat", CHAT, False),
    "user": ("tiny-chat", CHAT[1:], False),
    "user joined": ("tiny-chat", JOINED[1:], False),
    "user parts": ("tiny-chat", PARTS[1:], False),
    "templated chat": ("tiny-opt", CHAT, True),
    "templated joined": ("tiny-opt", JOINED, True),
}
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
# vLLM's offline LLM.chat, one model after the other: the prompt token ids it renders.
REFERENCE_PROBE = """
import json
import sys
from vllm import LLM, SamplingParams
models, cases, template = json.loads(sys.argv[1])
ids = {}
for model in sorted({case[0] for case in cases.values()}):
    llm = LLM(model=models[model], dtype="bfloat16", enforce_eager=True, max_model_len=256)
    for name, (of, messages, templated) in cases.items():
        if of == model:
            (out,) = llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False,
                              chat_template=template if templated else None)
            ids[name] = list(out.prompt_token_ids)
    del llm
print("PROBE-RESULT " + json.dumps(ids))
"""


@pytest.fixture(scope="module")
def rendered(tiny_chat) -> dict[str, list[int]]:
    """The chats of RENDERED as vLLM's LLM.chat renders them (its prompt token ids)."""
    models = {"tiny-chat": str(tiny_chat), "tiny-opt": str(TINY_MODEL)}
    done = subprocess.run(
        [PYTHON, "-c", REFERENCE_PROBE, json.dumps([models, RENDERED, TEMPLATE])],
        env={**os.environ, **VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return probe_result(done.stdout)


def write_rank(folder: Path, rank: int, lines) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{rank}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def per_rank(folder: Path, rank_file: Path, config: dict) -> subprocess.Popen:
    rank = rank_file.stem
    argv = [PYTHON, str(SCRIPTS / "rank" / "task.py"), "--rank", rank, "--prompts", str(rank_file),
            "--output", str(folder / "results" / f"{rank}.jsonl"),
            "--record", str(folder / "results" / f"{rank}.json"),
            "--settings", json.dumps(config)]  # fmt: skip
    return subprocess.Popen(
        argv,
        env={**os.environ, **VLLM_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def answers(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def usage(line: dict) -> tuple[int, int]:
    """(prompt, output) tokens of an answer line, short or batch."""
    if "response" in line:
        used = line["response"]["body"]["usage"]
        return used["prompt_tokens"], used["completion_tokens"]
    return line["prompt_tokens"], line["output_tokens"]


@pytest.fixture(scope="module")
def per_rank_runs(tiny_chat, tmp_path_factory) -> dict:
    """Per-rank engines, concurrently: the chat rank twice (seeded), and tiny-opt (no
    template) without and with config vllm.chat_template."""
    work = tmp_path_factory.mktemp("chat")
    template = work / "template.jinja"
    template.write_text(TEMPLATE)
    chat_only = [{"messages": CHAT, "max_tokens": 4}]
    runs = {
        "a": (work / "a", write_rank(work / "a", 3, LINES), settings(tiny_chat)),
        "b": (work / "b", write_rank(work / "b", 3, LINES), settings(tiny_chat)),
        "none": (work / "none", write_rank(work / "none", 1, chat_only), settings(TINY_MODEL)),
        "file": (
            work / "file",
            # and a chat as OpenAI text parts, after the string they join into
            write_rank(
                work / "file",
                1,
                [
                    *chat_only,
                    {"messages": JOINED, "max_tokens": 4},
                    {"messages": PARTS, "max_tokens": 4},
                ],
            ),  # fmt: skip
            settings(TINY_MODEL, chat_template=str(template)),
        ),
    }
    # a rank stopped after its first answer: that answer is kept, the rest generated
    kept = write_rank(work / "kept", 3, LINES)
    key = partial_key(kept, checks.parse_settings(json.dumps(settings(tiny_chat))))
    partial = Partial(work / "kept" / "results" / "3.jsonl", key)
    partial.open({})
    partial.add(0, Answer("KEPT", "stop", 99, 1))
    partial.close()
    runs["kept"] = (work / "kept", kept, settings(tiny_chat))
    started = {name: per_rank(*spec) for name, spec in runs.items()}
    done = {}
    for name, proc in started.items():
        out, err = proc.communicate(timeout=900)
        done[name] = {"code": proc.returncode, "stderr": err, "dir": runs[name][0]}
    return done


@pytest.mark.vllm
def test_per_rank_chat_renders_the_models_template_and_repeats_when_seeded(
    per_rank_runs, tiny_chat, rendered
):
    a, b = per_rank_runs["a"], per_rank_runs["b"]
    assert a["code"] == 0, a["stderr"][-3000:]
    assert b["code"] == 0, b["stderr"][-3000:]
    first = (a["dir"] / "results" / "3.jsonl").read_bytes()
    assert first == (b["dir"] / "results" / "3.jsonl").read_bytes()  # seeded rerun: same bytes
    batch, short, plain = answers(a["dir"] / "results" / "3.jsonl")
    assert batch["custom_id"] == "b-1" and short["id"] == "s-1" and plain["id"] == 3
    # the prompt the engine counted is the chat as vLLM renders it, markers included
    ids = rendered["chat"]
    assert usage(batch) == (len(ids), 8)
    assert usage(short) == (len(rendered["user"]), 6)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_chat))
    marker_ids = tokenizer.convert_tokens_to_ids(MARKERS)  # one special token each
    assert all(i in ids for i in marker_ids) and tokenizer.unk_token_id not in marker_ids
    assert usage(plain)[1] == 16
    record = json.loads((a["dir"] / "results" / "3.json").read_text())
    assert record["prompts"] == 3
    assert record["prompt_tokens"] == sum(usage(x)[0] for x in (batch, short, plain))
    assert record["output_tokens"] == 8 + 6 + 16
    assert not (a["dir"] / "results" / ".partial" / "3.jsonl").exists()


@pytest.mark.vllm
def test_a_per_rank_engine_keeps_the_answers_of_a_stopped_attempt(per_rank_runs, rendered):
    run = per_rank_runs["kept"]
    assert run["code"] == 0, run["stderr"][-3000:]
    batch, short, plain = answers(run["dir"] / "results" / "3.jsonl")
    body = batch["response"]["body"]
    assert body["choices"][0]["message"]["content"] == "KEPT" and usage(batch) == (99, 1)
    assert usage(short) == (len(rendered["user"]), 6)
    assert usage(plain)[1] == 16
    record = json.loads((run["dir"] / "results" / "3.json").read_text())
    assert record["resumed"] == 1 and record["output_tokens"] == 1 + 6 + 16
    partial = run["dir"] / "results" / ".partial"
    assert not partial.exists() or not any(partial.iterdir())


@pytest.mark.vllm
def test_a_model_without_a_template_needs_config_chat_template(per_rank_runs, rendered):
    none, given = per_rank_runs["none"], per_rank_runs["file"]
    assert none["code"] == 2
    assert "1.jsonl: line 1: messages need a chat template" in none["stderr"]
    assert "config vllm.chat_template" in none["stderr"]
    assert not (none["dir"] / "results" / "1.jsonl").exists()
    assert given["code"] == 0, given["stderr"][-3000:]
    line, joined, from_parts = answers(given["dir"] / "results" / "1.jsonl")
    assert usage(line) == (len(rendered["templated chat"]), 4)
    # a per-rank engine answers text parts as the string they join into (seeded)
    assert usage(joined) == (len(rendered["templated joined"]), 4)
    assert from_parts == joined | {"id": 3}


@pytest.mark.vllm
def test_warm_chat_through_vllm_server(tiny_chat, rendered, tmp_path):
    port = free_port()
    key = lifecycle.new_api_key()
    argv = lifecycle.server_argv(PYTHON, str(tiny_chat), port, ENGINE_SETTINGS, 1)
    slot = node_layout.Slot("localhost", (0,))
    placement = tiles.engine_env(slot, "FLAT", free_port(), tmp_path / "t")
    base = {**os.environ, **TASK_ENV, lifecycle.API_KEY_VARIABLE: key}
    env = lifecycle.engine_environment(placement, ENGINE_SETTINGS, base)  # its KV cache size too
    engine = Engine(argv, env, tmp_path / "engine.log", port, name="chat", api_key=key)
    engine.start()
    try:
        engine.wait_ready(READY_TIMEOUT)
        pool = registry_pool(tmp_path / "registry", engine)
        counted = client.tokenize_messages(engine.url, CHAT, key=key)
        assert counted.ids == rendered["chat"]  # the engine's /tokenize: vLLM's rendering
        config = checks.parse_settings(json.dumps(settings(tiny_chat)))
        outputs = []
        for name in ("first", "again"):
            rank_file = write_rank(tmp_path / name, 3, LINES)
            out = tmp_path / name / "results" / "3.jsonl"
            serve_rank(3, config, rank_file, out, pool)
            outputs.append(out.read_bytes())
        assert outputs[0] == outputs[1]  # seeded rerun: same bytes
        batch, short, plain = answers(tmp_path / "first" / "results" / "3.jsonl")
        assert usage(batch) == (len(counted.ids), 8)
        assert usage(short) == (len(rendered["user"]), 6)
        assert batch["response"]["body"]["object"] == "chat.completion"
        assert isinstance(batch["response"]["body"]["choices"][0]["message"]["content"], str)
        assert usage(plain)[1] == 16
    finally:
        engine.stop()


@pytest.mark.vllm
def test_jsonl_chat_and_in_ranks_through_the_workflow(tiny_chat, rendered, tmp_path):
    """One local run (warm engine) over a .in rank and a JSONL rank of chat requests:
    each answer line field by field, the rendered chat's tokens counted, content parts
    answered as their string twin, the .in rank in the seed's format."""
    from transformers import AutoTokenizer

    jsonl = [
        LINES[0],
        {"id": "parts", "messages": PARTS[1:], "seed": 7},
        {"id": "string", "messages": JOINED[1:], "seed": 7},
        {"prompt": "To solve climate change, the world must", "max_tokens": 5},
    ]
    work = make_workdir(
        tmp_path,
        {"0.in": "Hello there\nThe sky is\n",
         "1.jsonl": "".join(json.dumps(x) + "\n" for x in jsonl)},
    )  # fmt: skip
    sampling = dict(temperature=0.8, top_p=0.95, max_tokens=6, seed=1234, ignore_eos=True)
    # one warm engine: both ranks on it, one vLLM start; ports of its own (other
    # sessions on this machine may run engines on the default ones)
    config = local_config(work, model="./models/tiny-chat", sampling=sampling,
                          tiles={"per_node": 1, "base_port": 34500},
                          vllm={"served_model_name": "tiny-chat"})  # fmt: skip
    result = snakemake(work, configfiles=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    results = work / "results"

    # the .in rank: the seed's records, its prompts in order
    records = read_records(results / "0.out")
    assert [prompt for prompt, _ in records] == ["Hello there", "The sky is"]
    assert all(isinstance(text, str) and text for _, text in records)

    batch, from_parts, from_string, plain = answers(results / "1.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_chat))

    def raw(messages) -> int:  # the contents' tokens, no template
        return sum(len(tokenizer.encode(m["content"], add_special_tokens=False)) for m in messages)

    assert set(batch) == {"id", "custom_id", "response", "error"}
    assert batch["custom_id"] == "b-1" and batch["error"] is None
    assert batch["id"].startswith("batch_req_")
    body = batch["response"]["body"]
    assert batch["response"]["status_code"] == 200
    assert (body["object"], body["model"], body["created"]) == ("chat.completion", "tiny-chat", 0)
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"  # ignore_eos: all max_completion_tokens
    prompt_tokens = len(rendered["chat"])
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 8,
                             "total_tokens": prompt_tokens + 8}  # fmt: skip
    assert prompt_tokens > raw(CHAT)  # the template's markers reached the engine

    string_chat = JOINED[1:]
    assert set(from_string) == {"id", "text", "finish_reason", "prompt_tokens", "output_tokens"}
    assert from_string["id"] == "string" and from_string["finish_reason"] == "length"
    assert from_string["prompt_tokens"] == len(rendered["user joined"])
    assert rendered["user parts"] == rendered["user joined"]  # vLLM joins text parts too
    assert from_string["prompt_tokens"] > raw(string_chat)
    assert from_string["output_tokens"] == 6
    # text parts: the same request as its joined string, the same seeded answer
    assert from_parts == from_string | {"id": "parts"}

    assert plain["id"] == 4 and plain["finish_reason"] == "length"
    assert plain["prompt_tokens"] == len(tokenizer.encode(jsonl[3]["prompt"]))
    assert plain["output_tokens"] == 5

    rank = json.loads((results / "records" / "1.json").read_text())
    lines = (batch, from_parts, from_string, plain)
    assert rank["prompts"] == 4
    assert rank["output_tokens"] == 8 + 6 + 6 + 5
    assert rank["prompt_tokens"] == sum(usage(x)[0] for x in lines)
    rows = (results / "summary.tsv").read_text().splitlines()
    assert [row.split("\t")[:3] for row in rows[1:]] == [["0", "2", "12"], ["1", "4", "25"]]
    partial = results / ".partial"
    assert not partial.exists() or not any(partial.iterdir())
