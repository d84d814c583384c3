"""One line on standard error, whole, from any thread.

Inside Snakemake (a rank job's thread, the local progress thread) the line goes
through Snakemake's logger. Its handler writes a message and then its newline in two
calls, under a lock of its own: a line written straight to stderr by another thread
can land between the two ("... ETA < 1 minSelect jobs to execute..."), and neither
line is whole any more. Outside Snakemake it is one write of the line with its
newline.

Its home is the ground floor of scripts/, beside the packages rather than in one: every
layer writes such lines (the engines' supervisor, the ranks' pool, the PBS provider's
node processes, the progress lines), and it imports nothing of scripts/. It is not a
format (nothing on disk), so not in scripts/formats/; one function, so one module.

Stdlib only.
"""

from __future__ import annotations

import logging
import sys

SNAKEMAKE_LOGGER = "snakemake.logging"


def say(line: str) -> None:
    """Write ``line`` and a newline to stderr without another thread's output inside."""
    if SNAKEMAKE_LOGGER in sys.modules:
        logger = logging.getLogger(SNAKEMAKE_LOGGER)
        if logger.handlers:  # Snakemake set up its output (not a plain import)
            logger.info(line)
            return
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()
