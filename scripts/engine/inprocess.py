"""vLLM's ``EngineClient`` over an ``LLMEngine`` stepped in this process.

vLLM's OpenAI server (its app, serving classes, request models, chat rendering, tool and
reasoning parsers, pooling handlers) talks to its engine only through the ``EngineClient``
protocol (``vllm/engine/protocol.py``). vLLM's own client, ``AsyncLLM``, always runs the
EngineCore in a second process. This one runs it as ``LLM.generate`` does: one
``LLMEngine`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) stepped by one thread, the engine
thread, which alone touches the engine. The asyncio side hands requests to it through a
queue and gets each request's outputs back through an asyncio queue of its own.

So vLLM's own front end serves from one process (engine/vllm_server.py): every endpoint
the installed vLLM serves, validated and shaped by vLLM's code, with no second process to
lose. A protocol method that has no meaning here (sleep, LoRA adapters at run time,
weight transfer, profiling) raises NotImplementedError naming itself.

An engine step that raises ends the engine: every request in flight and every later one
gets ``EngineDeadError``, ``errored`` turns true and ``failure`` says why; the server then
exits and the supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import queue
import sys
import threading
from collections.abc import Iterable

from vllm.engine.protocol import EngineClient
from vllm.outputs import PoolingRequestOutput, RequestOutput
from vllm.v1.engine.exceptions import EngineDeadError

_END = object()  # a request's stream is over (after its finished output, or its error)


def _put_all(handed) -> None:
    for stream_queue, item in handed:
        stream_queue.put_nowait(item)


class _Stream:
    """One request's outputs, handed from the engine thread to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@functools.cache
def _parameters(function) -> frozenset[str]:
    return frozenset(inspect.signature(function).parameters)


def _accepted(function, kwargs: dict) -> dict:
    """The keyword arguments ``function`` takes (vLLM 0.15 and 0.32 differ), None dropped.
    Its parameters are read once per function (a bound method by its function): reading
    them per request cost a per-rank engine a second in 10,240 embeddings."""
    names = _parameters(getattr(function, "__func__", function))
    return {k: v for k, v in kwargs.items() if k in names and v is not None}


class InProcessEngineClient(EngineClient):
    def __init__(self, engine):
        self.engine = engine
        self.vllm_config = engine.vllm_config
        self.model_config = engine.model_config
        self.input_processor = engine.input_processor
        self.io_processor = getattr(engine, "io_processor", None)
        self._supported_tasks = tuple(engine.get_supported_tasks())
        # The OpenMP threads vLLM's CPU worker set up in this (the building) thread: the
        # engine thread runs with as many, or vLLM 0.15's CPU attention refuses a step
        # whose metadata was planned for another count ("thread_num (1 vs. 2)").
        import torch

        self._threads = torch.get_num_threads()
        self._incoming: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # request id -> its stream (engine thread)
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # --- the engine thread -------------------------------------------------------------

    def _run(self) -> None:
        import torch

        torch.set_num_threads(self._threads)
        try:
            while True:
                block = not self.engine.has_unfinished_requests()
                try:
                    while True:
                        self._do(self._incoming.get(block=block, timeout=0.5 if block else None))
                        block = False
                except queue.Empty:
                    pass
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
        except Exception as error:  # the engine is broken: every request hears it
            self.failure = f"engine step failed: {type(error).__name__}: {error}"
            print(f"vllm_server: {self.failure}", file=sys.stderr, flush=True)
            dead = EngineDeadError(self.failure)
            while True:
                for stream in list(self._streams.values()):
                    stream.put(dead)
                self._streams.clear()
                item = self._incoming.get()  # requests that arrive until the server is down
                if item[0] == "add":
                    item[-1].put(dead)

    def _do(self, item) -> None:
        if item[0] == "abort":
            ids = [i for i in item[1] if self._streams.pop(i, None) is not None]
            if ids:
                self.engine.abort_request(ids)
            return
        _, request_id, prompt, params, kwargs, extras, stream = item
        try:
            if extras:  # the request's reasoning state: set on vLLM's request itself
                request = self.input_processor.process_inputs(
                    request_id,
                    prompt,
                    params,
                    **_accepted(
                        self.input_processor.process_inputs,
                        kwargs | {"supported_tasks": self._supported_tasks},
                    ),
                )
                for name, value in extras.items():
                    setattr(request, name, value)
                prompt, params = request, request.params
            self.engine.add_request(
                request_id, prompt, params, **_accepted(self.engine.add_request, kwargs)
            )
        except Exception as error:  # vLLM's validation of this request: its answer
            stream.put(error)
            return
        self._streams[request_id] = stream

    def _deliver(self, outputs) -> None:
        """A step's outputs to their streams, with one wake-up of the event loop for all
        of them (one a request woke it thousands of times a second for short prompts)."""
        handed: dict[asyncio.AbstractEventLoop, list] = {}  # one loop: the front end's
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted meanwhile
                continue
            handed.setdefault(stream.loop, []).append((stream.queue, output))
            if output.finished:
                del self._streams[output.request_id]
        for loop, items in handed.items():
            loop.call_soon_threadsafe(_put_all, items)

    # --- the asyncio side ---------------------------------------------------------------

    async def _outputs(self, request_id: str, prompt, params, kwargs: dict, extras: dict):
        if self.failure:
            raise EngineDeadError(self.failure)
        stream = _Stream(asyncio.get_running_loop())
        self._incoming.put(("add", request_id, prompt, params, kwargs, extras, stream))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the client went away: the engine stops on it
                self._incoming.put(("abort", [request_id]))

    async def generate(
        self,
        prompt,
        sampling_params,
        request_id: str,
        *,
        reasoning_ended=None,
        reasoning_parser_kwargs=None,
        **kwargs,
    ):
        extras = {"reasoning_ended": reasoning_ended}
        extras["reasoning_parser_kwargs"] = reasoning_parser_kwargs
        extras = {k: v for k, v in extras.items() if v is not None}
        async for output in self._outputs(request_id, prompt, sampling_params, kwargs, extras):
            assert isinstance(output, RequestOutput)
            yield output

    async def encode(self, prompt, pooling_params, request_id: str, *args, **kwargs):
        names = ("lora_request", "trace_headers", "priority", "tokenization_kwargs")
        kwargs |= dict(zip(names, args, strict=False))
        kwargs.pop("reasoning_ended", None)
        async for output in self._outputs(request_id, prompt, pooling_params, kwargs, {}):
            assert isinstance(output, PoolingRequestOutput)
            yield output

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self._incoming.put(("abort", ids))

    async def get_supported_tasks(self):
        return self._supported_tasks

    @property
    def renderer(self):
        return self.engine.renderer

    @property
    def is_running(self) -> bool:
        return self.failure is None

    @property
    def is_stopped(self) -> bool:
        return self.failure is not None

    @property
    def errored(self) -> bool:
        return self.failure is not None

    @property
    def dead_error(self) -> BaseException:
        return EngineDeadError(self.failure or "the engine stopped")

    async def check_health(self) -> None:
        if self.failure:
            raise self.dead_error

    async def is_tracing_enabled(self) -> bool:
        return False

    async def do_log_stats(self, *args, **kwargs) -> None:
        return None

    async def reset_mm_cache(self) -> None:
        return None

    async def reset_encoder_cache(self) -> None:
        return None

    async def reset_prefix_cache(self, *args, **kwargs) -> bool:
        raise NotImplementedError("reset_prefix_cache: not served by the in-process server")

    async def is_sleeping(self) -> bool:
        return False

    async def is_paused(self) -> bool:
        return False

    def shutdown(self, timeout: float | None = None) -> None:
        return None

    async def notify_kv_transfer_request_rejected(self, *args, **kwargs) -> None:
        return None


def _not_served(name: str):
    async def method(self, *args, **kwargs):
        raise NotImplementedError(f"{name}: not served by the in-process server")

    method.__name__ = name
    return method


# The protocol's methods that have no meaning for one engine stepped in this process.
for _name in (
    "start_profile",
    "stop_profile",
    "sleep",
    "wake_up",
    "release_kv_cache_memory",
    "add_lora",
    "pause_generation",
    "resume_generation",
):
    setattr(InProcessEngineClient, _name, _not_served(_name))
InProcessEngineClient.__abstractmethods__ = frozenset(
    name
    for name in InProcessEngineClient.__abstractmethods__
    if getattr(getattr(InProcessEngineClient, name, None), "__isabstractmethod__", False)
)
