"""Shared fixtures: real Postgres and real brokers (tests/infra.py), never mocks."""

pytest_plugins = ["tests.infra"]
