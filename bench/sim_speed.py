"""How fast the backtest evaluates: a synthetic clinic history through `Simulation`.

`python -m bench.sim_speed [--events N] [--members M] [--workload bench]` prints events/s for
(1) the pure evaluator alone under one rule set, (2) the backtest core (both lanes:
rule book in force and candidate) on parsed events, and (3) the same including
parsing the raw bytes with the activity TypeAdapter, as `ledgerctl rules simulate` does.
Those are CPU time of one process. (4) and (5) run the lanes in two worker processes,
as `ledgerctl rules simulate` does, and are wall time (CPU time of one process would
not count the workers): on parsed events (forked workers), and from raw bytes through
the backtest's own `LaneWorkers` (each worker parses). (6) is what `ledgerctl rules
simulate` runs: `MemberWorkers`, members split over two workers by referral component,
each worker parsing a payload once and pricing both lanes (wall time, from raw bytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import random
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

from schemas.activity import Activity, activity_adapter
from services.rules.backtest import LaneWorkers, MemberWorkers, referral_groups
from services.rules.engine import evaluate
from services.rules.rulebook_store import DEFAULT_RULESET, RULESETS_DIR
from services.rules.ruleset import RuleBook, RuleSet, load_ruleset
from services.rules.simulate import LANES, Lane, Simulation, combine
from services.rules.state import MemberState, with_shared_tz

CST = timezone(timedelta(hours=8))
PROJECTS = [
    "facial-basic",
    "neck-shoulder-massage",
    "facial-package",
    "hydrafacial",
    "water-light",
    "thermage",
    "gold-rf-microneedle",
]


def synthetic_history(
    n: int, members: int = 5000, seed: int = 1, start: datetime | None = None
) -> Iterator[dict[str, Any]]:
    """A plausible mix: a third purchases, sign-ins, visits, reviews, shares, some refunds."""
    rng = random.Random(seed)
    at = start or datetime(2026, 1, 1, 9, tzinfo=CST)
    step = timedelta(days=90) / max(n, 1)
    orders: list[tuple[str, str, str]] = []
    for i in range(n):
        at += step
        member = f"m-{rng.randrange(members):05d}"
        roll = rng.random()
        base = {"event_id": f"ev-{seed}-{i}", "occurred_at": at.isoformat(), "member_id": member,
                "store_id": rng.choice(["sh-jingan", "sh-xuhui"]), "source": "bench"}  # fmt: skip
        if roll < 0.33:
            amount = f"{rng.choice([88, 388, 680, 999, 1280, 2500, 3600, 12000])}.00"
            codes = rng.sample(PROJECTS, rng.randint(1, 2))
            oid = f"o-{seed}-{i}"
            orders.append((member, oid, amount))
            yield {**base, "type": "purchase", "data": {"order_id": oid, "amount": amount,
                   "items": [{"project_code": c, "category": "t", "amount": amount}
                             for c in codes]}}  # fmt: skip
        elif roll < 0.36 and orders:
            m, oid, amount = orders[rng.randrange(len(orders))]
            yield {**base, "member_id": m, "type": "refund",
                   "data": {"order_id": oid, "amount": amount}}  # fmt: skip
        elif roll < 0.66:
            yield {**base, "type": "check_in", "data": {"kind": "sign_in"}}
        elif roll < 0.80:
            slot = at - timedelta(minutes=rng.randint(0, 30))
            yield {**base, "type": "check_in", "data": {
                "kind": "visit", "booking_id": f"b-{seed}-{i}",
                "booked_at": (slot - timedelta(hours=rng.choice([2, 30, 72]))).isoformat(),
                "slot_start": slot.isoformat(), "arrived_at": at.isoformat()}}  # fmt: skip
        elif roll < 0.90:
            featured, adopted = rng.random() < 0.2, rng.random() < 0.05
            yield {**base, "type": "review", "data": {"review_id": f"r-{seed}-{i}", "rating": 5,
                   "featured": featured, "suggestion_adopted": adopted}}  # fmt: skip
        elif roll < 0.98:
            yield {**base, "type": "share", "data": {"share_id": f"s-{seed}-{i}",
                   "channel": "wechat", "approved": rng.random() < 0.5,
                   "likes": rng.randint(0, 20)}}  # fmt: skip
        else:
            referrer = f"m-{rng.randrange(members):05d}"
            yield {**base, "type": "member_registered",
                   "data": {"referrer_id": referrer, "birthday": "03-15"}}  # fmt: skip


_EVENTS: list[Activity] = []  # set before forking: the workers inherit the parsed events


def _lane(book: RuleBook, candidate: RuleSet, lane: Lane, out: Any) -> None:
    gc.disable()
    t = time.process_time()
    sim = Simulation(book, candidate, lanes=(lane,))
    for e in _EVENTS:
        sim.feed(e)
    out.put((lane, sim.lane_results()[lane], sim.progress(), time.process_time() - t))


def forked_lanes(book: RuleBook, candidate: RuleSet, events: list[Activity]) -> tuple[float, float]:
    """Wall seconds for both lanes in two forked workers, up to the combined report, and
    the busier worker's CPU seconds (the wall time on two otherwise idle cores)."""
    _EVENTS[:] = events
    ctx = multiprocessing.get_context("fork")
    out: Any = ctx.Queue()
    t = time.perf_counter()
    procs = [ctx.Process(target=_lane, args=(book, candidate, lane, out)) for lane in LANES]
    for p in procs:
        p.start()
    got = {lane: (r, pr, cpu) for lane, r, pr, cpu in (out.get() for _ in procs)}
    combine(got["in_force"][0], got["candidate"][0], got["in_force"][1], candidate.version)
    seconds = time.perf_counter() - t
    for p in procs:
        p.join()
    _EVENTS.clear()
    return seconds, max(cpu for _, _, cpu in got.values())


def raw_lanes(book: RuleBook, candidate: RuleSet, raws: list[bytes]) -> float:
    """Wall seconds through the backtest's LaneWorkers: raw bytes in chunks, as from Postgres."""
    with LaneWorkers(book, candidate) as workers:
        t = time.perf_counter()  # the forkserver's start-up is not the workers' speed
        for i in range(0, len(raws), 5000):
            workers.send("feed", raws[i : i + 5000])
        workers.finish()
        return time.perf_counter() - t


def raw_members(book: RuleBook, candidate: RuleSet, raws: list[bytes]) -> float:
    """Wall seconds through MemberWorkers (what `ledgerctl rules simulate` runs): members
    split over two workers by referral component, each parsing once for both lanes."""
    members = [json.loads(r)["member_id"] for r in raws]
    rows = list(zip(members, raws, strict=True))
    with MemberWorkers(book, candidate, referral_groups(
        (m, r) for m, r in rows if b"referrer_id" in r
    )) as workers:  # fmt: skip
        t = time.perf_counter()  # the forkserver's start-up is not the workers' speed
        for i in range(0, len(rows), 5000):
            workers.send("feed", rows[i : i + 5000])
        workers.finish()
        return time.perf_counter() - t


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def measure(n: int, members: int, workload: str = "synthetic") -> dict[str, float]:
    """CPU seconds (process_time), GC off as in `run_backtest`: wall time on a shared
    machine would measure the neighbours. `workload="bench"`: `make bench`'s events
    (Zipf-like members, some with hundreds of orders) instead of the even synthetic mix,
    whose members never hold many orders, so costs that grow with a member's history
    do not show in it."""
    gc.disable()
    if workload == "bench":
        from bench.workload import generate

        raws = [e.value for e in generate(n, seed=42)]
    else:
        raws = [json.dumps(e).encode() for e in synthetic_history(n, members)]
    t = time.process_time()
    events: list[Activity] = [activity_adapter.validate_json(r) for r in raws]
    parse_s = time.process_time() - t

    ruleset = load_ruleset(DEFAULT_RULESET)
    states: dict[str, MemberState] = {}
    t = time.process_time()
    for e in events:
        e = with_shared_tz(e)  # as the live adapter does
        state = states.get(e.member_id) or MemberState(member_id=e.member_id)
        states[e.member_id] = evaluate(state, e, ruleset, {}).state
    one_lane_s = time.process_time() - t

    book = RuleBook([ruleset])
    candidate = load_ruleset(RULESETS_DIR / "reference-004.yaml")
    sim = Simulation(book, candidate)
    t = time.process_time()
    for e in events:
        sim.feed(e)
    sim.report()
    two_lanes_s = time.process_time() - t
    forked_s, busiest_cpu_s = forked_lanes(book, candidate, events)
    raw_s = raw_lanes(book, candidate, raws)
    members_s = raw_members(book, candidate, raws)
    return {
        "events": n,
        "parse_per_s": _rate(n, parse_s),
        "evaluate_one_lane_per_s": _rate(n, one_lane_s),
        "backtest_both_lanes_per_s": _rate(n, two_lanes_s),
        "backtest_incl_parse_per_s": _rate(n, two_lanes_s + parse_s),
        "backtest_2_workers_wall_per_s": _rate(n, forked_s),
        "backtest_2_workers_busiest_cpu_per_s": _rate(n, busiest_cpu_s),
        "backtest_2_workers_raw_wall_per_s": _rate(n, raw_s),
        "backtest_member_split_raw_wall_per_s": _rate(n, members_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--members", type=int, default=5000, help="synthetic workload only")
    parser.add_argument("--workload", choices=["synthetic", "bench"], default="synthetic")
    args = parser.parse_args()
    result = measure(args.events, args.members, args.workload)
    for key, value in result.items():
        print(f"{key:34s} {value:>12,.0f}")


if __name__ == "__main__":
    main()
