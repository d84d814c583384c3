"""A local run's engine service (local.LocalService) with one real vLLM engine on the tiny
model; the service on echo servers: tests/test_service.py."""

import http.server
import json
import threading

import pytest

import workflow as wf
from engine import client, local
from formats import registry as registry_format
from formats import settings as run_settings
from pipeline import rank_job
from placement import node_layout, ports
from test_service import HOST, Foreign
from workflow import local_profile_config

pytestmark = pytest.mark.vllm


def test_a_server_planted_on_a_real_vllm_engines_port_is_survived(tmp_path, capfd):
    """Issue 29 with one real vLLM engine (the tiny model): a foreign server takes the
    engine's port after the run chose it, before the engine binds it; the engine moves,
    proves its id on its new port, and answers the run's requests."""
    config = local_profile_config(tiles={**local_profile_config()["tiles"], "per_node": 1})
    spec = rank_job.local_spec(run_settings.from_config(config), str(wf.TINY_MODEL))
    spec |= {"registry_root": str(tmp_path / "engines")}
    started = local.LocalService(spec)
    pool = started.start()
    try:
        spec_file = started.registry.parent / f"{started.run_id}.engines.json"
        chosen = json.loads(spec_file.read_text())
        (slot,) = node_layout.engine_slots(1, chosen["tiles"]["per_job"], HOST)
        port = ports.engine_port(chosen, slot)
        foreign = http.server.ThreadingHTTPServer(("127.0.0.1", port), Foreign)
        foreign.posts = []
        threading.Thread(target=foreign.serve_forever, args=(0.05,), daemon=True).start()
        try:
            with pool.route() as engine:
                answer = client.complete(
                    engine.url, ["Hello"], local_profile_config()["sampling"], key=engine.api_key
                )
            assert answer.texts and not engine.url.endswith(f":{port}")
            (entry,) = registry_format.read_registry(started.registry).values()
            (conflict,) = entry["port_conflicts"]
            assert f"another process answers on port {port} of 127.0.0.1" in conflict
            assert conflict in capfd.readouterr().err
            assert foreign.posts == []
        finally:
            foreign.shutdown()
            foreign.server_close()
    finally:
        started.stop()
