"""The slow-disk phase: hookd against naive-durable when every fsync/fdatasync takes 2 ms longer.

Strategy: this VM flushes in about 0.3 ms, which hides what group commit is for: a consumer SSD's cache
flush takes milliseconds, and one commit per request then caps a server at a few hundred requests per
second whatever its CPU. ``bench/run`` builds ``slowfsync.so`` (bench/slowfsync.c) with ``cc``; it is
preloaded (LD_PRELOAD) into naive-durable and hookd only, which then serve the Standard Webhooks
workload at 16 and 64 connections with the same runs, interleaved the same way, and honesty checks as
the intake phase. Reported:
each point's req/s and hookd's ratio to naive-durable at the same connection count.
"""

import os

from . import measure
from .targets import TARGETS, WORKLOADS

SHIM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".work", "slowfsync.so")
CONNS = [16, 64]
DELAY_US = 2000
BUDGET = 120  # seconds


def run(plan, log):
    """{"points": [...], "delay_us": N} or {"error": why}. It has a budget of its own (BUDGET seconds),
    so that a long intake phase never leaves it out."""
    if not os.path.exists(SHIM):
        return {"error": "%s missing (bench/run builds it with cc)" % SHIM}
    plan = measure.Plan(plan.seconds, plan.runs, CONNS, plan.targets, plan.workloads, plan.workdir, BUDGET)
    env = {"LD_PRELOAD": SHIM, "BENCH_FSYNC_DELAY_US": str(DELAY_US)}
    workload = [w for w in WORKLOADS if w.name == "standard"][0]
    chosen = [t for name in ("naive-durable", "hookd") for t in TARGETS if t.name == name]
    points = measure.workload_block(plan, chosen, workload, log, env=env, tag="-slowdisk")
    by = {(p["target"], p["conns"]): p for p in points}
    for p in points:
        naive = by.get(("naive-durable", p["conns"]))
        p["x_naive"] = p["rps"] / naive["rps"] if naive and naive.get("rps") and p.get("rps") else None
    return {"points": points, "delay_us": DELAY_US}
