"""A warm engine with vLLM's engine in this process, serving vLLM's own OpenAI front end.

Config `warm.server: inprocess` (the default) starts this instead of vLLM's own server
(`python -m vllm.entrypoints.openai.api_server`, `warm.server: vllm`). vLLM's server
splits an engine into two processes, the API front end and an EngineCore it talks to
over ZeroMQ. On a 2-core Intel Xeon (AVX-512/AMX) that split went wrong: the front end
shut its live EngineCore down in the middle of a request (`[shutdown] Process manager:
send sigterm to process EngineCore`, then `engine core exited unexpectedly`, HTTP 500),
timing-dependent, once in four fresh servers; an in-process `LLM.generate` of the same
requests never failed (README, "Warm engines"). Here the engine runs as `LLM.generate`
runs it (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one `LLMEngine` stepped by one thread,
engine/inprocess.py), so there is no second process to lose, and one `import vllm` per
engine instead of two.

The front end is vLLM's own: its app (`build_app`) and serving state (`init_app_state`)
over the in-process engine client, so every endpoint, request field, validation, error
and answer shape is the installed vLLM's (completions, chat with tools and reasoning
parsers, embeddings, score, rerank, tokenize, models, metrics). The argv is vLLM's
server's own (its parser: `--served-model-name`, `--tool-call-parser`,
`--enable-auto-tool-choice`, `--reasoning-parser`, `--chat-template`, the engine
arguments, `--host`, `--port`); the key is vLLM's (`VLLM_API_KEY`). Two routes are ours:

    GET /health   200 with {"engine_id": ...} (the id the supervisor gave this start,
                  client.identify) once the engine is built; 503 after an engine failure.
                  The port is held from the start.
    POST /token_counts  {"input": [text, ...]} -> {"counts": [n, ...]}: each text's
                  tokens by the engine's own tokenizer, special tokens added as for an
                  embedding. vLLM's /v1/embeddings tells only a call's total, so a rank
                  sends many embedding lines in one call and splits the usage by these
                  (rank/warm.py; it checks that they add up to vLLM's total).

An engine step that raises ends the server (exit 3) after vLLM's front end answered the
requests in flight: the watchdog sees it exit and the supervisor restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: scripts/, not this file's folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from engine import vllm_versions  # noqa: E402

ENGINE_ID_VARIABLE = "AURORA_ENGINE_ID"  # client.ENGINE_ID_VARIABLE
# A file to wait for before the engine is built (an engine started beside rule
# fetch_model: vLLM imported and the argv parsed meanwhile, the model loaded only once
# the rule's checks passed and its model-info cache is written).
GO_FILE_VARIABLE = "AURORA_ENGINE_GO_FILE"


def argument_parser():
    """vLLM's OpenAI server's own argument parser: this server takes the same argv."""
    return vllm_versions.server_arg_parser()


def parse_args(argv: Sequence[str]):
    """(vLLM's server arguments, the EngineArgs they make)."""
    args = argument_parser().parse_args(list(argv))
    return args, vllm_versions.engine_args_from(args)


def hold_port(argv: Sequence[str]) -> socket.socket:
    """The server's port, bound and listening before vLLM is imported: no other process
    can take it while the engine builds (tens of seconds). Connections wait in the
    backlog until the server answers them; OSError when the port is taken."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    known, _ = parser.parse_known_args(list(argv))
    family = socket.AF_INET6 if known.host and ":" in known.host else socket.AF_INET
    return socket.create_server((known.host or "", known.port), family=family, backlog=1024)


async def build_app(engine, args):
    """vLLM's own OpenAI app over ``engine`` (an LLMEngine in this process), with our
    /health; the engine client is ``app.state.engine_client``."""
    from fastapi.responses import JSONResponse, Response

    from engine.inprocess import InProcessEngineClient

    client = InProcessEngineClient(engine)
    app = await vllm_versions.openai_app(client, args)
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/health"]
    engine_id = os.environ.get(ENGINE_ID_VARIABLE)

    @app.get("/health")
    async def health():
        if client.failure is not None:
            return Response(status_code=503)
        return JSONResponse({"engine_id": engine_id}) if engine_id else Response(status_code=200)

    # first: vLLM 0.15 serves its own /health from a route mounted before it
    app.router.routes.insert(0, app.router.routes.pop())
    tokenizer = engine.tokenizer  # None with --skip-tokenizer-init

    @app.post("/token_counts")
    async def token_counts(body: dict):
        if tokenizer is None:
            return JSONResponse({"error": {"message": "no tokenizer"}}, 404)
        texts = body.get("input")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return JSONResponse({"error": {"message": "input: a list of strings"}}, 400)
        return JSONResponse({"counts": [len(tokenizer.encode(t)) for t in texts]})

    return app


async def serve(app, listener: socket.socket, stop=None) -> int:
    """Serve ``app`` on ``listener`` until SIGTERM/SIGINT (in the main thread), ``stop``
    (a threading.Event) or an engine failure; the exit status (3 after an engine failure)."""
    import uvicorn

    client = app.state.engine_client
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # ours, below
    if stop is None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))

    async def watch() -> None:
        while not server.should_exit:
            if stop is not None and stop.is_set():
                server.should_exit = True
            if client.failure is not None:
                await asyncio.sleep(0.5)  # the requests in flight get their answers
                server.should_exit = True
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    # the line vLLM's server prints once it serves; engine logs are read for it.
    print("Application startup complete.", file=sys.stderr, flush=True)
    await server.serve(sockets=[listener])
    watcher.cancel()
    return 3 if client.failure else 0


class Engine:
    """vLLM's front end over an engine built in this process, served from a thread on a
    loopback port: a per-rank engine (config warm_engines: false) answers a rank as a warm
    engine does, through the same client. ``argv``: vLLM's server arguments (from --model
    on), without --host and --port."""

    def __init__(self, argv: Sequence[str]):
        import threading

        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.api_key = None
        self.engine_id = None  # one engine in this process: its URL names it
        args, engine_args = parse_args([*argv, "--host", "127.0.0.1", "--port", str(port)])
        vllm_versions.pin_memory_only_where_it_exists()  # vLLM 0.15 on a CPU
        vllm_versions.without_chunked_prefill_on_cpu(engine_args)  # seeded requests
        engine = vllm_versions.llm_engine(engine_args)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None

        async def run() -> None:
            try:
                app = await build_app(engine, args)
            except BaseException as error:
                self._error = error
                raise
            finally:
                self._ready.set()
            await serve(app, self._listener, self._stop)

        self._thread = threading.Thread(
            target=asyncio.run, args=(run(),), name="front end", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def wait_for_file(path: str) -> None:
    """Until ``path`` exists (the supervisor stops this process if it never comes)."""
    print(f"vllm_server: waiting for {path}", file=sys.stderr, flush=True)
    while not os.path.exists(path):
        time.sleep(0.05)


def main(argv: Sequence[str], prepare: Callable[[], None] | None = None) -> int:
    """Serve; ``prepare``: run before waiting for the go file (model/fetch.py --serve: the
    model's checks and marker, in the first engine to claim them, beside rule fetch_model),
    after vLLM's imports, and also when this command line failed to parse."""
    # Before vLLM is imported: the engine core in this process (as LLM.generate with it).
    # A per-rank engine (Engine) keeps the task's own setting.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        listener = hold_port(argv)
    except OSError as error:
        print(f"vllm_server: cannot listen: {error}", file=sys.stderr)
        # EADDRINUSE as the status: the supervisor moves the engine to another port
        return errno.EADDRINUSE if error.errno == errno.EADDRINUSE else 1
    go = os.environ.get(GO_FILE_VARIABLE)
    try:
        args, engine_args = parse_args(argv)
        vllm_versions.pin_memory_only_where_it_exists()  # vLLM 0.15 on a CPU
        vllm_versions.without_chunked_prefill_on_cpu(engine_args)  # seeded requests
        if go:
            import vllm.v1.engine.llm_engine  # noqa: F401  (the rest of the imports, meanwhile)
    except BaseException:
        # Started beside rule fetch_model: its own check names what is wrong (the same
        # parser), so fail only if the rule passed (no restarts, no second message).
        if go:
            if prepare:
                prepare()
            wait_for_file(go)
        raise
    if go:
        if prepare:
            prepare()
        wait_for_file(go)
    # The engine first: /health waits (the port is held, nothing answers) until it can serve.
    engine = vllm_versions.llm_engine(engine_args)

    async def run() -> int:
        app = await build_app(engine, args)
        names = ", ".join(args.served_model_name or [args.model])
        print(f"vllm_server: serving {names} on {args.host}:{args.port}", file=sys.stderr)
        return await serve(app, listener)

    status = asyncio.run(run())
    sys.stderr.flush()
    # No vLLM teardown: the watchdog ends what is left of the process group.
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
