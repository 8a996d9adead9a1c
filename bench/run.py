"""`make bench`: the pipeline's numbers on this machine, measured, with the machine described.

Starts its own Postgres (data under .run/bench/pg, `synchronous_commit=on`, `fsync=on`) and
a Tansu broker on free ports, runs the three services as processes (as the integration
harness does), and measures, each the median of several runs on a fresh database and a
fresh topic prefix:

1. e2e: N activity events pre-published, services started; from the first rules batch
   (min `rules_activity.received_at`) to the commit of the ledger batch that consumed
   the last grant (commit timestamp of the ledger's `consumer_offsets` row).
2. naive: the same, with `bench.naive` (one handler and one transaction per message).
3. latency at a fixed offered load: each 5 ms tick's events produced as one record batch
   per partition, stamped with the tick's time (the broker's CreateTime); visible =
   commit timestamp of the ledger transaction that wrote its journal entries, which is
   the same transaction that updates the read models the API serves
   (`track_commit_timestamp=on`), so that is the instant GET would see it.
4. rebuild: `ledgerctl ledger rebuild` on a generated journal, when that command exists.
5. reads: `wrk` against GET /v1/members/{id} with 1,000,000 members in the read models.
6. backtesting: `ledgerctl rules simulate` if present, else the pure evaluator in-process.
7. expiry sweep (not a target of the issue; ops ask how long a large sweep takes): the
   ledger's `ExpirySweeper`, in this process, over N lots lapsed at once (a sweeper that
   was down, a backfill), then N lots inside the warning windows, then an idle sweep.

BENCH_QUICK=1 runs each once on smaller sizes (about two minutes).

Where the code is: bench/settings.py (the BENCH_* knobs), bench/stack.py (Postgres, the
broker, the services as processes), one module per measure under bench/measures/,
bench/machine.py (the machine described), bench/report.py (JSON, chart, table). What the
numbers mean, and how they came to be what they are: bench/README.md.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

from bench.machine import machine
from bench.measures.e2e import e2e_runs, naive_runs
from bench.measures.latency import latency_runs
from bench.measures.reads import read_runs
from bench.measures.rebuild import rebuild_runs
from bench.measures.sim import sim_runs
from bench.measures.sweep import sweep_runs
from bench.report import report
from bench.settings import E2E_EVENTS, NAIVE_EVENTS, QUICK, RESULTS, SIM_EVENTS, say, want
from bench.stack import Infra, start_infra, stop_infra
from bench.workload import describe, generate


async def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    infra: Infra | None = None
    results: dict[str, Any] = {"quick": QUICK, "started_at": datetime.now(UTC).isoformat()}
    t_start = time.perf_counter()
    try:
        say("starting Postgres and Tansu")
        infra = await start_infra()
        results["machine"] = machine(infra)
        say(f"machine: {json.dumps(results['machine'])}")
        events = generate(max(E2E_EVENTS, NAIVE_EVENTS, SIM_EVENTS), seed=42)
        results["workload"] = describe(events[:E2E_EVENTS])

        if want("e2e"):
            results["e2e"] = await e2e_runs(infra, events)
        if want("naive"):
            results["naive"] = await naive_runs(infra, events)
        if want("latency"):
            results["latency"] = await latency_runs(infra)
        if want("rebuild"):
            results["rebuild"] = await rebuild_runs(infra)
        if want("sweep"):
            results["sweep"] = await sweep_runs(infra)
        if want("reads"):
            results["reads"] = await read_runs(infra)
        if want("sim"):
            results["sim"] = await sim_runs(infra, events)
    finally:
        await asyncio.to_thread(stop_infra, infra)

    report(results, t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
