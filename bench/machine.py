"""The machine a bench ran on, as the results record it (and the rules core it ran)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

from bench import machine_probe
from bench.settings import BROKER, PARTITIONS
from bench.stack import Infra
from deploy import local


def services_rules_native() -> bool:
    import services.rules

    return services.rules.NATIVE


def _rules_core() -> str:
    import services.rules
    from services.common import native

    if services.rules.NATIVE:
        return "compiled (mypyc)"
    if not native.enabled():
        return "Python (LOYALTY_NATIVE=0)"
    return f"Python ({native.stale_reason() or 'no native build'})"


def machine(infra: Infra) -> dict[str, Any]:
    cpu = ""
    try:
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1) if m else ""
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "rules_core": _rules_core(),
        "broker": (
            f"Apache Kafka {local.KAFKA_VERSION} (KRaft, one node)"
            if BROKER == "kafka"
            else f"Tansu ({Path(local.tansu_bin()).name}, memory storage)"
        )
        + f", {PARTITIONS} partitions",
        "postgres": infra.pg_version,
        "synchronous_commit": "on",
        "fsync": "on",
        "consumer_max_batch": int(os.environ.get("CONSUMER_MAX_BATCH", "5000")),
        "consumer_batch_wait_ms": int(os.environ.get("CONSUMER_BATCH_WAIT_MS", "5")),
        "consumer_fetch_wait_ms": int(local.consumer_env(BROKER)["CONSUMER_FETCH_WAIT_MS"]),
        "planner_stats_seconds": float(os.environ.get("PLANNER_STATS_SECONDS") or 2.0),
        "load_average_at_start": os.getloadavg()[0],
        # bench/machine_probe.py: what makes runs on different days comparable.
        "wakeup_rtt_us": round(machine_probe.wakeup_rtt_us(), 1),
        "python_loop_us": round(machine_probe.python_loop_us(), 2),
    }
