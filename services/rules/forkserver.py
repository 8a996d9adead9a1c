"""The backtest workers' forkserver, startable before anything heavy is imported.

`ledgerctl rules simulate` prices in worker processes forked from a forkserver that first
imports the backtest (~0.5 s: pydantic models, the rule types, asyncpg). Started as the
CLI's first act, it does those imports on the other core while the CLI does its own, so
the workers start at once when the replay begins. Standard library only, so importing
this module costs nothing.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver
from typing import Final

PRELOAD: Final = ["services.rules.backtest"]


def start_forkserver() -> None:
    """Start the forkserver and its imports now; idempotent (later pools reuse it)."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()
