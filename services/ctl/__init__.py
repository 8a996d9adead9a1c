"""`ledgerctl`: the ops command line (rules, ledger, dlq, events); a module per group.

This module imports nothing heavy and starts nothing when imported: a backtest worker
imports it again while bootstrapping (multiprocessing re-runs the `ledgerctl` console
script as its `__mp_main__`), and starting the forkserver there fails. So the work is in
`main`, which only the script's `if __name__ == "__main__"` calls.
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:3] == ["rules", "simulate"] and "--help" not in sys.argv:
        # Its workers' forkserver does its imports while this process does its own.
        from services.rules.forkserver import start_forkserver

        start_forkserver()

    from services.ctl.cli import app

    app()
