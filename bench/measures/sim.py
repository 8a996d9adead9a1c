"""6: backtesting: `ledgerctl rules simulate` if present, else the pure evaluator in-process."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from bench.machine import services_rules_native
from bench.settings import RUNS, SIM_EVENTS, say
from bench.stack import Infra, ctl_available, ctl_failed, ledgerctl
from bench.workload import Event


async def simulate_cli(infra: Infra, events: list[Event]) -> dict[str, Any]:
    """`ledgerctl rules simulate` over recorded activity (rows COPYed in): the rule book in
    force (default) vs the reference-004 candidate. The figure is the rate the command
    reports for its replay (reading, parsing, both lanes, what is left of the workers'
    start-up); the wall time of the whole process, start-up and connecting included, is
    kept beside it."""
    import orjson

    db = "bench_sim"
    dsn = await infra.fresh_db(db)
    rows = []
    for i, e in enumerate(events):
        body = orjson.loads(e.value)
        at = datetime.fromisoformat(body["occurred_at"])
        rows.append((e.event_id, body["member_id"], body["type"], at, "bench", 0, i, e.value))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "rules_activity",
            records=rows,
            columns=[
                "event_id",
                "member_id",
                "type",
                "occurred_at",
                "topic",
                "partition",
                "offset",
                "payload",
            ],
        )
    finally:
        await conn.close()
    start = min(r[3] for r in rows).isoformat()
    end = (max(r[3] for r in rows) + timedelta(seconds=1)).isoformat()
    from services.rules.rulebook_store import RULESETS_DIR

    cmd = [
        "rules",
        "simulate",
        "--ruleset",
        str(RULESETS_DIR / "reference-004.yaml"),
        "--from",
        start,
        "--to",
        end,
        "--no-warmup",
    ]
    seconds: list[float] = []
    reported: list[float] = []
    try:
        for i in range(RUNS):
            r, took = await ledgerctl(cmd, dsn)
            if r.returncode != 0:
                return ctl_failed("simulate", r)
            seconds.append(took)
            m = re.search(r"replayed ([\d,]+) events in ([\d.]+) s", r.stderr)
            if m is None:
                say(f"simulate printed no replay rate: {r.stderr[-400:]}")
                return {"available": True, "error": "no replay rate in the output"}
            reported.append(int(m.group(1).replace(",", "")) / float(m.group(2)))
            say(
                f"simulate run {i + 1}: {len(events):,} events, replay {float(m.group(2)):.2f}s"
                f" ({reported[-1]:,.0f} events/s), {took:.2f}s with process start-up"
            )
    finally:
        await infra.drop_db(db)
    return {
        "available": True,
        "method": "`ledgerctl rules simulate --no-warmup --ruleset reference-004.yaml`: each"
        " event priced under the book in force and the candidate; the rate it reports for"
        " the replay (reading Postgres, parsing, both lanes, what is left of the workers'"
        " start-up)",
        "compiled_core": services_rules_native(),
        "events": len(events),
        "replay_eps": reported,
        "eps": statistics.median(reported),
        "wall_seconds_with_startup": seconds,
        "wall_eps_with_startup": len(events) / statistics.median(seconds),
    }


def simulate(events: list[Event]) -> dict[str, Any]:
    """The pure evaluator over the workload, parsing included: what a backtest does per event."""
    from schemas.activity import parse_activity
    from services.rules.engine import evaluate
    from services.rules.rulebook_store import DEFAULT_RULESET
    from services.rules.ruleset import load_ruleset
    from services.rules.state import MemberState, with_shared_tz

    ruleset = load_ruleset(DEFAULT_RULESET)
    runs = []
    grants = 0
    for _ in range(1):
        states: dict[str, MemberState] = {}
        referrers: dict[str, str | None] = {}
        grants = 0
        t = time.perf_counter()
        for raw in events:
            event = with_shared_tz(parse_activity(raw.value))  # as the live adapter does
            state = states.get(event.member_id) or MemberState(member_id=event.member_id)
            result = evaluate(state, event, ruleset, referrers)
            states[event.member_id] = result.state
            referrers[event.member_id] = result.state.referrer_id
            grants += len(result.grants)
        runs.append(time.perf_counter() - t)
    eps = len(events) / statistics.median(runs)
    say(
        f"backtesting (pure evaluator): {len(events):,} events, {grants:,} grants,"
        f" {eps:,.0f} events/s"
    )
    return {
        "method": "pure evaluator in-process (parse + evaluate)",
        "events": len(events),
        "eps": eps,
        "seconds": runs,
    }


async def sim_runs(infra: Infra, events: list[Event]) -> dict[str, Any]:
    pure = await asyncio.to_thread(simulate, events[:SIM_EVENTS])
    if ctl_available("rules", "simulate"):
        out = await simulate_cli(infra, events[:SIM_EVENTS])
        out["pure_evaluator_eps"] = pure["eps"]
        return out
    say("simulate: `ledgerctl rules simulate` not available; pure evaluator reported")
    return pure
