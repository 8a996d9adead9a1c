"""The rules service's rule-book reload: the stamp recorded is the one read before the
book, so a version published while the book loads is loaded at the next check rather
than marked as seen (it was, before: the stamp was read again after loading)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from rules_factories import DEFAULT, ruleset

from services.common.config import Settings
from services.rules import app
from services.rules.ruleset import RuleBook


class FakeConn:
    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield None


class FakePool:
    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakeConn]:
        yield FakeConn()


async def test_a_version_published_while_the_book_loads_is_loaded_next_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored = [DEFAULT]
    stamps = iter([(1, "t1"), (2, "t2"), (2, "t2"), (2, "t2")])
    newer = ruleset(version="2026.2")

    async def book_stamp(conn: Any) -> tuple[int, object]:
        return next(stamps)

    async def load_book(conn: Any) -> RuleBook:
        book = RuleBook(list(stored))
        stored.append(newer)  # published (and committed) while this load ran
        return book

    monkeypatch.setattr(app, "book_stamp", book_stamp)
    monkeypatch.setattr(app, "load_book", load_book)
    processor = app.RulesProcessor(Settings(database_url="", bootstrap_servers=""), "rules")
    pool: Any = FakePool()
    assert await processor.refresh_book(pool)
    assert processor.book is not None
    assert [r.version for r in processor.book.versions] == ["2026.1"]
    # The next check sees a stamp it has not loaded for, and loads the new version.
    assert await processor.refresh_book(pool)
    assert [r.version for r in processor.book.versions] == ["2026.1", "2026.2"]
