"""The results: the summary, the JSON under bench/results/, the chart, the printed table and
the final `bench: ...` line."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.settings import LATENCY_EPS, LATENCY_LOW_EPS, QUICK, RESULTS, ROOT, say


def chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no chart")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    s = results["summary"]
    names = ["e2e", "naive", "rebuild", "reads (rps)", "backtest"]
    vals = [s["e2e_eps"], s["naive_eps"], s["rebuild_eps"], s["read_rps"], s["sim_eps"]]
    targets = [20_000, None, 200_000, 3_000, 100_000]
    ax1.bar(names, [v or 0 for v in vals], color="#4a7")
    for i, t in enumerate(targets):
        if t:
            ax1.plot([i - 0.4, i + 0.4], [t, t], "r--", lw=1)
    ax1.set_yscale("log")
    ax1.set_ylabel("per second (log)")
    ax1.set_title("throughput (red: target)")
    lat = results.get("latency", {}).get("best_latencies_ms") or []
    if lat:
        ys = [(i + 1) / len(lat) for i in range(len(lat))]
        ax2.plot(lat, ys)
        ax2.axvline(100, color="r", ls="--", lw=1)
        ax2.set_xscale("log")
        ax2.set_xlabel("produce -> visible (ms, log)")
        ax2.set_ylabel("fraction of events")
        ax2.set_title(f"latency CDF at {LATENCY_EPS:,} events/s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _fmt(v: Any, nd: int = 0) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{nd}f}"


def report(results: dict[str, Any], t_start: float) -> None:
    e2e = results.get("e2e", {}).get("eps")
    naive = results.get("naive", {}).get("eps")
    s = {
        "e2e_eps": e2e,
        "naive_eps": naive,
        "ratio": (e2e / naive) if e2e and naive else None,
        "p99_ms": results.get("latency", {}).get("p99_ms"),
        "rebuild_eps": results.get("rebuild", {}).get("eps"),
        "read_rps": results.get("reads", {}).get("rps"),
        "read_p99_ms": results.get("reads", {}).get("p99_ms"),
        "sim_eps": results.get("sim", {}).get("eps"),
    }
    results["summary"] = s
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    out = RESULTS / f"{stamp}{'-quick' if QUICK else ''}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    png = out.with_suffix(".png")
    chart(results, png)

    lat = results.get("latency", {})
    low = lat.get("at_sustainable_load", {})
    rows = [
        ("end-to-end", f"{_fmt(e2e)} events/s", "≥ 20,000"),
        ("naive baseline", f"{_fmt(naive)} events/s", ""),
        ("ratio", _fmt(s["ratio"], 1), "≥ 20"),
        (
            f"latency @ {LATENCY_EPS:,}/s",
            f"p50 {_fmt(lat.get('p50_ms'), 1)} / p99 {_fmt(lat.get('p99_ms'), 1)}"
            f" / max {_fmt(lat.get('max_ms'), 1)} ms",
            "p99 ≤ 100 ms",
        ),
        (
            f"latency @ {LATENCY_LOW_EPS:,}/s",
            f"p50 {_fmt(low.get('p50_ms'), 1)} / p99 {_fmt(low.get('p99_ms'), 1)}"
            f" / max {_fmt(low.get('max_ms'), 1)} ms",
            "(context)",
        ),
        ("rebuild", f"{_fmt(s['rebuild_eps'])} entries/s", "≥ 200,000"),
        (
            "reads",
            f"{_fmt(s['read_rps'])} req/s, p99 {_fmt(s['read_p99_ms'], 1)} ms",
            "≥ 3,000, p99 ≤ 20 ms",
        ),
        ("backtesting", f"{_fmt(s['sim_eps'])} events/s", "≥ 100,000"),
    ]
    sweep = results.get("sweep")
    if sweep:
        rows.append(
            (
                "expiry sweep",
                f"{sweep['lots']:,} lots: expire {_fmt(sweep['expire_eps'])}/s,"
                f" warn {_fmt(sweep['warn_eps'])}/s, idle {_fmt(sweep['idle_seconds'], 2)} s",
                "(context)",
            )
        )
    print()
    print(f"{'measure':<22} {'result':<44} target")
    for name, val, target in rows:
        print(f"{name:<22} {val:<44} {target}")
    print(f"\nmachine: {json.dumps(results['machine']) if 'machine' in results else 'n/a'}")
    print(f"results: {out.relative_to(ROOT)}  chart: {png.relative_to(ROOT)}")
    print(f"total: {results['total_seconds']:.0f}s")

    def n(v: Any) -> str:
        return "NA" if v is None else str(round(v))

    def x(v: Any) -> str:
        return "NA" if v is None else f"{v:.1f}"

    print(
        f"bench: e2e_eps={n(e2e)} naive_eps={n(naive)} ratio={x(s['ratio'])}"
        f" p99_ms={x(s['p99_ms'])} rebuild_eps={n(s['rebuild_eps'])}"
        f" read_rps={n(s['read_rps'])} read_p99_ms={x(s['read_p99_ms'])}"
        f" sim_eps={n(s['sim_eps'])}"
    )
