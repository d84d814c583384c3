"""scripts/engine/echo_server.py: the stand-in for vLLM's server that `engine: echo` runs warm.

Each test talks to a real server process on a free port through lifecycle.py's own client
(complete, tokenize, health), as the pipeline's ranks do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine import client, lifecycle
from workflow import free_port, wait_until

SERVER = Path(__file__).resolve().parents[1] / "scripts" / "engine" / "echo_server.py"
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16, "seed": 0, "ignore_eos": True}
MAX_MODEL_LEN = 32
# Arguments only vLLM's server takes: the echo server ignores them.
VLLM_ARGS = ["--dtype", "bfloat16", "--enforce-eager", "--generation-config", "vllm"]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path


def start(log: Path, *args: str, env: dict | None = None) -> Server:
    port = free_port()
    argv = [sys.executable, str(SERVER), "--port", str(port), *args]
    with log.open("w") as stderr:
        process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, **(env or {})}
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 20
    while not client.health(server.url, timeout=1.0):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(server)
            pytest.fail(f"echo server did not start: {log.read_text()}")
        time.sleep(0.05)
    return server


def stop(server: Server) -> None:
    if server.process.poll() is None:
        server.process.kill()
    server.process.wait(timeout=10)


@pytest.fixture
def make_server(tmp_path) -> Iterator:
    """start(...) for a test; every server it started is killed at the end."""
    started: list[Server] = []

    def make(*args: str) -> Server:
        started.append(start(tmp_path / f"server{len(started)}.log", *args))
        return started[-1]

    yield make
    for server in started:
        stop(server)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("echo") / "server.log"
    server = start(log, "--model", "tiny-opt", "--max-model-len", str(MAX_MODEL_LEN), *VLLM_ARGS)
    try:
        yield server
    finally:
        stop(server)


def get(url: str) -> tuple[int, str]:
    try:
        with _NO_PROXY.open(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _NO_PROXY.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_startup_line(server):
    assert "Application startup complete." in server.log.read_text()


def test_complete_echoes_prompts_in_order(server):
    prompts = ["The capital of France is", "Hello", "one two three", "  spaced   words  "]
    done = client.complete(server.url, prompts, SAMPLING)
    assert done.texts == prompts
    assert done.finish_reasons == ["length"] * 4
    assert done.prompt_tokens == 5 + 1 + 3 + 2
    assert done.completion_tokens == done.prompt_tokens


def test_complete_answers_with_model_name(server):
    status, data = post(
        server.url + "/v1/completions", json.dumps({"prompt": "a single prompt"}).encode()
    )
    assert status == 200
    assert data["model"] == "tiny-opt"
    assert data["object"] == "text_completion"
    assert [c["text"] for c in data["choices"]] == ["a single prompt"]
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_tokenize(server):
    with_bos = client.tokenize(server.url, "The capital of France is")
    without = client.tokenize(server.url, "The capital of France is", add_special_tokens=False)
    assert len(with_bos.ids) == 6 and with_bos.ids[0] == 2
    assert with_bos.ids[1:] == without.ids and len(without.ids) == 5
    assert with_bos.max_model_len == without.max_model_len == MAX_MODEL_LEN
    # Stable ids: the same word, the same id.
    assert client.tokenize(server.url, "is The", False).ids == [without.ids[4], without.ids[0]]


def test_overlong_prompt_is_rejected(server):
    long_prompt = " ".join(["word"] * (MAX_MODEL_LEN + 1))
    with pytest.raises(client.RequestRejected) as caught:
        client.complete(server.url, ["short", long_prompt], SAMPLING)
    assert caught.value.status == 400
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in caught.value.message
    assert f"{MAX_MODEL_LEN + 1} input tokens" in caught.value.message
    # Exactly max_model_len words still fit.
    fits = " ".join(["word"] * MAX_MODEL_LEN)
    assert client.complete(server.url, [fits], SAMPLING).texts == [fits]


def test_token_id_prompts(server):
    done = client.complete(server.url, [[2, 31414, 232], [2, 7]], SAMPLING)
    assert done.texts == ["2 31414 232", "2 7"]
    assert done.prompt_tokens == 5
    with pytest.raises(client.RequestRejected):
        client.complete(server.url, [list(range(MAX_MODEL_LEN + 1))], SAMPLING)


def test_chat_is_rendered_with_the_echo_template(server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    reply = client.complete_one(server.url, SAMPLING, messages=messages)
    assert reply.text == "<|system|> be brief\n<|user|> hi\n<|assistant|>"
    # the markers are part of the prompt the engine counts, as /tokenize says
    counted = client.tokenize_messages(server.url, messages)
    assert reply.prompt_tokens == len(counted.ids) == 6
    one = client.complete_one(server.url, SAMPLING, prompt="just text")
    assert (one.text, one.prompt_tokens, one.completion_tokens) == ("just text", 2, 2)


def test_bad_requests(server):
    status, data = post(server.url + "/v1/completions", b"{not json")
    assert status == 400
    assert data["error"]["type"] == "BadRequestError" and data["error"]["code"] == 400
    status, data = post(server.url + "/v1/completions", b'{"max_tokens": 4}')
    assert status == 400 and "prompt" in data["error"]["message"]
    status, data = post(server.url + "/v1/completions", b'{"prompt": [1, "a"]}')
    assert status == 400
    status, data = post(server.url + "/tokenize", b'{"add_special_tokens": true}')
    assert status == 400
    status, data = post(server.url + "/v1/chat/completions", b"{}")
    assert status == 400 and "messages" in data["error"]["message"]
    bad_role = b'{"messages": [{"role": "user", "content": 3}]}'
    assert post(server.url + "/v1/chat/completions", bad_role)[0] == 400
    assert post(server.url + "/v1/responses", b"{}")[0] == 404
    assert post(server.url + "/v1/embeddings", b"{}")[0] == 400  # no input
    assert get(server.url + "/nowhere")[0] == 404
    status, body = get(server.url + "/health")
    assert (status, body) == (200, "")


def success_total(metrics: str) -> int:
    (line,) = [x for x in metrics.splitlines() if x.startswith("vllm:request_success_total{")]
    assert 'model_name="tiny-opt"' in line
    return int(float(line.rsplit(" ", 1)[1]))


def test_metrics_count_successes(server):
    status, before = get(server.url + "/metrics")
    assert status == 200
    assert 'vllm:num_requests_running{model_name="tiny-opt"} 0' in before.splitlines()
    client.complete(server.url, ["a", "b", "c"], SAMPLING)
    _, after = get(server.url + "/metrics")
    # As in vLLM, each prompt of a request is one request.
    assert success_total(after) == success_total(before) + 3


def running(server: Server) -> int:
    """The requests in flight, as the server's /metrics counts them (vLLM's gauge)."""
    metrics = get(server.url + "/metrics")[1]
    (line,) = [x for x in metrics.splitlines() if x.startswith("vllm:num_requests_running{")]
    return int(float(line.rsplit(" ", 1)[1]))


def test_requests_running_with_delay(make_server):
    server = make_server("--delay", "1.5", "--model", "tiny-opt")
    thread = threading.Thread(target=client.complete, args=(server.url, ["x", "y"], SAMPLING))
    thread.start()
    try:
        assert wait_until(lambda: running(server) == 2, 30, poll=0.05), (
            "the delayed request never showed as running"
        )
    finally:
        thread.join(timeout=10)
    _, metrics = get(server.url + "/metrics")
    assert 'vllm:num_requests_running{model_name="tiny-opt"} 0' in metrics.splitlines()
    assert success_total(metrics) == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_server_cleanly(make_server, sig):
    # A request in flight does not hold the exit back.
    server = make_server("--delay", "30")
    outcome: list[BaseException] = []

    def in_flight() -> None:
        try:
            client.complete(server.url, ["x"], SAMPLING, timeout=40)
        except BaseException as error:  # checked below
            outcome.append(error)

    thread = threading.Thread(target=in_flight, daemon=True)
    thread.start()
    assert wait_until(lambda: running(server) == 1, 30), "the request never was in flight"
    server.process.send_signal(sig)
    # ends at once, not after the 30 s the request is held: the request fails below
    assert server.process.wait(timeout=25) == 0
    assert not client.health(server.url, timeout=1.0)
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], client.EngineUnavailable), outcome


def test_concurrent_requests(server):
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        prompts = [f"request {i} prompt {j}" for j in range(3)]
        try:
            results[i] = client.complete(server.url, prompts, SAMPLING, timeout=60).texts
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[:3]
    assert results == {i: [f"request {i} prompt {j}" for j in range(3)] for i in range(200)}


def test_with_a_key_requests_without_it_are_refused(tmp_path):
    key = lifecycle.new_api_key()
    server = start(tmp_path / "keyed.log", env={lifecycle.API_KEY_VARIABLE: key})
    try:
        for wrong in (None, key[:-1]):
            with pytest.raises(client.RequestRejected) as caught:
                client.complete(server.url, ["a b"], SAMPLING, key=wrong)
            assert caught.value.status == 401 and "Unauthorized" in caught.value.message
            with pytest.raises(client.RequestRejected):
                client.tokenize(server.url, "a b", key=wrong)
        assert client.complete(server.url, ["a b"], SAMPLING, key=key).texts == ["a b"]
        assert client.tokenize(server.url, "a b", key=key).ids[0] == 2
        assert client.health(server.url)  # open, for the pools' checks
    finally:
        stop(server)
    assert key not in (tmp_path / "keyed.log").read_text()


def test_key_file_is_private(tmp_path):
    lifecycle.write_key_file(tmp_path / "r0-3.key", "secret")
    assert (tmp_path / "r0-3.key").read_text() == "secret"
    assert (tmp_path / "r0-3.key").stat().st_mode & 0o777 == 0o600
