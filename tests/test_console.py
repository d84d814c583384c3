"""Lines on stderr stay whole beside Snakemake's own output (scripts/console.py)."""

from __future__ import annotations

import io
import logging
import threading
import time

import pytest
from snakemake.logging import ColorizingTextHandler

import console

SNAKEMAKE_LINE = "Select jobs to execute..."
OUR_LINE = "progress 0:01 | ranks 13/17 done, 1 failed | 57 tok/s | ETA < 1 min"


class SlowStream(io.StringIO):
    """A terminal that takes its time over each write call, as a loaded machine's does:
    another thread gets to run between two calls that belong to one line."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def write(self, text: str) -> int:
        self.calls += 1
        time.sleep(0.0005)
        return super().write(text)


def _from_two_threads(stream: SlowStream, count: int) -> list[str]:
    logger = logging.getLogger(console.SNAKEMAKE_LOGGER)

    def snakemake_says():
        for _ in range(count):
            logger.info(SNAKEMAKE_LINE)

    def we_say():
        for _ in range(count):
            console.say(OUR_LINE)

    threads = [threading.Thread(target=snakemake_says), threading.Thread(target=we_say)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return stream.getvalue().splitlines()


@pytest.fixture
def snakemake_output(monkeypatch):
    """Snakemake's own stderr handler (it writes a message, then its newline) on a slow
    stream that is also this process's stderr."""
    stream = SlowStream()
    monkeypatch.setattr("sys.stderr", stream)
    logger = logging.getLogger(console.SNAKEMAKE_LOGGER)
    handler = ColorizingTextHandler(nocolor=True, stream=stream)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


def test_a_line_beside_snakemakes_output_stays_whole(snakemake_output):
    lines = _from_two_threads(snakemake_output, 200)
    assert sorted(set(lines)) == sorted({SNAKEMAKE_LINE, OUR_LINE}), [
        line for line in lines if line not in (SNAKEMAKE_LINE, OUR_LINE)
    ][:5]
    assert lines.count(OUR_LINE) == lines.count(SNAKEMAKE_LINE) == 200


def test_outside_snakemake_a_line_is_one_write(monkeypatch):
    stream = SlowStream()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr(logging.getLogger(console.SNAKEMAKE_LOGGER), "handlers", [])
    for _ in range(3):
        console.say(OUR_LINE)
    assert stream.calls == 3
    assert stream.getvalue() == f"{OUR_LINE}\n" * 3
