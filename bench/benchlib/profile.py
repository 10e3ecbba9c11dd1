"""Where hookd's request path spends its time: py-spy samples of hookd under the 64-connection intake.

Strategy: hookd is started with the bench configuration, wrk drives the Preservica Content-Length
workload at 64 connections for one run length, and ``py-spy record --nonblocking --format raw`` (from
the benchmark venv) samples every thread meanwhile; ``--gil`` keeps only the thread holding the GIL in
each sample, which is the resource a CPU-bound Python server runs out of. The collapsed stacks are folded into self time per function
and inclusive time per function (line numbers dropped), as shares of all samples; the top entries go
into the results file, with hookd's CPU use during the profiled run (over wrk's run alone, see
wrkrun.py; a share of one core far below 100% means hookd is waiting, not computing, and the profile
then shows only the smaller part).
"""

import collections
import os
import re
import shutil
import subprocess
import time

from . import measure, pool, procs, wrkrun
from .targets import WORKLOADS, hookd_argv, hookd_config, venv_python

_LINE = re.compile(r":\d+\)")


def run(plan, log, top=25):
    """{"self": [(share, func)], "inclusive": [...], "samples": n} or {"error": text}."""
    spy = os.path.join(os.path.dirname(venv_python()), "py-spy")
    if not os.path.exists(spy):
        return {"error": "py-spy not in the bench venv (bench/run --profile installs it)"}
    workdir = os.path.join(plan.workdir, "profile")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    port = procs.free_port()
    argv = hookd_argv(port, hookd_config(workdir))
    with procs.Server("hookd", argv, port, os.path.join(workdir, "server.log"), cwd=workdir) as hookd:
        meter = measure.CpuMeter([hookd])
        raw, rps = _record(spy, hookd, workdir, plan.seconds, meter)
    result = fold(raw, top)
    result.update(cpu_share=meter.share, rps=rps)
    log("  profile: %d samples; top self: %s" % (result.get("samples", 0), ", ".join(
        "%.0f%% %s" % (s * 100, f) for s, f in result.get("self", [])[:5])))
    return result


def _record(spy, hookd, workdir, seconds, meter):
    out = os.path.join(workdir, "pyspy.txt")
    workload = [w for w in WORKLOADS if w.name == "preservica-cl"][0]
    pool_path = os.path.join(workdir, "pool.txt")
    pool.build(pool_path, "preservica", 30000 * seconds)
    rec = subprocess.Popen([spy, "record", "--pid", str(hookd.proc.pid), "--rate", "250", "--nonblocking",
                            "--gil", "--duration", str(seconds), "--format", "raw", "--output", out],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.3)
        res = wrkrun.run(workload.lua, "http://127.0.0.1:%d" % hookd.port, 64, seconds, pool_path,
                         workload.route, workload.header, meters=(meter,))
        rec.wait(seconds + 30)
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()
    return out, res["rps"]


def fold(path, top):
    """Self and inclusive shares per function from a py-spy raw (collapsed stacks) file."""
    if not os.path.exists(path):
        return {"error": "py-spy wrote nothing (ptrace not permitted?)"}
    own, incl, total = collections.Counter(), collections.Counter(), 0
    for line in open(path, encoding="utf-8", errors="replace"):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        n = int(count)
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return {"error": "no samples"}
    share = lambda c: [(v / total, f) for f, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "self": share(own), "inclusive": share(incl)}
