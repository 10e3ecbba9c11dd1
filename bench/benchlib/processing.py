"""Processing throughput: how fast hookd's workers finish events, and how old the queue gets under load.

Strategy: hookd runs with ``[hook:bench]`` plus one action, ``command = /bin/true`` (with ``command.batch
= 4``, a tuning key for short commands) or ``forward`` to a
loopback sink (the ceiling server, pinned to the client core). wrk feeds Standard Webhooks events at full
speed (64 connections) for one run length while a sampler reads, every 0.2 s and read-only from the
database, the number of finished events and the age of the oldest queued one (what
``hookd_oldest_queued_seconds`` reports, without making hookd render /metrics under load; the metric
itself is read once at the end of intake as a cross-check). After intake
stops, sampling goes on until the queue is empty or a drain limit passes. Reported: events finished per
second during intake and after it (workers alone; only when a backlog of at least BACKLOG events was
left, otherwise the workers kept up and their limit was not reached), the oldest-queued age at the end
of intake, and what was left when the limit passed.
"""

import os
import shutil
import sys
import threading
import time

from . import hookdctl, pool, procs, wrkrun
from .targets import SERVERS, WORKLOADS, hookd_argv, hookd_config

CONNS = 64
# a tuning key for short commands (hookd's default, 1, keeps one program per worker); the report says so
COMMAND = "command = /bin/true\ncommand.batch = 4\n"
RESERVE = 60.0  # seconds past the intake budget this phase may still start in (it is bounded itself)
BACKLOG = 50  # events left at the end of intake below which the workers are said to keep up

def run(plan, drain_limit, log):
    """Both actions' results as a list of dicts."""
    results = []
    for action in ("command", "forward"):
        if time.monotonic() > plan.deadline + RESERVE:
            results.append({"action": action, "flags": ["skipped: time budget ran out"]})
            continue
        results.append(_action(plan, action, drain_limit, log))
    return results


def _action(plan, action, drain_limit, log):
    workdir = os.path.join(plan.workdir, "processing-" + action)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    sink_port = procs.free_port()
    sink = procs.Server("sink", [sys.executable, os.path.join(SERVERS, "ceiling.py"), str(sink_port)],
                        sink_port, os.path.join(workdir, "sink.log"), cpu=procs.CLIENT_CPU)
    extra = (COMMAND if action == "command"
             else "forward = http://127.0.0.1:%d/sink\n" % sink_port)
    port = procs.free_port()
    argv = hookd_argv(port, hookd_config(workdir, extra))
    hookd = procs.Server("hookd", argv, port, os.path.join(workdir, "server.log"), cwd=workdir)
    with sink, hookd:
        result = _measure(plan, hookd, workdir, drain_limit)
    result["action"] = action
    if action == "command":
        result["config"] = ", ".join(COMMAND.split("\n")[:-1])
    log("  processing %-8s intake %6.0f req/s; finished %6.0f ev/s during intake, %s ev/s after;"
        " oldest queued %.1f s; %s left" % (action, result["intake_rps"], result["during_eps"],
                                             "%.0f" % result["drain_eps"] if result["drain_eps"] else "kept up,",
                                             result["oldest_end_of_intake_s"] or 0, result["left"]))
    return result


class Sampler(threading.Thread):
    """Samples (t, finished, oldest_queued_s, pending) every 0.2 s until ``stop`` is set."""

    def __init__(self, port, workdir):
        super().__init__(daemon=True)
        self.port, self.workdir = port, workdir
        self.samples, self.stop = [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append(self.sample())
            self.stop.wait(0.2)

    def sample(self):
        finished = hookdctl.count_db_status(self.workdir, ("done",))
        left = hookdctl.count_db_status(self.workdir, hookdctl.PENDING)
        oldest = hookdctl.oldest_queued_db(self.workdir)
        return time.monotonic(), finished or 0, oldest, left


def _measure(plan, hookd, workdir, drain_limit):
    workload = [w for w in WORKLOADS if w.name == "standard"][0]
    pool_path = os.path.join(workdir, "pool.txt")
    pool.build(pool_path, "standard", 30000 * plan.seconds)
    sampler = Sampler(hookd.port, workdir)
    sampler.start()
    t0 = time.monotonic()
    res = wrkrun.run(workload.lua, "http://127.0.0.1:%d" % hookd.port, CONNS, plan.seconds, pool_path,
                     workload.route)
    t1 = time.monotonic()
    t0 += res["ready_s"]  # intake began once wrk had read its pool (BENCHREADY), not at its start
    res["metric_oldest_s"] = [v for _, v in hookdctl.metrics(workdir).get("hookd_oldest_queued_seconds", [])]
    _wait_empty(sampler, t1, t1 + drain_limit)
    sampler.stop.set()
    sampler.join()
    return _summary(res, sampler.samples, t0, t1, hookd.peak_rss_kb())


def _wait_empty(sampler, after, deadline):
    """Until a sample taken after ``after`` shows nothing pending, or ``deadline``."""
    while time.monotonic() < deadline:
        last = sampler.samples[-1] if sampler.samples else None
        if last and last[0] > after and last[3] == 0:
            return
        time.sleep(0.2)


def _at(samples, when):
    """The last sample taken at or before ``when`` (the first one if none)."""
    best = samples[0]
    for s in samples:
        if s[0] <= when:
            best = s
    return best


def _summary(res, samples, t0, t1, rss_kb):
    start, end_intake, last = _at(samples, t0), _at(samples, t1), samples[-1]
    during = (end_intake[1] - start[1]) / max(end_intake[0] - start[0], 1e-6)
    drain = None  # workers kept up with intake: their own limit was not reached
    if (end_intake[3] or 0) >= BACKLOG:
        drain = (last[1] - end_intake[1]) / max(last[0] - end_intake[0], 1e-6)
    oldest = [s[2] for s in samples if s[0] <= t1 and s[2] is not None]
    flags = []
    if res["non2xx"] or res["socket_errors"]:
        flags.append("%d non-2xx, %d socket errors during intake" % (res["non2xx"], res["socket_errors"]))
    return {"intake_rps": res["rps"], "intake_2xx": res["responses"] - res["non2xx"],
            "during_eps": during, "drain_eps": drain, "drain_window_s": last[0] - end_intake[0],
            "oldest_end_of_intake_s": end_intake[2], "oldest_max_s": max(oldest) if oldest else None,
            "metric_oldest_end_of_intake_s": (res["metric_oldest_s"] or [None])[0], "finished": last[1], "left": last[3], "rss_kb": rss_kb, "p99_us": res["p99_us"],
            "flags": flags}
