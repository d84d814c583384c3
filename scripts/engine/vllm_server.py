"""A warm engine with vLLM's engine in this process: the OpenAI endpoints our client uses.

Config `warm.server: inprocess` (the default) starts this instead of vLLM's own server
(`python -m vllm.entrypoints.openai.api_server`, `warm.server: vllm`). vLLM's server
splits an engine into two processes, the API front end and an EngineCore it talks to
over ZeroMQ. On a 2-core Intel Xeon (AVX-512/AMX) that split went wrong: the front end
shut its live EngineCore down in the middle of a request (`[shutdown] Process manager:
send sigterm to process EngineCore`, then `engine core exited unexpectedly`, HTTP 500),
timing-dependent, once in four fresh servers; an in-process `LLM.generate` of the same
requests never failed (README, "Warm engines"). Here the engine runs as `LLM.generate`
runs it (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one `LLMEngine` stepped by one thread),
so there is no second process to lose, and one `import vllm` per engine instead of two.

    GET  /health           200 once the engine is built ({"engine_id": ...}, as echo_server.py);
                           503 after an engine failure. The port is held from the start.
    POST /tokenize         the engine's tokenizer: tokens, count, max_model_len (of a
                           prompt, or of messages as their chat template renders them)
    POST /v1/completions   prompts (strings or token ids), sampling fields, in prompt order
    POST /v1/chat/completions  messages rendered with the model's chat template (or the
                           --chat-template file), then as one completion
    POST /v1/embeddings    texts embedded by a pooling model (--runner pooling), as LLM.embed
                           embeds them; refused on a generation model, and completions and
                           chats refused on a pooling model
    GET  /metrics          vllm:num_requests_running, vllm:request_success_total

Every prompt of a request is one engine request, so the prompts of all ranks in flight
are batched together (continuous batching, as in vLLM's server). The argv is vLLM's
engine arguments (parsed by vLLM's own parser) plus --host and --port. An engine step
that raises ends the server (exit 3) after answering HTTP 500 to the requests in flight:
the watchdog sees it exit and the pool restarts it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

# Before vLLM is imported: the engine core in this process (as LLM.generate with it).
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from pathlib import Path

if __package__ in (None, ""):  # run as a file: scripts/, not this file's folder, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from engine import (  # noqa: E402
    chat_template,  # noqa: E402
    openai_params,
    vllm_versions,
)
from engine.echo_server import (  # noqa: E402
    ENGINE_ID_VARIABLE,
    BadRequest,
    Handler,
    embedding_inputs,
    embedding_usage,
    messages_of,
    metrics_text,
    prompts_of,
    serve,
)

# What a request refused here is told (engine/openai_params.py names the server that serves it).
ENGINE = "the in-process server (warm.server: inprocess)"


@dataclass
class _Batch:
    """The prompts of one request (/v1/completions, or /v1/embeddings), answered together."""

    prompts: list[list[int]]  # token ids
    params: object  # SamplingParams, or PoolingParams
    done: threading.Event = field(default_factory=threading.Event)
    outputs: dict = field(default_factory=dict)  # prompt index -> its outputs (a list: n)
    prompt_tokens: int = 0
    error: Exception | None = None


class VllmServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(
        self,
        address,
        engine,
        model_name: str,
        chat_template: str | None = None,
        listener: socket.socket | None = None,
    ):
        super().__init__(address, Handler, bind_and_activate=listener is None)
        if listener is not None:  # the port held since start (hold_port) is taken over
            self.socket.close()
            self.socket = listener
            self.server_address = listener.getsockname()
        self.chat_template = chat_template
        self.engine_id = os.environ.get(ENGINE_ID_VARIABLE)  # Handler's /health
        self.engine = engine
        self.model = model_name
        self.max_model_len = engine.model_config.max_model_len
        self.pooling = vllm_versions.is_pooling(engine)
        self.tokenizer = engine.get_tokenizer()
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not thread-safe
        self._incoming: queue.Queue[_Batch] = queue.Queue()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.running = 0
        self.succeeded = 0
        self.failure: str | None = None
        self._stepper = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stepper.start()

    # --- the engine thread: the only one that touches the engine ---------------------

    def _run(self) -> None:
        batches: dict[str, tuple[_Batch, int]] = {}  # engine request id -> (batch, index)
        try:
            while True:
                block = not self.engine.has_unfinished_requests()
                try:
                    while True:
                        self._admit(self._incoming.get(block=block, timeout=0.5), batches)
                        block = False
                except queue.Empty:
                    pass
                if self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        if output.finished:
                            self._finish(output, batches)
        except Exception as error:  # the engine is broken: answer, then end the server
            self.failure = f"engine step failed: {type(error).__name__}: {error}"
            print(f"vllm_server: {self.failure}", file=sys.stderr, flush=True)
            for batch, _index in list(batches.values()):
                batch.error = RuntimeError(self.failure)
                batch.done.set()
            while True:  # requests that arrive until the server is down
                batch = self._incoming.get()
                batch.error = RuntimeError(self.failure)
                batch.done.set()

    def _admit(self, batch: _Batch, batches: dict) -> None:
        added = []
        for index, prompt in enumerate(batch.prompts):
            request_id = f"{next(self._ids)}"
            try:
                self.engine.add_request(request_id, {"prompt_token_ids": prompt}, batch.params)
            except Exception as error:  # vLLM's validation: too long, bad value
                if not openai_params.is_refusal(error):
                    raise
                if added:
                    self.engine.abort_request(added)
                for rid in added:
                    batches.pop(rid, None)
                with self._lock:
                    self.running -= len(added)
                batch.error = BadRequest(str(error))
                batch.done.set()
                return
            added.append(request_id)
            batches[request_id] = (batch, index)
            with self._lock:
                self.running += 1

    def _finish(self, output, batches: dict) -> None:
        batch, index = batches.pop(output.request_id)
        outputs = output.outputs  # a pooling request's is one PoolingOutput
        batch.outputs[index] = list(outputs) if isinstance(outputs, list) else [outputs]
        batch.prompt_tokens += len(output.prompt_token_ids or ())
        with self._lock:
            self.running -= 1
            self.succeeded += 1
        if len(batch.outputs) == len(batch.prompts):
            batch.done.set()

    # --- the HTTP side (Handler's threads) -------------------------------------------

    def healthy(self) -> bool:
        return self.failure is None

    def completion(self, body: dict, endpoint: str = "completions") -> dict:
        prompts = prompts_of(body)
        # "echo" is served here for completions (the benchmarks' prompt-only requests)
        allowed = ("echo",) if endpoint == "completions" else ()
        if self.pooling:
            raise BadRequest(
                f"{self.model} is served as a pooling model (engine argument --runner "
                "pooling): it answers /v1/embeddings, not completions or chats"
            )
        try:
            params = openai_params.sampling_params(endpoint, body, ENGINE, allowed)
        except openai_params.Refused as error:
            raise BadRequest(str(error)) from None
        if self.failure:
            raise RuntimeError(self.failure)
        # Tokenized here, as vLLM's server does, so that its length check and message hold.
        ids = [p if isinstance(p, list) else self._encode(p, True) for p in prompts]
        batch = self._answered(ids, params, room=1)  # a token to generate
        echoed = [self._prompt_text(p) for p in prompts] if body.get("echo") else None
        choices = []
        with self._tokenizer_lock:
            for i in range(len(prompts)):
                outputs = batch.outputs[i]
                first = len(choices)
                choices += openai_params.choices(endpoint, body, outputs, self.tokenizer, first)
        if echoed:
            for choice in choices:
                choice["text"] = echoed[choice["index"] // params.n] + choice["text"]
        completion_tokens = sum(
            len(o.token_ids) for outputs in batch.outputs.values() for o in outputs
        )
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": batch.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": batch.prompt_tokens + completion_tokens,
            },
        }

    def _answered(self, ids: list[list[int]], params, room: int) -> _Batch:
        """The prompts' outputs from the engine thread; BadRequest for one too long."""
        for prompt_ids in ids:
            if len(prompt_ids) + room > self.max_model_len:
                raise BadRequest(
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, your prompt contains {len(prompt_ids)} input tokens. "
                    "Please reduce the length of the input prompt."
                )
        batch = _Batch(ids, params)
        self._incoming.put(batch)
        batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return batch

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _prompt_text(self, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        with self._tokenizer_lock:
            return self.tokenizer.decode(prompt)

    def _chat_ids(self, messages: list) -> list[int]:
        """The messages as LLM.chat renders them (chat_template.chat_token_ids)."""
        try:
            with self._tokenizer_lock:
                return chat_template.chat_token_ids(
                    self.tokenizer, messages, self.chat_template, "messages"
                )
        except chat_template.ChatTemplateError as error:
            raise BadRequest(str(error)) from None

    def chat(self, body: dict) -> dict:
        """/v1/chat/completions: the rendered messages as one completion."""
        ids = self._chat_ids(messages_of(body))
        rest = {k: v for k, v in body.items() if k != "messages"}
        answer = self.completion({**rest, "prompt": ids}, "chat")
        return answer | {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion"}

    def embeddings(self, body: dict) -> dict:
        """/v1/embeddings: each text of ``input`` embedded as LLM.embed embeds it."""
        if not self.pooling:
            raise BadRequest(
                f"{self.model} is served as a generation model: /v1/embeddings needs a "
                "pooling model's engines (config vllm.engine_args: [--runner, pooling])"
            )
        texts = embedding_inputs(body)
        if self.failure:
            raise RuntimeError(self.failure)
        ids = [self._encode(text, True) for text in texts]
        params = vllm_versions.embed_params(self.engine.model_config)
        batch = self._answered(ids, params, room=0)
        data = [
            {"object": "embedding", "index": i, "embedding": batch.outputs[i][0].data.tolist()}
            for i in range(len(texts))
        ]
        usage = embedding_usage([len(prompt_ids) for prompt_ids in ids])
        return {"object": "list", "data": data, "model": self.model, "usage": usage}

    def tokens(self, body: dict) -> dict:
        if isinstance(body, dict) and "messages" in body:
            ids = self._chat_ids(messages_of(body))
        elif isinstance(body, dict) and isinstance(body.get("prompt"), str):
            ids = self._encode(body["prompt"], bool(body.get("add_special_tokens", True)))
        else:
            raise BadRequest("the request has no prompt string")
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    def metrics(self) -> str:
        with self._lock:
            return metrics_text(self.model, self.running, self.succeeded)


def argument_parser():
    """vLLM's own parser of its engine arguments, plus --host and --port."""
    parser = vllm_versions.flexible_argument_parser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    # as vLLM's own server takes it: a template file for a model without its own
    parser.add_argument("--chat-template", default=None)
    return vllm_versions.engine_args_parser(parser)


def parse_args(argv: Sequence[str]):
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
    family = socket.AF_INET6 if ":" in known.host else socket.AF_INET
    return socket.create_server((known.host, known.port), family=family, backlog=1024)


def main(argv: Sequence[str]) -> int:
    try:
        listener = hold_port(argv)
    except OSError as error:
        print(f"vllm_server: cannot listen: {error}", file=sys.stderr)
        return 1
    args, engine_args = parse_args(argv)
    vllm_versions.pin_memory_only_where_it_exists()  # vLLM 0.15 on a CPU
    vllm_versions.without_chunked_prefill_on_cpu(engine_args)  # seeded requests
    # The engine first: /health waits (the port is held, nothing answers) until it can serve.
    engine = vllm_versions.llm_engine(engine_args)
    template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as handle:
            template = handle.read()
    server = VllmServer((args.host, args.port), engine, engine_args.model, template, listener)
    print(f"vllm_server: serving {engine_args.model} on {args.host}:{args.port}", file=sys.stderr)
    serve(server, stopped=lambda: server.failure is not None)
    sys.stderr.flush()
    # No vLLM teardown: the watchdog ends what is left of the process group.
    os._exit(3 if server.failure else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
