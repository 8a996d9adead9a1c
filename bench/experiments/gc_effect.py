"""Experiment: how much of the rules hot path is the cyclic GC (default thresholds vs raised)."""

import gc
import sys
import time

from bench.workload import generate
from schemas.activity import parse_activity
from services.rules.engine import evaluate
from services.rules.rulebook_store import DEFAULT_RULESET
from services.rules.ruleset import load_ruleset
from services.rules.state import MemberState

events = generate(30_000, seed=42)
ruleset = load_ruleset(DEFAULT_RULESET)


def run() -> float:
    states: dict[str, MemberState] = {}
    keep = []  # a batch's worth of objects alive, as in the service
    t = time.perf_counter()
    for i, raw in enumerate(events):
        e = parse_activity(raw.value)
        s = states.get(e.member_id) or MemberState(member_id=e.member_id)
        r = evaluate(s, e, ruleset, {})
        states[e.member_id] = r.state
        keep.append((e, r))
        if i % 5000 == 4999:
            keep.clear()
    return time.perf_counter() - t


mode = sys.argv[1] if len(sys.argv) > 1 else "default"
if mode == "raised":
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
elif mode == "off":
    gc.disable()
best = min(run() for _ in range(3))
print(f"{mode}: {len(events) / best:,.0f} events/s")
