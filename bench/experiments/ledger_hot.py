"""Experiment: the ledger consumer's pure CPU per grant, split by step, and two cheaper ways.

Grants come from the evaluator over the bench workload, serialised as the rules service
publishes them. Measures (best of 3, CPU of this process):
  parse      pydantic `parse_grant` (what the projector does)  vs  `orjson.loads` (floor)
  account    `command_for` + `decide` + `evolve` per grant (books start empty)
  publish    `ledger_event` + `model_dump_json` per entry  vs  one `orjson.dumps` of a dict
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.workload import generate
from schemas.activity import parse_activity
from schemas.grants import TierEvaluated, parse_grant
from services.ledger import accounting as acc
from services.ledger.journal import ledger_event
from services.ledger.projector import command_for
from services.rules.engine import evaluate
from services.rules.rulebook_store import DEFAULT_RULESET
from services.rules.ruleset import load_ruleset
from services.rules.state import MemberState

ruleset = load_ruleset(DEFAULT_RULESET)
states: dict[str, MemberState] = {}
raw: list[bytes] = []
for e in generate(30_000, seed=42):
    ev = parse_activity(e.value)
    r = evaluate(states.get(ev.member_id) or MemberState(member_id=ev.member_id), ev, ruleset, {})
    states[ev.member_id] = r.state
    raw.extend(g.model_dump_json().encode() for g in r.grants)
N = len(raw)


def best(fn: Callable[[], Any]) -> float:
    out = []
    for _ in range(3):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return min(out)


def us(sec: float) -> str:
    return f"{1e6 * sec / N:6.1f} us/grant"


grants = [parse_grant(b) for b in raw]
moves = [g for g in grants if not isinstance(g, TierEvaluated)]
entries: list[acc.Entry] = []


def account() -> None:
    entries.clear()
    books: dict[str, acc.Book] = {}
    for g in moves:
        book = books.get(g.member_id) or acc.Book(member_id=g.member_id)
        for entry in acc.decide(book, command_for(g)):
            book = acc.evolve(book, entry)
            entries.append(entry)
        books[g.member_id] = book


def publish_pydantic() -> None:
    for e in entries:
        ledger_event(e).model_dump_json().encode()


def publish_orjson() -> None:
    for e in entries:
        orjson.dumps(
            {
                "event_id": e.entry_id,
                "type": "points_" + {"earn": "earned", "revoke": "revoked"}.get(e.kind, e.kind),
                "schema_version": 1,
                "occurred_at": e.occurred_at,
                "member_id": e.member_id,
                "data": {
                    "points": e.points,
                    "balance_after": e.balance_after,
                    "rule_id": e.rule_id,
                    "ruleset_version": e.ruleset_version,
                    "source_event_id": e.source_event_id,
                    "redemption_id": e.redemption_id,
                    "adjustment_id": e.adjustment_id,
                    "order_id": e.order_id,
                    "store_id": e.store_id,
                    "expires_at": e.expires_at,
                    "reason": e.reason,
                    "operator": e.operator,
                },
            }
        )


print(f"{N:,} grants, {len(moves):,} movements")
print("parse   pydantic parse_grant:", us(best(lambda: [parse_grant(b) for b in raw])))
print("parse   orjson.loads (floor):", us(best(lambda: [orjson.loads(b) for b in raw])))
print("account decide+evolve:       ", us(best(account)), f"({len(entries):,} entries)")
print("publish pydantic event+dump: ", us(best(publish_pydantic)))
print("publish orjson dict:         ", us(best(publish_orjson)))
