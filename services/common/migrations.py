"""Applies the versioned SQL files in deploy/migrations with yoyo, the same in tests and deploy."""

from __future__ import annotations

from pathlib import Path

from yoyo import get_backend, read_migrations

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "migrations"


def _yoyo_url(dsn: str) -> str:
    # yoyo picks its driver from the scheme; psycopg 3 is the one we install.
    for scheme in ("postgresql://", "postgres://"):
        if dsn.startswith(scheme):
            return "postgresql+psycopg://" + dsn[len(scheme) :]
    return dsn


def migration_ids() -> set[str]:
    """The migrations this code needs, by the ids yoyo records once it applied them."""
    return {m.id for m in read_migrations(str(MIGRATIONS_DIR))}


def apply_migrations(dsn: str) -> int:
    """Applies pending migrations; returns how many were applied."""
    backend = get_backend(_yoyo_url(dsn))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return len(pending)


if __name__ == "__main__":
    import os

    n = apply_migrations(os.environ["DATABASE_URL"])
    print(f"migrations: {n} applied")
