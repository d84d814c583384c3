"""How much of a warm engine's KV cache the requests in flight to it may claim.

Many ranks in flight keep an engine's batch full of short requests, but requests that
generate long answers then outgrow the KV cache: vLLM's scheduler admits a request when
its prompt fits and preempts running ones when their answers no longer do, computing
their tokens again (generation_batch's warm side, 2026-12-07: 64 ranks in flight per
engine, 1,147 preemptions, 607 s; 16 ranks in flight, none, 582 s; 64 with this window,
none, 585 s with 107 requests running against 62). So a Snakemake process sends
a completion request only when its tokens (prompt, estimated, plus its max_tokens, in
whole blocks) fit beside those of the requests already in flight to that engine: the
engine's batch is as full as its cache allows, and nothing is computed twice.

The cache is the engine's own report (client.kv_cache: vLLM's /metrics), read once per
engine start; an engine that tells none (the echo engine without its flags) has no
window, and one request always goes even when it claims more than the whole cache.

An engine whose window has requests waiting is crowded: the routing pool gives it no
new rank while another engine has room, and none at all until its waiting requests are
in (engine/routing.py). The ranks beyond what the caches hold then wait for whichever
engine frees room first, not in the queue of the engine that took them: a rank of many
requests no longer holds smaller ones behind it while another engine has room.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence

from engine import client

# Bytes of prompt per token at the fewest: a prompt's tokens are estimated, not counted
# (counting would cost each rank a /tokenize per request), and English takes ~4 bytes
# a token with the BPE tokenizers vLLM serves; fewer bytes a token (other scripts, code)
# only makes the estimate short, and the engine's scheduler still holds the rest.
BYTES_PER_TOKEN = 3
MESSAGE_TOKENS = 8  # a chat message's role and template markers


class KvWindow:
    """The blocks of one engine's KV cache that requests in flight have claimed."""

    def __init__(self, cache: client.KvCache):
        self.cache = cache
        self.claimed = 0
        self.peak = 0  # most blocks claimed at once
        self.waiting = 0  # requests waiting for their blocks
        self._cond = threading.Condition()

    @property
    def crowded(self) -> bool:
        """Requests wait for blocks: the engine's batch is full and it has more to run."""
        return self.waiting > 0

    def blocks(self, tokens: int) -> int:
        return min(self.cache.blocks, max(1, math.ceil(tokens / self.cache.block_size)))

    @contextlib.contextmanager
    def claim(self, tokens: int) -> Iterator[None]:
        """Hold the blocks of a request of ``tokens`` tokens while it is in flight (waits
        until they fit beside the others', or none is in flight)."""
        need = self.blocks(tokens)
        uncrowded = False
        with self._cond:
            if self.claimed and self.claimed + need > self.cache.blocks:
                self.waiting += 1
                while self.claimed and self.claimed + need > self.cache.blocks:
                    self._cond.wait()
                self.waiting -= 1
                uncrowded = not self.waiting
            self.claimed += need
            self.peak = max(self.peak, self.claimed)
        if uncrowded:
            _tell_room()
        try:
            yield
        finally:
            with self._cond:
                self.claimed -= need
                self._cond.notify_all()


class _Entry:
    def __init__(self):
        self.lock = threading.Lock()
        self.read = False
        self.window: KvWindow | None = None


_ENTRIES: dict[tuple, _Entry] = {}
_LOCK = threading.Lock()
_WATCHERS: list[weakref.WeakMethod] = []  # told when a crowded window is no longer


def watch(method: Callable[[], None]) -> None:
    """Call the bound ``method`` (without a lock of this module held) whenever a crowded
    window's last waiting request is in; kept only while its object lives."""
    with _LOCK:
        _WATCHERS[:] = [w for w in _WATCHERS if w() is not None]
        _WATCHERS.append(weakref.WeakMethod(method))


def _tell_room() -> None:
    with _LOCK:
        methods = [m for w in _WATCHERS if (m := w()) is not None]
    for method in methods:
        method()


def crowded(url: str, engine_id: str | None) -> bool:
    """Whether the window of that engine start has requests waiting; False for an
    engine without a window or whose cache is not read yet (no network here)."""
    entry = _ENTRIES.get((url, engine_id))
    window = entry.window if entry is not None else None
    return window is not None and window.crowded


def of(url: str, engine_id: str | None) -> KvWindow | None:
    """The window of the engine started as ``engine_id`` at ``url`` (its cache read at
    the first request; the others to it wait for that one read)."""
    with _LOCK:
        entry = _ENTRIES.setdefault((url, engine_id), _Entry())
    with entry.lock:
        if not entry.read:
            cache = client.kv_cache(url)
            entry.window = KvWindow(cache) if cache else None
            entry.read = True
    return entry.window


def prompt_tokens(given: str | Sequence[int] | Sequence[Mapping]) -> int:
    """A request's prompt tokens, estimated: a text's bytes over BYTES_PER_TOKEN, token
    ids as they are, chat messages by their contents' bytes and MESSAGE_TOKENS each."""
    if isinstance(given, str):
        return math.ceil(len(given.encode()) / BYTES_PER_TOKEN)
    if given and isinstance(given[0], Mapping):
        return sum(MESSAGE_TOKENS + prompt_tokens(str(m.get("content") or "")) for m in given)
    return len(given)
