"""``python -m pbs watchdog``: started by pbs-submit, see pbs.status.watch."""

import sys

from .commands import main_watchdog

if sys.argv[1:] != ["watchdog"]:
    sys.exit("usage: python -m pbs watchdog")
sys.exit(main_watchdog())
