"""Local infrastructure: start Postgres, Tansu and Apache Kafka from nothing (no Docker).

`deploy.local` holds the building blocks (used by `make up` and by the pytest fixtures in
`tests/infra.py`); `deploy.stack` is the `python -m deploy.stack up|down|status` entry point.
"""
