"""engine/kv_window.py: requests in flight to an engine claim no more than its KV cache.
The engines' own report is read from vLLM's /metrics (recorded lines of vLLM 0.32 and
0.15 here; a live vLLM engine's in tests/test_engine_lifecycle_vllm.py); the window over
echo engines in tests/test_service.py."""

from __future__ import annotations

import threading

from engine import client, kv_window
from workflow import wait_until

# vllm:cache_config_info as vLLM's /metrics gave it for models/tiny-opt with a 1 GiB CPU
# KV cache (2026-12-07; labels cut to the ones around the two read).
VLLM_032 = (
    'vllm:cache_config_info{_block_size_resolved="True",block_size="128",cache_dtype="auto",'
    'kv_cache_memory_bytes="1073741824",kv_cache_size_tokens="1048576",num_cpu_blocks="None",'
    'num_gpu_blocks="8192",num_gpu_blocks_override="None",sliding_window="None"} 1.0'
)
VLLM_015 = (
    'vllm:cache_config_info{block_size="128",cache_dtype="auto",'
    'cpu_kvcache_space_bytes="1073741824",num_cpu_blocks="0",num_gpu_blocks="8192",'
    'num_gpu_blocks_override="None",prefix_caching_hash_algo="sha256"} 1.0'
)


def test_the_kv_cache_is_read_from_vllms_cache_config_gauge():
    header = "# TYPE vllm:cache_config_info gauge\n"
    for line in (VLLM_032, VLLM_015):
        assert client.kv_cache_of(header + line + "\n") == client.KvCache(8192, 128)
    # no gauge, or no blocks yet: no window
    assert client.kv_cache_of("vllm:num_requests_running 0.0\n") is None
    unsized = VLLM_015.replace('num_gpu_blocks="8192"', 'num_gpu_blocks="None"')
    assert client.kv_cache_of(unsized) is None


def test_a_request_waits_until_its_blocks_fit_beside_the_others():
    window = kv_window.KvWindow(client.KvCache(blocks=4, block_size=16))
    assert window.blocks(17) == 2 and window.blocks(0) == 1 and window.blocks(10_000) == 4
    third_in = threading.Event()
    with window.claim(17), window.claim(20):  # 2 + 2 blocks: the cache is full

        def third():
            with window.claim(5):
                third_in.set()

        waiting = threading.Thread(target=third)
        waiting.start()
        assert not third_in.wait(0.3) and window.claimed == 4
    assert third_in.wait(10)  # in once the two are answered
    waiting.join()
    assert window.claimed == 0 and window.peak == 4


def test_one_request_larger_than_the_cache_still_goes_alone():
    window = kv_window.KvWindow(client.KvCache(blocks=4, block_size=16))
    done = []
    with window.claim(1_000):  # all 4 blocks
        threading.Thread(target=lambda: done.append(window.claim(1).__enter__())).start()
        assert not wait_until(lambda: done, 0.3)
    assert wait_until(lambda: done, 10)


def test_prompt_tokens_are_estimated_from_bytes_ids_and_messages():
    assert kv_window.prompt_tokens("abcdef") == 2  # 3 bytes a token
    assert kv_window.prompt_tokens([5, 6, 7]) == 3  # token ids as they are
    messages = [{"role": "system", "content": "abc"}, {"role": "user", "content": "abcdef"}]
    assert kv_window.prompt_tokens(messages) == 2 * kv_window.MESSAGE_TOKENS + 1 + 2
