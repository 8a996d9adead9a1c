"""The bench's knobs (BENCH_* environment variables), its paths and constants, and `say`.

Every knob is read once, at import; BENCH_QUICK=1 picks the smaller sizes (see bench/run.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / ".run" / "bench"
RESULTS = Path(__file__).resolve().parent / "results"
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
PARTITIONS = 6
# `kafka`: Apache Kafka (KRaft, one node, the jars `make test` fetched) instead of Tansu.
BROKER = os.environ.get("BENCH_BROKER", "tansu")
OPS_KEY, READER_KEY = "bench-ops", "bench-reader"


def _int(name: str, full: int, quick: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else (quick if QUICK else full)


E2E_EVENTS = _int("BENCH_E2E_EVENTS", 200_000, 40_000)
NAIVE_EVENTS = _int("BENCH_NAIVE_EVENTS", 3_000, 1_000)
RUNS = _int("BENCH_RUNS", 3, 1)
LATENCY_EPS = _int("BENCH_LATENCY_EPS", 5_000, 5_000)
LATENCY_SECONDS = _int("BENCH_LATENCY_SECONDS", 15, 8)
# A second, single run at a load the pipeline sustains on this machine, for contrast.
LATENCY_LOW_EPS = _int("BENCH_LATENCY_LOW_EPS", 1_000, 1_000)
LATENCY_WARMUP_S = 2.0
REBUILD_ENTRIES = _int("BENCH_REBUILD_ENTRIES", 2_000_000, 200_000)
READ_MEMBERS = _int("BENCH_READ_MEMBERS", 1_000_000, 100_000)
READ_SECONDS = _int("BENCH_READ_SECONDS", 15, 5)
READ_CLIENTS = 32
SIM_EVENTS = _int("BENCH_SIM_EVENTS", 200_000, 20_000)
SWEEP_LOTS = _int("BENCH_SWEEP_LOTS", 300_000, 30_000)
REBUILD_MAX_S = 60.0  # one run only when a run takes longer than this (budget)
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))

# BENCH_PROFILE_SECONDS=N: py-spy every service for N s (bench.stack.profile).
PROFILE_S = int(os.environ.get("BENCH_PROFILE_SECONDS", "0"))
# BENCH_DUMP_JOURNALS=1, BENCH_PG_STATEMENTS=1: what they write, bench/measures/e2e.py.
DUMP_JOURNALS = os.environ.get("BENCH_DUMP_JOURNALS") == "1"
PG_STATEMENTS = os.environ.get("BENCH_PG_STATEMENTS") == "1"


def want(step: str) -> bool:
    return not ONLY or step in ONLY


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
