"""Intake beside a busy job: what hookd's own CPU-bound jobs do to its intake.

Strategy: hookd runs the bench configuration plus a route ``[hook:busy]`` whose ``command`` is a
CPU-bound program: a libx264 encode of ffmpeg's test source (what a thumbnail or clip job is made of), or
a Python busy loop where ffmpeg is missing. hookd is pinned to its core like every server here, so its
jobs are too. In one daemon, Standard Webhooks at 16 connections is measured ``plan.runs`` times
unloaded, then JOBS such jobs are posted to the route and, once their programs are seen running,
measured ``plan.runs`` times again beside them. Reported: the medians of req/s, p99 and hookd's CPU share
(its process group: the jobs lead groups of their own) unloaded and beside the jobs, the share of the
unloaded rate, and the jobs' scheduling policy while they ran. A job that has gone SCHED_IDLE
(``job_idle_after``) leaves the core to the request threads whenever they want it; one at hookd's
priority takes its turn at each of their waits (every fdatasync, every hand-off).
"""

import os
import shutil
import statistics
import sys
import time
import urllib.request

from . import measure, pool, procs, wrkrun
from .targets import WORKLOADS, hookd_argv, hookd_config

CONNS = 16
JOBS = 1
MARK = "testsrc=size=1280x720:rate=30"  # in the busy program's command line: how its processes are found
ENCODE = ("ffmpeg -nostdin -loglevel error -f lavfi -i %s -t 600 -c:v libx264 -preset medium -f null -"
          % MARK)
LOOP = "%s -c \"import time; t = time.monotonic() + 600; exec('while time.monotonic() < t: pass')\" %s" \
       % (sys.executable, MARK)
POLICIES = {0: "normal", 3: "batch", 5: "idle"}


def run(plan, log):
    """{"program", "jobs", "unloaded": [runs], "busy": [runs], "policy", medians...} or {"error": why}."""
    workdir = os.path.join(plan.workdir, "busyjob")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    program = ENCODE if shutil.which("ffmpeg") else LOOP
    route = "\n[hook:busy]\nverify = none\nallow_unsigned = true\ncommand = %s\ncommand.timeout = 900\n" % program
    if _running():
        return {"error": "a process with %r in its command line already runs (an earlier run's?)" % MARK}
    port = procs.free_port()
    hookd = procs.Server("hookd", hookd_argv(port, hookd_config(workdir, route)), port,
                         os.path.join(workdir, "server.log"), cwd=workdir)
    jobs = {}  # pid -> start time of the busy programs hookd started
    try:
        with hookd:
            result = _measure(plan, hookd, workdir, port, jobs)
    finally:  # hookd kills its jobs on SIGTERM; one left by a hookd that had to be killed goes here
        for pid, start in jobs.items():
            try:
                if _start(pid) == start:
                    os.kill(pid, 9)
            except OSError:
                pass
    if "error" not in result:
        result.update(program=program.split()[0].rsplit("/", 1)[-1], command=program)
        log("  busy job (%s, %s): %.0f req/s beside it against %.0f unloaded (%.0f %%), p99 %.1f against"
            " %.1f ms" % (result["program"], "/".join(result["policy"]), result["busy_rps"],
                          result["unloaded_rps"], 100 * result["share"], result["busy_p99_us"] / 1000.0,
                          result["unloaded_p99_us"] / 1000.0))
    return result


def _measure(plan, hookd, workdir, port, jobs):
    measure.wait_quiet({"hookd": hookd})
    unloaded = [_one(plan, hookd, workdir, n) for n in range(plan.runs)]
    for n in range(JOBS):
        urllib.request.urlopen(urllib.request.Request(
            "http://127.0.0.1:%d/hooks/busy" % port, data=b'{"job": %d}' % n,
            headers={"Content-Type": "application/json"}), timeout=10).read()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        jobs.update((pid, _start(pid)) for pid in _running(hookd.proc.pid))
        if len(jobs) >= JOBS:
            break
        time.sleep(0.05)
    if len(jobs) < JOBS:
        return {"error": "%d of %d busy jobs seen running after 30 s; see %s" % (len(jobs), JOBS, hookd.log_path)}
    time.sleep(0.5)  # past job_idle_after, whatever it is set to below that
    policy = _policies(jobs)
    busy = [_one(plan, hookd, workdir, plan.runs + n) for n in range(plan.runs)]
    after = _policies(jobs)
    if sorted(_running(hookd.proc.pid)) != sorted(jobs) or after != policy:
        return {"error": "the busy jobs %s did not run through the busy runs as they began (policies %s, then"
                         " %s)" % (sorted(jobs), policy, after)}
    result = {"jobs": JOBS, "conns": CONNS, "unloaded": unloaded, "busy": busy, "policy": policy}
    for name in ("unloaded", "busy"):
        for key in ("rps", "p99_us", "cpu_share"):
            result["%s_%s" % (name, key)] = statistics.median(r[key] for r in result[name])
    result["share"] = result["busy_rps"] / max(result["unloaded_rps"], 1e-9)
    result["errors"] = sum(r["non2xx"] + r["socket_errors"] for r in unloaded + busy)
    return result


def _one(plan, hookd, workdir, n):
    """One wrk run of Standard Webhooks, every request new (a pool of its own)."""
    workload = [w for w in WORKLOADS if w.name == "standard"][0]
    pool_path = os.path.join(workdir, "pool.txt")
    pool.build(pool_path, "standard", 25000 * plan.seconds + 500, tag="busy%d-%d" % (os.getpid(), n))
    meter = measure.CpuMeter([hookd])
    res = wrkrun.run(workload.lua, "http://127.0.0.1:%d" % hookd.port, CONNS, plan.seconds, pool_path,
                     workload.route, meters=(meter,))
    os.unlink(pool_path)
    res["cpu_share"] = meter.share
    return res


def _running(parent=None):
    """Pids of the busy programs (their command line holds MARK), only ``parent``'s children if given."""
    return [pid for pid in procs.pids() if pid != os.getpid() and MARK.encode() in _cmdline(pid)
            and (parent is None or procs.stat_fields(pid)[1:2] == [str(parent)])]


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _start(pid):
    """Its start time in clock ticks since boot (a string), or None when it is gone."""
    return (procs.stat_fields(pid)[19:20] or [None])[0]


def _policies(jobs):
    """The scheduling policies of every thread of the jobs, by name ("gone" for a job that has ended)."""
    seen = set()
    for pid in jobs:
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            seen.add("gone")
            continue
        for tid in tids:
            try:
                policy = os.sched_getscheduler(int(tid)) & ~os.SCHED_RESET_ON_FORK
                seen.add(POLICIES.get(policy, str(policy)))
            except OSError:
                pass
    return sorted(seen)
