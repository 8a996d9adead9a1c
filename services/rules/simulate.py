"""The backtest core: recorded activity through the rule book in force and a candidate.

Pure: the adapter (`backtest.py`) streams events in `occurred_at` order; this module
keeps two independent lanes of member state and counts what each lane would have paid.
Lane "in force" prices each event by the published version in force at its time (what
members actually got); lane "candidate" prices every event of the period by the
candidate file, as if it had been in force from the period's start (its own
`effective_from` is ignored). Optional warm-up events before the period build member
state once (tiers, first purchases, streaks, orders a refund refers to) under the rule
book, and both lanes start from that state; nothing of the warm-up is counted.

A burst ops released (`rules held release`) is a step of its own at the moment of the
decision, merged into the stream by that moment: live, `held.release_held` priced it
against the member's state then (the day's cap filled since, counts pruned, ids
forgotten), not the state that held it. Decided before the period's start, it is part of
the warm-up; in the period, it is counted in the in-force lane only: a rule set nobody
reviewed bursts under (the candidate) leaves its holds unpaid.

Cash liability values each member's points at the redemption rate of the tier the member
holds in that lane at the end (tiers that ended by then expired as the tier sweep would
expire them), at one set of rates
per lane (the in-force lane: the version in force at `valued_at`, the period's end; the
candidate lane: the candidate's): as the ledger's liability values points at the tier now.
So a grant and its take-back cancel in cash as in points, whatever tier each was paid at,
and how members are split over worker processes changes nothing.

The lanes are independent, so a `Simulation` may run only one of them (`lanes=`), and
members are independent outside referral chains: the backtest adapter prices shares of
the members in worker processes and adds their `Summary`s (`report_of`) into the same
report a single process makes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from decimal import ROUND_HALF_UP, Decimal
from heapq import heappop, heappush
from typing import Final, Literal, NamedTuple

from schemas.activity import Activity
from schemas.grants import Tier
from services.rules.engine import step
from services.rules.ruleset import RuleBook, RuleSet, derived
from services.rules.state import MemberState, with_shared_tz
from services.rules.tiers import TiersAt, catch_up

CENT = Decimal("0.01")
TOTAL = "TOTAL"
Lane = Literal["in_force", "candidate"]
LANES: Final[tuple[Lane, Lane]] = ("in_force", "candidate")


class _Releases:
    """The held events ops released, each due at the moment of the decision: the lane
    that holds one schedules it (`hold`), the Simulation applies it when the stream
    reaches that moment. A plain class, like `engine.Step`, for the compiled build."""

    def __init__(self, decided: Mapping[str, datetime]) -> None:
        self.decided = decided
        # (decided at, order held, event, rule set of its time, its day), a heap by moment.
        self.due: list[tuple[datetime, int, Activity, RuleSet, date]] = []
        # The earliest moment due, None when nothing is: all the stream checks per event.
        self.next: datetime | None = None
        self._held = 0

    def hold(self, event: Activity, ruleset: RuleSet, day: date) -> None:
        at = self.decided.get(event.event_id)
        if at is None:
            return
        # In the event's tzinfo (shared by the stream's events, `state.with_shared_tz`), so
        # comparing it with the next events' moments needs no utcoffset() calls.
        at = at.astimezone(event.occurred_at.tzinfo)
        self._held += 1
        heappush(self.due, (at, self._held, event, ruleset, day))
        self.next = self.due[0][0]


@dataclass
class _Lane:
    states: dict[str, MemberState] = field(default_factory=dict)
    referrers: dict[str, str | None] = field(default_factory=dict)
    held: int = 0
    # (rule id, member) -> points: one count per payout; `result` values them at the
    # member's tier at the end, at the points-per-CNY rates of the lane's last rule set.
    counted: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    # Members with an event or a payout in the period (warm-up members without either are
    # not reported).
    active: set[str] = field(default_factory=set)

    def fork(self) -> _Lane:
        # States are frozen models: sharing them between lanes is safe, only the maps copy.
        return _Lane(states=dict(self.states), referrers=dict(self.referrers))

    def step(
        self, event: Activity, ruleset: RuleSet, count: bool, day: date,
        tiers_at: TiersAt | None = None, releases: _Releases | None = None,
    ) -> None:  # fmt: skip
        """`releases`: where a held event is scheduled, should ops have released it
        (None: holds stay unpaid, the candidate's way)."""
        member = event.member_id
        states = self.states
        state = states.get(member)
        if state is None:
            state = MemberState(member_id=member)
        # The tier report changes no state and is not counted: not built here.
        result = step(state, event, ruleset, self.referrers, report_tier=False, day=day,
                      tiers_at=tiers_at)  # fmt: skip
        new = states[member] = result.state
        if new.referrer_id is not None:
            self.referrers[member] = new.referrer_id
        if count:
            self.active.add(member)
        if result.held is not None:
            if count:
                self.held += 1
            if releases is not None:
                releases.hold(event, ruleset, day)
            return
        if not count:
            return
        counted, active = self.counted, self.active
        for revoke, who, rule, points, _, _ in result.payouts:
            counted[(rule, who)] += -points if revoke else points
            if who != member:
                active.add(who)  # a referrer paid in the period is one of its members

    def release(
        self, event: Activity, ruleset: RuleSet, day: date, count: bool,
        tiers_at: TiersAt | None,
    ) -> None:  # fmt: skip
        """A held event ops released, paid as `held.release_held` paid it: `engine.release`
        (every rule but the burst check) on the member's state at the release, under the
        rule set of the event's time. Kept apart from `step`, which runs for every event."""
        member = event.member_id
        result = step(self.states[member], event, ruleset, self.referrers, check_burst=False,
                      report_tier=False, day=day, tiers_at=tiers_at)  # fmt: skip
        new = self.states[member] = result.state
        if new.referrer_id is not None:
            self.referrers[member] = new.referrer_id
        if not count:
            return
        for revoke, who, rule, points, _, _ in result.payouts:
            self.counted[(rule, who)] += -points if revoke else points
            self.active.add(who)

    def result(
        self, rates: Mapping[Tier, int], at: datetime | None = None,
        ruleset: RuleSet | None = None, tiers_at: TiersAt | None = None,
    ) -> LaneResult:  # fmt: skip
        """`at` (with the `ruleset` in force then): tiers that ended by then are expired
        as the tier sweep would have, before the points are valued."""
        by_rate: defaultdict[tuple[str, int], int] = defaultdict(int)
        tier_of: dict[str, Tier] = {}
        for (rule, who), p in self.counted.items():
            tier = tier_of.get(who)
            if tier is None:
                tier = tier_of[who] = self._tier(who, at, ruleset, tiers_at)
            by_rate[(rule, rates.get(tier, 0))] += p
        return LaneResult(
            points=dict(self.counted),
            by_rate=dict(by_rate),
            held=self.held,
            members=frozenset(self.active),
        )

    def _tier(
        self, member: str, at: datetime | None, ruleset: RuleSet | None, tiers_at: TiersAt | None
    ) -> Tier:
        state = self.states.get(member)
        if state is None:
            return "member"
        until = state.tier_valid_until
        if at is None or ruleset is None or until is None or until > at:
            return state.tier
        return catch_up(state, at, ruleset.tiers, tiers_at, derived(ruleset).zone).tier


class LaneResult(NamedTuple):
    """What one lane counted: all `combine` needs (picklable, for the worker processes;
    a NamedTuple, as compiled frozen dataclasses do not unpickle)."""

    points: Mapping[tuple[str, str], int]
    by_rate: Mapping[tuple[str, int], int]
    held: int
    members: frozenset[str]


class Progress(NamedTuple):
    """Counters every lane computes identically, whichever lanes a Simulation runs."""

    events: int
    warmup_events: int
    versions_in_force: tuple[str, ...]


@dataclass(frozen=True)
class RuleRow:
    rule_id: str
    in_force: int
    candidate: int
    difference: int
    cash_in_force: Decimal
    cash_candidate: Decimal
    cash_difference: Decimal
    members_affected: int


@dataclass(frozen=True)
class Report:
    rows: tuple[RuleRow, ...]
    total: RuleRow
    events: int
    warmup_events: int
    members: int
    held_in_force: int
    held_candidate: int
    versions_in_force: tuple[str, ...]
    candidate_version: str


def _cash(by_rate: Mapping[tuple[str, int], int], rule: str | None) -> Decimal:
    """Points over points-per-CNY; a tier with no cash rate (0) has no cash value."""
    total = sum(
        (Decimal(p) / rate for (r, rate), p in by_rate.items() if rate and rule in (None, r)),
        Decimal(0),
    )
    return total.quantize(CENT, rounding=ROUND_HALF_UP)


class Simulation:
    """Feed warm-up events (optional), then the period's events, then take `report()`.

    `lanes` picks the lanes to run (both by default); `lane_results()` and `progress()`
    are what a worker process hands back for `combine`.
    """

    def __init__(
        self, book: RuleBook, candidate: RuleSet, lanes: Sequence[Lane] = LANES,
        released: Mapping[str, datetime] | None = None, valued_at: datetime | None = None,
        start: datetime | None = None,
    ) -> None:  # fmt: skip
        """`released`: held event id -> when ops released it (`rules_held.decided_at`), for
        the releases decided before the period's end. `start`: the period's start; a release
        decided before it is part of the warm-up (None: every release still due when the
        period's first event comes is in the period). `valued_at`: the moment whose rule
        set's cash rates value the in-force lane (the period's end); None: the book's
        latest version."""
        if not lanes or any(lane not in LANES for lane in lanes):
            raise ValueError(f"lanes must be some of {LANES}, got {lanes!r}")
        self.book = book
        self.candidate = candidate
        # Held events ops released (paid): the in-force lane pays them too. The candidate
        # lane, a rule set nobody reviewed bursts under, counts its holds as unpaid.
        self._releases = _Releases(released or {})
        self.start = start
        self.valued_at = valued_at
        in_force = book.versions[-1] if valued_at is None else book.at(valued_at)
        self._rates: dict[Lane, Mapping[Tier, int]] = {
            "in_force": in_force.redemption.points_per_cny,
            "candidate": candidate.redemption.points_per_cny,
        }
        self.lanes: tuple[Lane, ...] = tuple(dict.fromkeys(lanes))
        self._warm = _Lane()
        self._lanes: dict[Lane, _Lane] | None = None
        self._seen: set[str] = set()
        self._versions: set[str] = set()
        self.events = 0
        self.warmup_events = 0
        self._span: tuple[datetime | None, datetime | None, RuleSet] | None = None
        self._candidate_zone: tzinfo = derived(candidate).zone
        self._day_event: Activity | None = None
        self._day_zone: tzinfo | None = None
        self._day_value = date.min

    def _fresh(self, event: Activity) -> bool:
        """As the live adapter does: an event id counts once, however often it was recorded."""
        if event.event_id in self._seen:
            return False
        self._seen.add(event.event_id)
        return True

    def warm_up(self, event: Activity) -> None:
        if self._lanes is not None:
            raise ValueError("warm-up events must come before the period's events")
        if self._fresh(event):
            event = with_shared_tz(event)
            at = event.occurred_at
            releases = self._releases
            due = releases.next
            if due is not None and due <= at:
                self._release(self._warm, False, at)
            ruleset = self._rules_at(at)
            day = self._day(event, derived(ruleset).zone)
            self._warm.step(event, ruleset, False, day, self.book.tiers_at, releases)
            self.warmup_events += 1

    def _release(
        self, lane: _Lane, count: bool, until: datetime | None, at_until: bool = True
    ) -> None:
        """Applies, in the order decided, the releases decided before `until` (and at it,
        if `at_until`: live, an event arrives after its moment, so a release decided at
        that moment came first); None: all still due."""
        releases, tiers_at = self._releases, self.book.tiers_at
        due = releases.due
        while due:
            at = due[0][0]
            if until is not None and (at > until or (at == until and not at_until)):
                break
            _, _, event, ruleset, day = heappop(due)
            lane.release(event, ruleset, day, count, tiers_at)
        releases.next = due[0][0] if due else None

    def _start(self) -> dict[Lane, _Lane]:
        # Releases decided before the period's start belong to the warm-up, like its events.
        if self.start is not None:
            self._release(self._warm, False, self.start, at_until=False)
        if "in_force" not in self.lanes:  # only the in-force lane pays them in the period
            self._releases.due.clear()
            self._releases.next = None
        # The first lane takes the warm-up state over, any other starts from a copy of it.
        lanes = {lane: self._warm if i == 0 else self._warm.fork()
                 for i, lane in enumerate(self.lanes)}  # fmt: skip
        self._lanes = lanes
        return lanes

    def feed(self, event: Activity) -> None:
        lanes = self._lanes if self._lanes is not None else self._start()
        if not self._fresh(event):
            return
        event = with_shared_tz(event)
        at = event.occurred_at
        ruleset = self._rules_at(at)
        self._versions.add(ruleset.version)
        in_force, candidate = lanes.get("in_force"), lanes.get("candidate")
        if in_force is not None:
            releases = self._releases
            due = releases.next
            if due is not None and due <= at:
                self._release(in_force, True, at)
            day = self._day(event, derived(ruleset).zone)
            in_force.step(event, ruleset, True, day, self.book.tiers_at, releases)
        if candidate is not None:  # the candidate as if in force throughout
            candidate.step(event, self.candidate, True, self._day(event, self._candidate_zone))
        self.events += 1

    def _rules_at(self, at: datetime) -> RuleSet:
        """`book.at(at)`, keeping the last version's span in `at`'s tzinfo: events come in
        time order and share tzinfo objects (`state.with_shared_tz`), so this is usually two
        comparisons that need no utcoffset() calls."""
        span = self._span
        if span is not None:
            since, until, ruleset = span
            if (since is None or since <= at) and (until is None or at < until):
                return ruleset
        ruleset, since, until = self.book.span(at)
        tz = at.tzinfo
        self._span = (
            None if since is None else since.astimezone(tz),
            None if until is None else until.astimezone(tz),
            ruleset,
        )
        return ruleset

    def _day(self, event: Activity, zone: tzinfo) -> date:
        """The event's local date in `zone`, computed once per event for lanes that share it."""
        if event is self._day_event and zone is self._day_zone:
            return self._day_value
        day = event.occurred_at.astimezone(zone).date()
        self._day_event, self._day_zone, self._day_value = event, zone, day
        return day

    def feed_all(self, events: Iterable[Activity]) -> Simulation:
        for e in events:
            self.feed(e)
        return self

    def lane_results(self) -> dict[Lane, LaneResult]:
        # No period events yet: nothing counted (the warm-up alone is not reported), but
        # for the releases decided in the period, which are its last steps.
        lanes = self._lanes if self._lanes is not None else self._start()
        in_force = lanes.get("in_force")
        if in_force is not None and self._releases.next is not None:
            self._release(in_force, True, None)
        at = self.valued_at
        rules: dict[Lane, tuple[RuleSet | None, TiersAt | None]] = {
            "in_force": (None if at is None else self.book.at(at), self.book.tiers_at),
            "candidate": (self.candidate, None),
        }
        return {
            name: lane.result(self._rates[name], at, *rules[name]) for name, lane in lanes.items()
        }

    def progress(self) -> Progress:
        return Progress(self.events, self.warmup_events, tuple(sorted(self._versions)))

    def report(self) -> Report:
        results = self.lane_results()
        if set(results) != set(LANES):
            raise ValueError("a report needs both lanes: combine() the workers' results")
        return combine(results["in_force"], results["candidate"], self.progress(),
                       self.candidate.version)  # fmt: skip


class Summary(NamedTuple):
    """A share of the members' report before cash: what a backtest worker hands back.

    Per rule, not per member, so it stays small however many members a worker priced, and
    the parent adds summaries instead of receiving every member's points and merging them.
    Adding is exact only for workers with disjoint members whose payouts stay among
    themselves: the backtest splits members by referral component, and a payout's
    recipient is the member or someone in its referral chain. Cash is left to
    `report_of`, which prices the added points-per-rate totals once.
    """

    # rule -> (points in force, points under the candidate, members whose points differ)
    rules: Mapping[str, tuple[int, int, int]]
    total: tuple[int, int, int]
    by_rate: tuple[Mapping[tuple[str, int], int], Mapping[tuple[str, int], int]]
    held: tuple[int, int]
    members: int


def summarize(a: LaneResult, b: LaneResult) -> Summary:
    """The summary of the in-force lane `a` and the candidate lane `b` of the same members."""
    grid: defaultdict[str, defaultdict[str, list[int]]] = defaultdict(
        lambda: defaultdict(lambda: [0, 0])
    )
    for lane, source in enumerate((a.points, b.points)):
        for (rule, member), points in source.items():
            grid[rule][member][lane] += points
    rules: dict[str, tuple[int, int, int]] = {}
    for rule, by_member in grid.items():
        cells = by_member.values()
        rules[rule] = (
            sum(c[0] for c in cells),
            sum(c[1] for c in cells),
            sum(1 for c in cells if c[0] != c[1]),
        )
    per_member_a: defaultdict[str, int] = defaultdict(int)
    per_member_b: defaultdict[str, int] = defaultdict(int)
    for (_, m), p in a.points.items():
        per_member_a[m] += p
    for (_, m), p in b.points.items():
        per_member_b[m] += p
    everyone = set(per_member_a) | set(per_member_b)
    total = (
        sum(per_member_a.values()),
        sum(per_member_b.values()),
        sum(1 for m in everyone if per_member_a[m] != per_member_b[m]),
    )
    return Summary(
        rules=rules,
        total=total,
        by_rate=(a.by_rate, b.by_rate),
        held=(a.held, b.held),
        members=len(a.members | b.members),
    )


def report_of(summaries: Iterable[Summary], progress: Progress, candidate_version: str) -> Report:
    """The report from the summaries of disjoint shares of the members (see `Summary`)."""
    rules: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    total = [0, 0, 0]
    rate_a: defaultdict[tuple[str, int], int] = defaultdict(int)
    rate_b: defaultdict[tuple[str, int], int] = defaultdict(int)
    held = [0, 0]
    members = 0
    for part in summaries:
        for rule, counts in part.rules.items():
            cell = rules[rule]
            for i, n in enumerate(counts):
                cell[i] += n
        for i, n in enumerate(part.total):
            total[i] += n
        for target, source in ((rate_a, part.by_rate[0]), (rate_b, part.by_rate[1])):
            for key, p in source.items():
                target[key] += p
        held[0] += part.held[0]
        held[1] += part.held[1]
        members += part.members
    rows = []
    for rule in sorted(rules):
        pa, pb, affected = rules[rule]
        ca, cb = _cash(rate_a, rule), _cash(rate_b, rule)
        rows.append(RuleRow(rule, pa, pb, pb - pa, ca, cb, cb - ca, affected))
    ta, tb, affected = total
    ca, cb = _cash(rate_a, None), _cash(rate_b, None)
    return Report(
        rows=tuple(rows),
        total=RuleRow(TOTAL, ta, tb, tb - ta, ca, cb, cb - ca, affected),
        events=progress.events,
        warmup_events=progress.warmup_events,
        members=members,
        held_in_force=held[0],
        held_candidate=held[1],
        versions_in_force=progress.versions_in_force,
        candidate_version=candidate_version,
    )


def combine(a: LaneResult, b: LaneResult, progress: Progress, candidate_version: str) -> Report:
    """The report from the in-force lane `a` and the candidate lane `b`."""
    return report_of([summarize(a, b)], progress, candidate_version)


def merge_progress(parts: Iterable[Progress]) -> Progress:
    """Counters of workers that each saw a disjoint share of the events."""
    events = warmup = 0
    versions: set[str] = set()
    for part in parts:
        events += part.events
        warmup += part.warmup_events
        versions.update(part.versions_in_force)
    return Progress(events, warmup, tuple(sorted(versions)))
