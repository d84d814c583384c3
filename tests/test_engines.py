"""No tests: the names tests/test_batch_vllm.py and tests/test_front_end_vllm.py still
import from here (the tests of engine/lifecycle.py are now tests/test_engine_lifecycle.py
and tests/test_engine_lifecycle_vllm.py, the shared helpers tests/workflow.py). Remove
this file once those two import ENGINE_SETTINGS from workflow."""

from workflow import ENGINE_SETTINGS as SETTINGS

__all__ = ["SETTINGS"]
