"""5: reads: `wrk` against GET /v1/members/{id} with many members in the read models."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from typing import Any

import asyncpg
import httpx

from bench.settings import READ_CLIENTS, READ_MEMBERS, READ_SECONDS, READER_KEY, RUNS, say
from bench.stack import Infra, Services, create_topics, wait_until
from deploy import local
from services.common.config import Topics

GEN_MEMBERS = """
INSERT INTO ledger_members (member_id, tier, qualifying_spend, earned, redeemed, expired)
SELECT 'm' || lpad(g::text, 7, '0'), (ARRAY['member','silver','gold','diamond'])[1 + g % 4],
       (g % 50000)::numeric, 1000 + g % 9000, g % 500, 0
FROM generate_series(0, $1 - 1) AS g
"""
# `sweep_at` as the ledger writes a lot (its first warning; none is due here): left to its
# default, every lot would be due and the ledger's first sweep would look at all of them
# while the reads are measured.
GEN_LOTS = """
INSERT INTO ledger_lots (lot_id, member_id, points, remaining, earned_at, available_from,
                         expires_at, rule_id, sweep_at)
SELECT lot_id, member_id, 500, 400, earned, earned, expires, 'base', expires - interval '30 days'
FROM (
    SELECT 'l' || g || '-' || k AS lot_id, 'm' || lpad(g::text, 7, '0') AS member_id,
           now() - k * interval '40 days' AS earned,
           now() + interval '365 days' - k * interval '40 days' - (g % 30) * interval '1 day'
               AS expires
    FROM generate_series(0, $1 - 1) AS g, generate_series(0, 1) AS k
) AS lots
"""
WRK_SCRIPT = """
math.randomseed(os.time())
wrk.headers["Authorization"] = "Bearer %s"
request = function()
  return wrk.format("GET", string.format("/v1/members/m%%07d", math.random(0, %d)))
end
"""


async def read_runs(infra: Infra) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        say("reads: wrk not installed (apt-get install wrk); skipped")
        return {"available": False}
    db = "bench_reads"
    dsn = await infra.fresh_db(db)
    conn = await asyncpg.connect(dsn)
    try:
        t = time.perf_counter()
        await conn.execute(GEN_MEMBERS, READ_MEMBERS)
        await conn.execute(GEN_LOTS, READ_MEMBERS)
        await conn.execute("VACUUM ANALYZE ledger_members")
        await conn.execute("VACUUM ANALYZE ledger_lots")
        say(
            f"reads: {READ_MEMBERS:,} members, {2 * READ_MEMBERS:,} lots"
            f" in {time.perf_counter() - t:.1f}s"
        )
    finally:
        await conn.close()
    topics = Topics(prefix=f"b{uuid.uuid4().hex[:8]}.")
    await create_topics(infra.bootstrap, topics)
    svc = Services(dsn, infra.bootstrap, topics, "reads", ledger_port=local.free_port())
    runs: list[dict[str, float]] = []
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % (READER_KEY, READ_MEMBERS - 1))
        script = f.name
    try:
        svc.start("services.ledger")
        await wait_until(lambda: _http_ok(svc.ledger_port), 60, "ledger API", every=0.25)
        url = f"http://127.0.0.1:{svc.ledger_port}"
        # Warm-up: connections, the pool, the planner's cached plans.
        await asyncio.to_thread(_wrk, wrk, url, script, 3)
        for i in range(RUNS):
            rps, p99, p50, errors = await asyncio.to_thread(_wrk, wrk, url, script, READ_SECONDS)
            runs.append({"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors})
            say(f"reads run {i + 1}: {rps:,.0f} req/s, p50 {p50} ms, p99 {p99} ms, errors {errors}")
    finally:
        svc.stop()
        os.unlink(script)
        await infra.drop_db(db)
    best = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
    return {
        "available": True,
        "members": READ_MEMBERS,
        "clients": READ_CLIENTS,
        "runs": runs,
        **best,
    }


async def _http_ok(port: int) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


def _wrk(wrk: str, url: str, script: str, seconds: int) -> tuple[float, float, float, int]:
    r = subprocess.run(
        [wrk, "-t2", f"-c{READ_CLIENTS}", f"-d{seconds}s", "--latency", "-s", script, url],
        capture_output=True,
        text=True,
        check=True,
    )
    out = r.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        v = float(m.group(1))
        return round({"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)], 2)

    errs = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors:.*", out)
    errors = int(errs.group(1)) if errs else 0
    if sock:
        errors += sum(int(x) for x in re.findall(r"\d+", sock.group(0)))
    return rps, pct("99"), pct("50"), errors
