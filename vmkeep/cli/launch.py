"""The `vmkeep` executable: give the repository key a head start, then run the command."""

from __future__ import annotations

import sys


def main() -> None:
    from vmkeep.cli.key_prefetch import prefetch

    prefetch(sys.argv[1:])
    from vmkeep.cli.main import main as run_command  # the command's modules load while scrypt runs

    run_command()
