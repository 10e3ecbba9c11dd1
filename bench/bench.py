"""hookd benchmark driver: intake ratios against a bare-server ceiling and peers, then worker throughput.

Usage (normally through ``bench/run``, which prepares wrk, adnanh/webhook and the peers' venv first):
``python3 bench/bench.py [--quick] [--seconds N] [--runs N] [--conns 1,16,64] [--targets a,b]
[--workloads a,b] [--budget S] [--out STEM] [--profile] [--ixon]``. It measures every target on every
workload it takes (see benchlib/targets.py), computes ratios to the ceiling of the same run, checks
hookd's stored events against its 2xx answers, measures processing throughput and hookd against
naive-durable on a slow disk (a 2 ms fsync shim, benchlib/slowdisk.py) and hookd's intake beside a
busy job of its own (benchlib/busyjob.py), optionally profiles
hookd's request path with py-spy, and writes bench/results/STEM.md and STEM.json (STEM defaults to
today's UTC date, with "-quick" for a quick run). Every server it starts is stopped before it exits.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import busyjob, measure, processing, profile, report, slowdisk, targets  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))


def parse(argv):
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 s, 1 run, 16 connections")
    ap.add_argument("--seconds", type=int, help="seconds per wrk run (default 3)")
    ap.add_argument("--runs", type=int, help="runs per point, median reported (default 3)")
    ap.add_argument("--conns", help="comma-separated connection counts (default 1,16,64)")
    ap.add_argument("--targets", default=",".join(t.name for t in targets.TARGETS))
    ap.add_argument("--workloads", default=",".join(targets.ALL_WORKLOADS))
    ap.add_argument("--budget", type=float, help="seconds after which remaining points are skipped")
    ap.add_argument("--out", help="results file stem under bench/results (default: UTC date)")
    ap.add_argument("--no-processing", action="store_true", help="skip the worker throughput phase")
    ap.add_argument("--no-slow-disk", action="store_true", help="skip the 2 ms fsync phase")
    ap.add_argument("--no-busy-job", action="store_true", help="skip intake beside a busy job of hookd's")
    ap.add_argument("--profile", action="store_true", help="py-spy profile of hookd's request path")
    ap.add_argument("--ixon", action="store_true", help="also run bench/ixon_bench.py if present")
    args = ap.parse_args(argv)
    quick = args.quick
    args.seconds = args.seconds or (1 if quick else 3)
    args.runs = args.runs or (1 if quick else 3)
    args.conns = [int(c) for c in (args.conns or ("16" if quick else "1,16,64")).split(",")]
    args.budget = args.budget or (150 if quick else 540)
    args.out = args.out or time.strftime("%Y-%m-%d", time.gmtime()) + ("-quick" if quick else "")
    return args


def available(names, log):
    """The requested targets that can run here; says why the others are left out."""
    keep = []
    for name in names:
        if name == "hookd" and not os.path.exists(targets.HOOKD):
            log("hookd.py not found: hookd left out")
        elif name in ("webhook-cmd", "webhook-nocmd") and not shutil.which("webhook"):
            log("adnanh/webhook not installed: %s left out" % name)
        elif name in ("flask-dev", "gunicorn", "pypreservica") and not os.path.exists(targets.venv_python()):
            log("peer venv %s missing: %s left out" % (targets.venv_python(), name))
        else:
            keep.append(name)
    return keep


def peer_versions():
    code = ("import importlib.metadata as m\nfor n in ('Flask', 'gunicorn', 'pyPreservica'):\n"
            "    try: print(n, m.version(n))\n    except Exception: print(n, 'missing')")
    try:
        out = subprocess.run([targets.venv_python(), "-c", code], stdout=subprocess.PIPE, timeout=30)
        return ", ".join(out.stdout.decode().split("\n")).strip(", ")
    except (OSError, subprocess.TimeoutExpired):
        return "venv missing"


def hookd_commit():
    """The commit measured, with "+changes" when hookd's code differs from it in the working tree."""
    root = os.path.dirname(BENCH)
    try:
        head = subprocess.run(["git", "-C", root, "log", "-1", "--format=%h %s"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=10).stdout.decode().strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "hookd.py", "hookd_core",
                                "handlers"], stdout=subprocess.PIPE, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head[:90] + (" (+uncommitted changes)" if dirty else "")) or "unknown"


def stages(log):
    """hookd's CPU per request stage by stage (benchlib/stages.py, in a child: hookd logs to stderr)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "benchlib.stages"], cwd=BENCH, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return {"error": "benchlib.stages did not finish within 300 s"}
    try:
        result = json.loads(proc.stdout.decode())
    except ValueError:
        return {"error": "benchlib.stages exited %s without a result" % proc.returncode}
    log("  stages (µs/request, fastest of %s passes): %s" % (
        result.get("passes", 1), "; ".join("%s %s" % (k, ", ".join("%s %.1f" % kv for kv in v.items()))
                                           for k, v in result.items() if k != "passes")))
    return result


def ixon(log):
    path = os.path.join(BENCH, "ixon_bench.py")
    if not os.path.exists(path):
        log("bench/ixon_bench.py not present: IXON benchmark skipped")
        return None
    out = os.path.join(BENCH, ".work", "ixon.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    proc = subprocess.run([sys.executable, path, out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=180, check=False)
    return {"exit": proc.returncode, "output": proc.stdout.decode("utf-8", "replace")[-4000:]}


def main(argv=None):
    args = parse(argv if argv is not None else sys.argv[1:])
    start = time.monotonic()

    def log(msg):
        sys.stderr.write("[%5.0fs] %s\n" % (time.monotonic() - start, msg))
        sys.stderr.flush()

    workdir = os.path.join(BENCH, ".work")
    plan = measure.Plan(args.seconds, args.runs, args.conns,
                        available(args.targets.split(","), log), args.workloads.split(","),
                        workdir, args.budget)
    doc = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": report.machine(),
           "peer_versions": peer_versions(), "hookd_commit": hookd_commit(),
           "settings": {"seconds": args.seconds, "runs": args.runs, "conns": args.conns,
                        "quick": args.quick, "pinning": "taskset" if shutil.which("taskset") else "none",
                        "targets": plan.targets, "order": measure.ORDER, "cpu": measure.CPU_WINDOW}}
    doc["points"] = measure.intake(plan, log)
    report.add_ratios(doc["points"])
    if "hookd" in plan.targets and not args.no_processing:
        doc["processing"] = processing.run(plan, 5.0 if args.quick else 8.0, log)
    if "hookd" in plan.targets and not args.no_slow_disk:
        doc["slow_disk"] = slowdisk.run(plan, log)
    if "hookd" in plan.targets and not args.no_busy_job:
        doc["busy_job"] = busyjob.run(plan, log)
    if args.profile and "hookd" in plan.targets:
        doc["profile"] = profile.run(plan, log)
    if "hookd" in plan.targets:
        doc["stages"] = stages(log)
    if args.ixon:
        doc["ixon"] = ixon(log)
    doc["verdicts"] = report.verdicts(doc)
    doc["elapsed_s"] = time.monotonic() - start
    if hookd_commit() != doc["hookd_commit"]:
        doc["hookd_commit"] += " — CHANGED during the run to: %s; rerun before quoting" % hookd_commit()
    doc["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    md, js = report.write(doc, os.path.join(BENCH, "results"), args.out)
    for text, met, detail in doc["verdicts"]:
        log("%-4s %s: %s" % ({True: "MET", False: "MISS", None: "n/a"}[met], text, detail))
    log("wrote %s and %s" % (md, js))
    return 0


if __name__ == "__main__":
    sys.exit(main())
