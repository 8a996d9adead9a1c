"""Experiment: the ledger's and notifier's pure CPU per grant / entry, split by step.

`ledger_hot.py [tuned|default]`: the garbage collector as the services run it
(`runtime.tune_gc`, the default here) or CPython's default. The first figures in
bench/README.md (pydantic parse 17 us a grant) were taken with the default collector and
every parsed grant kept alive: most of that was collections, not parsing.

Grants come from the evaluator over the bench workload (fixed end time, so the counts
repeat), serialised as the rules service publishes them; ledger events are the entries
the accounting makes of them, as the ledger publishes them. Each step runs over batches
of 5,000 whose results are kept until the batch ends, as the consumers keep theirs; best
of 3, CPU of this process, with the minor page faults of that run.

  parse     pydantic `parse_grant` (what the projector does); `orjson.loads` alone; and
            `orjson.loads` + building the two pydantic objects by hand without a single
            check: a floor for any "loads, check, trusted construction" fast path
  account   `command_for` + `apply` (`decide`, with the book after its entries, as the
            projector runs it) per points granted / revoked (the books start empty and
            grow over the run)
  publish   `ledger_event(...).model_dump_json()` (before) vs `ledger_event_json` (now) vs
            one bare `orjson.dumps` of a dict (floor)
  notify    `parse_ledger_event`; the notification payload through the jsonb codec,
            `orjson.loads(model_dump_json())` (before) vs `orjson.Fragment` (now)
"""

from __future__ import annotations

import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from bench.workload import generate
from schemas.activity import parse_activity
from schemas.grants import GrantData, PointsGranted, TierEvaluated, parse_grant
from schemas.ledger import parse_ledger_event
from services.common.runtime import tune_gc
from services.ledger import accounting as acc
from services.ledger.journal import ledger_event, ledger_event_json
from services.ledger.projector import command_for
from services.notifier.render import render
from services.rules.engine import evaluate
from services.rules.rulebook_store import DEFAULT_RULESET
from services.rules.ruleset import load_ruleset
from services.rules.state import MemberState

END = datetime(2026, 11, 23, tzinfo=UTC)
BATCH = 5_000

ruleset = load_ruleset(DEFAULT_RULESET)
states: dict[str, MemberState] = {}
raw: list[bytes] = []
for e in generate(30_000, seed=42, end=END):
    ev = parse_activity(e.value)
    r = evaluate(states.get(ev.member_id) or MemberState(member_id=ev.member_id), ev, ruleset, {})
    states[ev.member_id] = r.state
    raw.extend(g.model_dump_json().encode() for g in r.grants)
grants = [parse_grant(b) for b in raw]
moves = [g for g in grants if not isinstance(g, TierEvaluated)]
granted = [b for b, g in zip(raw, grants, strict=True) if isinstance(g, PointsGranted)]


def account() -> list[acc.Entry]:
    entries: list[acc.Entry] = []
    books: dict[str, acc.Book] = {}
    for g in moves:
        book = books.get(g.member_id) or acc.Book(member_id=g.member_id)
        book, new = acc.apply(book, command_for(g))
        entries.extend(new)
        books[g.member_id] = book
    return entries


entries = account()
events = [ledger_event_json(e) for e in entries]
parsed_events = [parse_ledger_event(b) for b in events]
rendered = [e for e in parsed_events if render(e, datetime.now(UTC)) is not None]

mode = sys.argv[1] if len(sys.argv) > 1 else "tuned"
if mode == "tuned":
    tune_gc()


def per_item(step: Callable[[Any], Any], items: Sequence[Any]) -> str:
    """Best of 3: CPU per item, over batches whose results are kept, then dropped."""
    out = []
    for _ in range(3):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.process_time()
        for i in range(0, len(items), BATCH):
            done = [step(x) for x in items[i : i + BATCH]]
            del done
        out.append(
            (
                time.process_time() - t,
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
            )
        )
    cpu, faults = min(out)
    return f"{1e6 * cpu / len(items):6.1f} us ({faults / len(items):4.2f} page faults)"


_new, _set = object.__new__, object.__setattr__


def _trusted(model: type[Any], values: dict[str, Any]) -> Any:
    obj = _new(model)
    _set(obj, "__dict__", values)
    _set(obj, "__pydantic_fields_set__", set(values))
    _set(obj, "__pydantic_extra__", None)
    _set(obj, "__pydantic_private__", None)
    return obj


def construct_unchecked(b: bytes) -> Any:
    d = orjson.loads(b)
    d["occurred_at"] = datetime.fromisoformat(d["occurred_at"])  # no TzInfo, no checks
    d["data"] = _trusted(GrantData, d["data"])
    return _trusted(PointsGranted, d)


def publish_dict(e: acc.Entry) -> bytes:
    return orjson.dumps(
        {
            "event_id": e.entry_id,
            "schema_version": 1,
            "occurred_at": e.occurred_at,
            "member_id": e.member_id,
            "type": "points_" + {"earn": "earned", "revoke": "revoked"}.get(e.kind, e.kind),
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
        },
        option=orjson.OPT_UTC_Z,
    )


def publish_pydantic(e: acc.Entry) -> bytes:
    return ledger_event(e).model_dump_json().encode()


def jsonb(v: Any) -> bytes:
    return b"\x01" + orjson.dumps(v)  # the pool's jsonb encoder (services/common/runtime.py)


def payload_before(e: Any) -> bytes:
    return jsonb(orjson.loads(e.model_dump_json()))


def payload_now(e: Any) -> bytes:
    return jsonb(orjson.Fragment(e.model_dump_json()))


def account_time() -> str:
    cpu = []
    for _ in range(3):
        t = time.process_time()
        account()
        cpu.append(time.process_time() - t)
    return f"{1e6 * min(cpu) / len(moves):6.1f} us"


kinds = dict(Counter(type(e).__name__ for e in parsed_events))
print(f"gc {mode}: {len(raw):,} grants ({len(granted):,} points_granted, {len(moves):,} moves)")
print(f"{len(entries):,} entries; ledger events {kinds}, {len(rendered):,} rendered")
print("per grant")
print("  parse   pydantic parse_grant            ", per_item(parse_grant, raw))
print("  parse   orjson.loads (floor)            ", per_item(orjson.loads, raw))
print("per points_granted")
print("  parse   pydantic parse_grant            ", per_item(parse_grant, granted))
print("  parse   loads + unchecked construction  ", per_item(construct_unchecked, granted))
print("per points granted / revoked")
print("  account apply (decide+evolve)           ", account_time())
print("per entry")
print("  publish ledger_event + dump (before)    ", per_item(publish_pydantic, entries))
print("  publish ledger_event_json (now)         ", per_item(ledger_event_json, entries))
print("  publish bare orjson.dumps of the dict   ", per_item(publish_dict, entries))
print("per ledger event / per one rendered")
print("  notify  parse_ledger_event              ", per_item(parse_ledger_event, events))
print("  notify  jsonb(loads(dump_json)) (before)", per_item(payload_before, rendered))
print("  notify  jsonb(Fragment(dump_json)) (now)", per_item(payload_now, rendered))
