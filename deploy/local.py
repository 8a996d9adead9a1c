"""One import for scripts and fixtures: every way this project starts infrastructure.

The pieces live in `deploy.processes` (detached processes, pids, ports),
`deploy.postgres` (PostgreSQL from the machine's binaries) and `deploy.brokers` (Tansu and
Apache Kafka in KRaft mode). The public functions are synchronous on purpose: they are
called from `deploy.stack` (a CLI) and from session-scoped pytest fixtures; ``*_async``
variants exist for callers already inside an event loop.
"""

from __future__ import annotations

from deploy.brokers import (
    KAFKA_VERSION,
    consumer_env,
    create_topics,
    create_topics_async,
    delete_topics,
    delete_topics_async,
    kafka_libs,
    start_kafka,
    start_tansu,
    tansu_bin,
    wait_for_broker,
    wait_for_broker_async,
)
from deploy.postgres import (
    PG_DATABASE,
    PG_PASSWORD,
    PG_USER,
    pg_dsn,
    postgres_pid,
    postgres_running,
    start_postgres,
    stop_postgres,
)
from deploy.processes import (  # noqa: F401 - _CHILDREN, _run_coro: for bench and stack
    _CHILDREN,
    CACHE_DIR,
    REPO_ROOT,
    _run_coro,
    free_port,
    pid_alive,
    port_open,
    process_args,
    process_cwd,
    read_pid,
    start_process,
    stop_pid,
    write_pid,
)

__all__ = [
    "CACHE_DIR",
    "KAFKA_VERSION",
    "PG_DATABASE",
    "PG_PASSWORD",
    "PG_USER",
    "REPO_ROOT",
    "consumer_env",
    "create_topics",
    "create_topics_async",
    "delete_topics",
    "delete_topics_async",
    "free_port",
    "kafka_libs",
    "pg_dsn",
    "pid_alive",
    "port_open",
    "postgres_pid",
    "postgres_running",
    "process_args",
    "process_cwd",
    "read_pid",
    "start_kafka",
    "start_postgres",
    "start_process",
    "start_tansu",
    "stop_pid",
    "stop_postgres",
    "tansu_bin",
    "wait_for_broker",
    "wait_for_broker_async",
    "write_pid",
]
