"""The `vmkeep` executable: give the repository key a head start, then run the command.

A scheduled incremental of a quiet VM is mostly fixed costs, so start-up and exit are kept
short: the collector stays off while the modules load (tens of thousands of objects that live
as long as the process, scanned again and again for nothing), and everything alive when the
command ends is frozen out of the collections the interpreter runs while it shuts down — about
20 ms of a 0.2 s command on this machine. Objects freed by reference counting still close their
files as usual; only reference cycles left at exit go uncollected, whose memory the exit returns.
"""

from __future__ import annotations

import gc
import sys


def main() -> None:
    gc.disable()
    from vmkeep.cli.key_prefetch import prefetch

    prefetch(sys.argv[1:])
    from vmkeep.cli.main import main as run_command  # the command's modules load while scrypt runs

    gc.freeze()
    gc.enable()
    try:
        run_command()
    finally:
        gc.freeze()
