"""Documents the services only store and read back whole: `jsonb` or `json` columns?

The rules service upserts each touched member's state document every batch and reads it
back (`state::text`) on the member's next batch; the notifier inserts one payload per
ledger event. Neither is ever queried inside by the services. `jsonb` parses every value
into its binary form on the way in and prints it again on the way out; `json` checks the
syntax and keeps the text. This runs the services' own statements over documents from
the bench workload (member states from the evaluator, ledger events from the accounting,
as `ledger_hot.py` makes them), in batches of 5,000 events, once per column type, types
alternating, and reports the Postgres backend's CPU (from /proc) per event.

    PYTHONPATH=. .venv/bin/python bench/experiments/json_columns.py [events]
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

import asyncpg

from bench.experiments._pg import backend_cpu_seconds, fresh_databases
from bench.workload import generate
from schemas.activity import parse_activity
from schemas.grants import PointsGranted, PointsRevoked
from services.common.runtime import tune_gc
from services.ledger import accounting as acc
from services.ledger.journal import ledger_event_json
from services.ledger.projector import command_for
from services.rules.engine import evaluate
from services.rules.rulebook_store import DEFAULT_RULESET
from services.rules.ruleset import load_ruleset
from services.rules.state import MemberState, dump_state

END = datetime(2026, 11, 23, tzinfo=UTC)
BATCH = 5_000
SELECT_STATES = """
SELECT member_id, state::text AS state FROM rules_member_state
WHERE member_id = ANY($1::text[]) ORDER BY member_id FOR UPDATE
"""
UPSERT_STATES = """
INSERT INTO rules_member_state AS s (member_id, state, updated_at)
SELECT m, st::{t}, now() FROM unnest($1::text[], $2::text[]) AS u(m, st)
ON CONFLICT (member_id) DO UPDATE SET state = EXCLUDED.state, updated_at = now()
"""
INSERT_NOTIFICATIONS = """
INSERT INTO notifications (notification_id, member_id, kind, message, payload, status)
SELECT *, 'skipped' FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]::{t}[])
ON CONFLICT (notification_id) DO NOTHING
"""
Batch = tuple[list[str], list[str], list[tuple[str, str, str, str, str]]]


def batches(events: int) -> list[Batch]:
    """Per batch: touched members in order, their states after it, its notifications."""
    ruleset = load_ruleset(DEFAULT_RULESET)
    states: dict[str, MemberState] = {}
    books: dict[str, acc.Book] = {}
    out: list[Batch] = []
    stream = [parse_activity(e.value) for e in generate(events, seed=42, end=END)]
    for start in range(0, len(stream), BATCH):
        touched: set[str] = set()
        notes: list[tuple[str, str, str, str, str]] = []
        for ev in stream[start : start + BATCH]:
            state = states.get(ev.member_id) or MemberState(member_id=ev.member_id)
            result = evaluate(state, ev, ruleset, {})
            states[ev.member_id] = result.state
            touched.add(ev.member_id)
            for g in result.grants:
                if isinstance(g, PointsGranted | PointsRevoked):
                    book = books.get(g.member_id) or acc.Book(member_id=g.member_id)
                    book, entries = acc.apply(book, command_for(g))
                    books[g.member_id] = book
                    for e in entries:
                        payload = ledger_event_json(e).decode()
                        notes.append((e.entry_id, e.member_id, "points_earned", "…", payload))
        members = sorted(touched)
        out.append((members, [dump_state(states[m]).decode() for m in members], notes))
    return out


async def run(conn: asyncpg.Connection, kind: str, work: list[Batch]) -> tuple[float, float]:
    """Backend CPU seconds: (states read and upserted, notifications inserted)."""
    await conn.execute("TRUNCATE rules_member_state, notifications")
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    states = notes = 0.0
    upsert = UPSERT_STATES.format(t=kind)
    insert = INSERT_NOTIFICATIONS.format(t=kind)
    for members, docs, rows in work:
        before = backend_cpu_seconds(pid)
        async with conn.transaction():
            await conn.fetch(SELECT_STATES, members)
            await conn.execute(upsert, members, docs)
        middle = backend_cpu_seconds(pid)
        async with conn.transaction():
            await conn.execute(insert, *([r[i] for r in rows] for i in range(5)))
        states += middle - before
        notes += backend_cpu_seconds(pid) - middle
    return states, notes


async def main(events: int) -> None:
    tune_gc()
    work = batches(events)
    print(
        f"{events:,} events: {sum(len(b[0]) for b in work):,} state upserts (documents of"
        f" {sum(len(d) for b in work for d in b[1]) / sum(len(b[1]) for b in work):.0f} bytes"
        f" on average), {sum(len(b[2]) for b in work):,} notifications"
    )
    async with fresh_databases(["columns_jsonb", "columns_json"]) as dbs:
        kinds = {"jsonb": dbs["columns_jsonb"], "json": dbs["columns_json"]}
        for kind, conn in kinds.items():
            await conn.execute(
                f"ALTER TABLE rules_member_state ALTER COLUMN state TYPE {kind};"
                f" ALTER TABLE notifications ALTER COLUMN payload TYPE {kind}"
            )
        spent: dict[str, list[tuple[float, float]]] = {"jsonb": [], "json": []}
        for _ in range(3):
            for kind, conn in kinds.items():
                spent[kind].append(await run(conn, kind, work))
    for kind, runs in spent.items():
        s = sorted(r[0] for r in runs)[1] / events * 1e6
        n = sorted(r[1] for r in runs)[1] / events * 1e6
        each = [tuple(round(x / events * 1e6, 2) for x in r) for r in runs]
        print(
            f"{kind:5}: states {s:.2f} µs, notifications {n:.2f} µs of backend CPU per"
            f" event (median of 3; runs {each})"
        )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 60_000))
