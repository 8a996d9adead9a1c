"""The backtest's I/O: stream recorded activity out of Postgres into the pure `Simulation`.

Reads only (one read-only, repeatable-read transaction, so the period is a consistent
snapshot while the live service keeps writing); live member state is never touched.
Rows come through a server-side cursor in chunks, so memory stays flat however long the
period; payloads are the bytes as received, parsed with the same TypeAdapter as the
live consumer.

By default the members are split over two worker processes (`MemberWorkers`), each
pricing both lanes of its members, so every payload is parsed once. The rules read
another member's state only along referral links, so a referral component (found up
front from the payloads that name a referrer) stays in one worker. Each worker hands back
a per-rule `Summary` of its members (a kilobyte, however many members), and the parent
adds them into the report a single process would make (unit tests pin that equality).
`LaneWorkers` (one process per lane, each parsing every payload) is kept for comparison
in bench.sim_speed.
"""

from __future__ import annotations

import asyncio
import csv
import gc
import io
import json
import multiprocessing
import os
import queue
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import asdict
from datetime import datetime
from typing import Any, Final, Literal

import asyncpg
from pydantic import ValidationError

from schemas.activity import activity_adapter
from schemas.envelope import STORED
from services.rules.forkserver import PRELOAD
from services.rules.rulebook_store import read_book
from services.rules.ruleset import RuleBook, RuleSet
from services.rules.simulate import (
    LANES,
    Lane,
    LaneResult,
    Progress,
    Report,
    RuleRow,
    Simulation,
    Summary,
    combine,
    merge_progress,
    report_of,
    summarize,
)

Phase = Literal["warm", "feed"]

CHUNK: Final = 5000
COUNT: Final = """
SELECT count(*) FROM rules_activity
WHERE occurred_at >= coalesce($1, '-infinity'::timestamptz) AND occurred_at < $2
"""
# In event time; `_rows` puts a sign-up first among the events of its instant.
STREAM: Final = """
SELECT member_id, payload, occurred_at, type IN ('member_registered', 'referral')
FROM rules_activity
WHERE occurred_at >= coalesce($1, '-infinity'::timestamptz) AND occurred_at < $2
ORDER BY occurred_at, partition, "offset"
"""
# Held events ops released (paid through `rules held release`) before the period's end, and
# when: the in-force lane pays each at that moment, as the release did.
RELEASED: Final = """
SELECT event_id, decided_at FROM rules_held WHERE status = 'released' AND decided_at < $1
"""
# Every payload that may name a referrer (a bytes match, so nothing is parsed in SQL and a
# malformed payload cannot fail the query; a false match only joins members needlessly).
REFERRALS: Final = """
SELECT member_id, payload FROM rules_activity
WHERE occurred_at >= coalesce($1, '-infinity'::timestamptz) AND occurred_at < $2
  AND position(convert_to('referrer_id', 'UTF8') in payload) > 0
"""


async def _rows(
    conn: asyncpg.Connection, start: datetime | None, end: datetime
) -> AsyncIterator[list[asyncpg.Record]]:
    """The stream in chunks, each instant whole in one chunk and its sign-ups first."""
    cursor = await conn.cursor(STREAM, start, end)
    held: list[asyncpg.Record] = []
    while chunk := await cursor.fetch(CHUNK):
        rows = held + chunk if held else chunk
        last, cut = rows[-1][2], len(rows)
        while cut > 0 and rows[cut - 1][2] == last:  # the next chunk may hold more of it
            cut -= 1
        held = rows[cut:]
        if cut:
            yield sign_ups_first(rows[:cut])
    if held:
        yield sign_ups_first(held)


def sign_ups_first(rows: list[Any]) -> list[Any]:
    """At one instant, sign-ups and referrals before other members' events: the live
    service counts a referrer set at a purchase's very moment (`referral_chain.as_of`),
    whichever of the two it saw first. Not before the member's own earlier events of that
    instant, which live applied first (a referrer named after a first purchase is
    refused). Rows are (member_id, payload, occurred_at, is a sign-up) in stream order; instants
    shared by several rows are rare, so most chunks come back as they are."""
    out: list[Any] | None = None
    i, n = 0, len(rows)
    while i < n:
        j = i + 1
        while j < n and rows[j][2] == rows[i][2]:
            j += 1
        if j - i > 1 and any(r[3] for r in rows[i:j]):
            if out is None:
                out = list(rows[:i])
            first, rest, busy = [], [], set()
            for r in rows[i:j]:
                if r[3] and r[0] not in busy:
                    first.append(r)
                else:
                    rest.append(r)
                    if not r[3]:
                        busy.add(r[0])
            out += first + rest
        elif out is not None:
            out += rows[i:j]
        i = j
    return rows if out is None else out


def referral_groups(edges: Iterable[tuple[str, bytes]]) -> dict[str, str]:
    """Member -> a representative of its referral component (union-find over every
    (member, named referrer) pair). Only members in some pair are keys.

    The rules read another member's state only along referral links (the referrer's
    tier and own referrer, an indirect referrer's tier), so members of one component
    must be priced by the same worker; everyone else is independent.
    """
    parent: dict[str, str] = {}

    def find(m: str) -> str:
        root = m
        while (up := parent.setdefault(root, root)) != root:
            root = up
        while (up := parent[m]) != root:
            parent[m], m = root, up
        return root

    for member, raw in edges:
        try:
            body = json.loads(raw)
            referrer = body["data"]["referrer_id"]
        except (ValueError, TypeError, KeyError):
            continue
        if isinstance(referrer, str) and referrer:
            a, b = find(member), find(referrer)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {m: find(m) for m in list(parent)}


def worker_of(member: str, groups: Mapping[str, str], workers: int) -> int:
    """Deterministic (crc32, not the per-process salted `hash`) and per referral component."""
    return zlib.crc32(groups.get(member, member).encode()) % workers


def _take(sim: Simulation, phase: Phase, chunk: Iterable[bytes]) -> int:
    """Parse and feed one chunk; returns how many payloads no longer parse (skipped)."""
    take = sim.warm_up if phase == "warm" else sim.feed
    skipped = 0
    for raw in chunk:
        try:
            event = activity_adapter.validate_json(raw, context=STORED)
        except ValidationError:
            skipped += 1
            continue
        take(event)
    return skipped


def _lane_worker(
    book: RuleBook, candidate: RuleSet, lane: Lane, inbox: Any, outbox: Any,
    released: Mapping[str, datetime] | None = None, valued_at: datetime | None = None,
    start: datetime | None = None,
) -> None:  # fmt: skip
    """One lane in a worker process: chunks of raw payloads in, the lane's totals out."""
    gc.disable()  # member states hold no cycles; the collector only costs time here
    try:
        sim = Simulation(book, candidate, lanes=(lane,), released=released, valued_at=valued_at,
                         start=start)  # fmt: skip
        skipped = 0
        while True:
            phase, chunk = inbox.get()
            if phase == "end":
                break
            skipped += _take(sim, phase, chunk)
        outbox.put(("ok", lane, sim.lane_results()[lane], sim.progress(), skipped))
    except BaseException as exc:  # reported to the parent, which raises it
        outbox.put(("error", lane, f"{type(exc).__name__}: {exc}", None, 0))
        raise


def _member_worker(
    book: RuleBook, candidate: RuleSet, inbox: Any, outbox: Any,
    released: Mapping[str, datetime] | None = None, valued_at: datetime | None = None,
    start: datetime | None = None,
) -> None:  # fmt: skip
    """Both lanes for a share of the members: each payload is parsed once, not per lane."""
    gc.disable()  # member states hold no cycles; the collector only costs time here
    try:
        sim = Simulation(book, candidate, released=released, valued_at=valued_at, start=start)
        skipped = 0
        while True:
            phase, chunk = inbox.get()
            if phase == "end":
                break
            skipped += _take(sim, phase, chunk)
        lanes = sim.lane_results()
        summary = summarize(lanes["in_force"], lanes["candidate"])
        outbox.put(("ok", summary, sim.progress(), skipped))
    except BaseException as exc:  # reported to the parent, which raises it
        outbox.put(("error", f"{type(exc).__name__}: {exc}", None, 0))
        raise
    # Freeing every member state one by one takes a tenth of a run, and nobody waits for
    # it: the result is sent, so leave without tearing the heap down.
    outbox.close()
    outbox.join_thread()
    os._exit(0)


class LaneWorkerError(RuntimeError):
    """A lane's worker process failed or died; the backtest has no report."""


class LaneWorkers:
    """Both lanes in worker processes ('forkserver': the caller may run threads, such as a
    progress bar, which 'fork' would copy mid-flight). Use as a context manager."""

    POLL_S: Final = 1.0

    def __init__(
        self, book: RuleBook, candidate: RuleSet, context: str = "forkserver",
        released: Mapping[str, datetime] | None = None, valued_at: datetime | None = None,
        start: datetime | None = None,
    ) -> None:  # fmt: skip
        ctx: Any = multiprocessing.get_context(context)
        if context == "forkserver":
            ctx.set_forkserver_preload(PRELOAD)
        self.candidate_version = candidate.version
        # Bounded inboxes: reading Postgres is faster than pricing, so memory stays flat.
        self._inboxes = {lane: ctx.Queue(maxsize=4) for lane in LANES}
        self._outbox = ctx.Queue()
        self._procs = [
            ctx.Process(target=_lane_worker, name=f"backtest-{lane}", daemon=True,
                        args=(book, candidate, lane, self._inboxes[lane], self._outbox,
                              released, valued_at, start))
            for lane in LANES
        ]  # fmt: skip

    def __enter__(self) -> LaneWorkers:
        for p in self._procs:
            p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self._procs:
            if p.is_alive():
                p.terminate()
            p.join()

    def _check_alive(self) -> None:
        dead = [p for p in self._procs if not p.is_alive() and p.exitcode not in (0, None)]
        if dead:
            raise LaneWorkerError(f"{dead[0].name} exited with {dead[0].exitcode}")

    def send(self, phase: Phase | Literal["end"], chunk: list[bytes]) -> None:
        for inbox in self._inboxes.values():
            while True:
                try:
                    inbox.put((phase, chunk), timeout=self.POLL_S)
                    break
                except queue.Full:
                    self._check_alive()

    def finish(self) -> tuple[Report, int]:
        """Ends the input and waits for both lanes; returns the report and skipped count."""
        self.send("end", [])
        results: dict[str, tuple[LaneResult, Progress, int]] = {}
        while len(results) < len(LANES):
            try:
                status, lane, result, progress, skipped = self._outbox.get(timeout=self.POLL_S)
            except queue.Empty:
                self._check_alive()
                if all(not p.is_alive() for p in self._procs) and self._outbox.empty():
                    raise LaneWorkerError("lane workers ended without a result") from None
                continue
            if status != "ok":
                raise LaneWorkerError(f"lane {lane} failed: {result}")
            results[lane] = (result, progress, skipped)
        a, progress, skipped = results["in_force"]
        b = results["candidate"][0]
        return combine(a, b, progress, self.candidate_version), skipped


class MemberWorkers:
    """Members split over worker processes by referral component, each worker pricing both
    lanes of its members, so a payload is parsed once (`LaneWorkers` parse it per lane).
    Use as a context manager; `send` takes (member_id, payload) rows in stream order.

    `groups` (from `referral_groups`) may come after the workers start (`route_by`), so
    they boot while the caller still reads the referral links; `send` refuses rows until
    they are known.
    """

    POLL_S: Final = 1.0

    def __init__(
        self,
        book: RuleBook,
        candidate: RuleSet,
        groups: Mapping[str, str] | None = None,
        workers: int = 2,
        context: str = "forkserver",
        released: Mapping[str, datetime] | None = None,
        valued_at: datetime | None = None,
        start: datetime | None = None,
    ) -> None:
        ctx: Any = multiprocessing.get_context(context)
        if context == "forkserver":
            ctx.set_forkserver_preload(PRELOAD)
        self.candidate_version = candidate.version
        self._groups = groups
        self._n = workers
        self._where: dict[str, int] = {}
        # Bounded inboxes: reading Postgres is faster than pricing, so memory stays flat.
        self._inboxes = [ctx.Queue(maxsize=4) for _ in range(workers)]
        self._outbox = ctx.Queue()
        self._procs = [
            ctx.Process(target=_member_worker, name=f"backtest-{i}", daemon=True,
                        args=(book, candidate, self._inboxes[i], self._outbox, released,
                              valued_at, start))
            for i in range(workers)
        ]  # fmt: skip

    def start(self) -> None:
        """Blocks until the forkserver has done its imports (~0.3 s after it was started):
        `run_backtest` calls it in a thread and reads the referral links meanwhile."""
        for p in self._procs:
            p.start()

    def close(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.terminate()
            if p.pid is not None:  # started
                p.join()

    def __enter__(self) -> MemberWorkers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_alive(self) -> None:
        dead = [p for p in self._procs if not p.is_alive() and p.exitcode not in (0, None)]
        if dead:
            raise LaneWorkerError(f"{dead[0].name} exited with {dead[0].exitcode}")

    def _put(self, i: int, item: tuple[str, list[bytes]]) -> None:
        while True:
            try:
                self._inboxes[i].put(item, timeout=self.POLL_S)
                return
            except queue.Full:
                self._check_alive()

    def route_by(self, groups: Mapping[str, str]) -> None:
        """The referral components that decide which worker prices a member."""
        if self._where:
            raise RuntimeError("the routing of members cannot change once rows were sent")
        self._groups = groups

    def send(self, phase: Phase, rows: Iterable[tuple[str, bytes]]) -> None:
        groups = self._groups
        if groups is None:
            raise RuntimeError("route_by(groups) must come before the first rows")
        shares: list[list[bytes]] = [[] for _ in range(self._n)]
        where, n = self._where, self._n
        for row in rows:
            member, raw = row[0], row[1]
            i = where.get(member)
            if i is None:
                i = where[member] = worker_of(member, groups, n)
            shares[i].append(raw)
        for i, share in enumerate(shares):
            if share:
                self._put(i, (phase, share))

    def finish(self) -> tuple[Report, int]:
        """Ends the input and waits for every worker; returns the report and skipped count."""
        for i in range(self._n):
            self._put(i, ("end", []))
        got: list[tuple[Summary, Progress, int]] = []
        while len(got) < self._n:
            try:
                status, summary, progress, skipped = self._outbox.get(timeout=self.POLL_S)
            except queue.Empty:
                self._check_alive()
                if all(not p.is_alive() for p in self._procs) and self._outbox.empty():
                    raise LaneWorkerError("backtest workers ended without a result") from None
                continue
            if status != "ok":
                raise LaneWorkerError(f"backtest worker failed: {summary}")
            got.append((summary, progress, skipped))
        progress = merge_progress(p for _, p, _ in got)
        report = report_of((s for s, _, _ in got), progress, self.candidate_version)
        return report, sum(n for _, _, n in got)


async def run_backtest(
    conn: asyncpg.Connection,
    candidate: RuleSet,
    start: datetime,
    end: datetime,
    *,
    warmup: bool = True,
    on_total: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    workers: bool = True,
) -> tuple[Report, int]:
    """Returns the report and how many recorded payloads no longer parse (skipped).

    `workers=False` prices both lanes in this process (same report, about half the speed).
    """
    # Member states are acyclic: the cyclic GC only costs time here (~30% of a run).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            book = await read_book(conn)
            released = {r[0]: r[1] for r in await conn.fetch(RELEASED, end)}
            if on_total is not None:
                total = await conn.fetchval(COUNT, None if warmup else start, end)
                on_total(int(total))
            phases: list[tuple[datetime | None, datetime, Phase]] = []
            if warmup:
                phases.append((None, start, "warm"))
            phases.append((start, end, "feed"))
            if workers:
                pool = MemberWorkers(book, candidate, released=released, valued_at=end,
                                     start=start)  # fmt: skip
                try:
                    # The workers boot in a thread while the referral links are read.
                    booting = asyncio.ensure_future(asyncio.to_thread(pool.start))
                    try:
                        edges = await conn.fetch(REFERRALS, phases[0][0], end)
                        pool.route_by(referral_groups((r[0], r[1]) for r in edges))
                    finally:
                        await booting
                    for lo, hi, phase in phases:
                        async for rows in _rows(conn, lo, hi):
                            pool.send(phase, rows)
                            if on_progress is not None:
                                on_progress(len(rows))
                    return pool.finish()
                finally:
                    pool.close()
            sim = Simulation(book, candidate, released=released, valued_at=end, start=start)
            skipped = 0
            for lo, hi, phase in phases:
                async for rows in _rows(conn, lo, hi):
                    skipped += _take(sim, phase, [r[1] for r in rows])
                    if on_progress is not None:
                        on_progress(len(rows))
            return sim.report(), skipped
    finally:
        if gc_was_enabled:
            gc.enable()


FIELDS: Final = [
    "rule_id",
    "in_force",
    "candidate",
    "difference",
    "cash_in_force",
    "cash_candidate",
    "cash_difference",
    "members_affected",
]


def _row(row: RuleRow) -> dict[str, Any]:
    return {k: (str(v) if not isinstance(v, int | str) else v) for k, v in asdict(row).items()}


def report_dict(report: Report, start: datetime, end: datetime) -> dict[str, Any]:
    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "candidate_version": report.candidate_version,
        "versions_in_force": list(report.versions_in_force),
        "events": report.events,
        "warmup_events": report.warmup_events,
        "members": report.members,
        "held": {"in_force": report.held_in_force, "candidate": report.held_candidate},
        "rules": [_row(r) for r in report.rows],
        "total": _row(report.total),
    }


def report_json(report: Report, start: datetime, end: datetime) -> str:
    return json.dumps(report_dict(report, start, end), indent=2, ensure_ascii=False) + "\n"


def report_csv(report: Report) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in (*report.rows, report.total):
        writer.writerow(_row(row))
    return buf.getvalue()
