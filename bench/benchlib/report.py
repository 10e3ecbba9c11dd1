"""The results: the targets verdict, the machine description, and the Markdown and JSON files.

Strategy: everything is computed from the list of points and processing results; ratios are always to
the ceiling measured in the same run at the same workload and connection count (absolute numbers drift
on a shared machine, ratios much less). ``verdicts`` applies the issue's targets to hookd's points;
``markdown`` renders one table per workload; ``write`` stores both files under bench/results/.
"""

import json
import os
import platform
import subprocess
import sys

from .targets import TARGETS, WORKLOADS

FRAMINGS = ("preservica-cl", "preservica-chunked")


def index(points):
    return {(p["target"], p["workload"], p["conns"]): p for p in points}


def add_ratios(points):
    """Set ``ratio`` (req/s) and ``p99_ratio`` against the ceiling at the same workload and conns."""
    idx = index(points)
    for p in points:
        c = idx.get(("ceiling", p["workload"], p["conns"]))
        ok = c and c.get("rps") and p.get("rps") is not None
        p["ratio"] = p["rps"] / c["rps"] if ok else None
        p["p99_ratio"] = p["p99_us"] / c["p99_us"] if ok and c["p99_us"] else None


def verdicts(points):
    """[(target text, met: True/False/None, detail)] for hookd."""
    idx = index(points)
    hookd = [p for p in points if p["target"] == "hookd" and p.get("rps") is not None]
    out = [_intake_target(hookd), _naive_target(hookd, idx), _peer_target(points, idx),
           _p99_target(hookd), _rss_target(hookd), _honesty_target(hookd)]
    return out


def _fmt(x, digits=2):
    return "—" if x is None else ("%.*f" % (digits, x))


def _intake_target(hookd):
    pts = [p for p in hookd if p["workload"] in FRAMINGS and p["conns"] in (16, 64)]
    met = bool(pts) and all(p["ratio"] is not None and p["ratio"] >= 0.8 for p in pts)
    detail = ", ".join("%s c=%d: %s×" % (p["workload"], p["conns"], _fmt(p["ratio"])) for p in pts)
    return ("durable intake ≥ 0.8× ceiling req/s at 16 and 64 connections, both framings",
            met if pts else None, detail)


def _naive_target(hookd, idx):
    parts, met = [], True
    for p in hookd:
        n = idx.get(("naive-durable", p["workload"], p["conns"]))
        if n and n.get("rps"):
            x = p["rps"] / n["rps"]
            met = met and (p["conns"] == 1 or x >= 2.0)
            parts.append("%s c=%d: %s×" % (p["workload"], p["conns"], _fmt(x)))
    return ("well over 2× naive-durable (at 16 and 64 connections)", met if parts else None,
            ", ".join(parts))


def _peer_target(points, idx):
    parts, met = [], True
    for p in points:
        if p["role"] != "peer" or p.get("rps") is None:
            continue
        h = idx.get(("hookd", p["workload"], p["conns"]))
        if not h or h.get("rps") is None:
            continue
        x = h["rps"] / p["rps"]
        met = met and x > 1.0
        parts.append("%s %s c=%d: hookd %s×" % (p["target"], p["workload"], p["conns"], _fmt(x)))
    return ("ahead of every peer that verifies and stores or runs something", met if parts else None,
            "; ".join(parts))


def _p99_target(hookd):
    pts = [p for p in hookd if p.get("p99_ratio") is not None]
    met = bool(pts) and all(p["p99_ratio"] <= 1.5 for p in pts)
    detail = ", ".join("%s c=%d: %s×" % (p["workload"], p["conns"], _fmt(p["p99_ratio"])) for p in pts)
    return ("p99 ≤ 1.5× the ceiling's p99 at the same point", met if pts else None, detail)


def _rss_target(hookd):
    peak = max((p["rss_kb"] for p in hookd if p.get("rss_kb")), default=None)
    return ("peak RSS ≤ 40 MB", None if peak is None else peak <= 40 * 1024,
            "hookd peak VmHWM %s MB" % _fmt(peak and peak / 1024.0, 1))


def _honesty_target(hookd):
    flagged = ["%s c=%d: %s" % (p["workload"], p["conns"], "; ".join(p["flags"])) for p in hookd if p["flags"]]
    return ("no errors; stored events = 2xx answers (database and events --json)",
            None if not hookd else not flagged, "; ".join(flagged) or "all hookd points clean")


def machine():
    """A dict describing the machine and tool versions."""
    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "mem_total": _meminfo()}
    import sqlite3
    info["sqlite"] = sqlite3.sqlite_version
    info["wrk"] = _first_line(["wrk", "-v"])
    info["webhook"] = _first_line(["webhook", "-version"])
    info["loadavg"] = open("/proc/loadavg").read().split()[:3]
    return info


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo():
    try:
        return open("/proc/meminfo").readline().split(":", 1)[1].strip()
    except OSError:
        return "unknown"


def _first_line(argv):
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10).stdout
        return out.decode("utf-8", "replace").strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "not installed"


def markdown(doc):
    """The results file's text."""
    lines = ["# hookd benchmark — %s" % doc["started"], ""]
    lines += _machine_md(doc)
    lines += ["## Targets (hookd)", "", "| target | met | measured |", "|---|---|---|"]
    for text, met, detail in doc["verdicts"]:
        lines.append("| %s | %s | %s |" % (text, {True: "yes", False: "**no**", None: "n/a"}[met], detail))
    lines.append("")
    for w in WORKLOADS:
        lines += _workload_md(doc, w)
    lines += _processing_md(doc)
    lines += profile_md(doc.get("profile"))
    lines += _ixon_md(doc.get("ixon"))
    lines += _targets_md()
    return "\n".join(lines) + "\n"


def _machine_md(doc):
    m, s = doc["machine"], doc["settings"]
    return ["## Machine and settings", "",
            "- CPU: %s, %s cores; memory %s; %s" % (m["cpu_model"], m["cpus"], m["mem_total"], m["platform"]),
            "- Python %s, sqlite %s, %s, %s; peers: %s" % (m["python"], m["sqlite"], m["wrk"], m["webhook"],
                                                          doc.get("peer_versions", "n/a")),
            "- hookd measured at commit: %s" % doc.get("hookd_commit", "unknown"),
            "- load average at start %s, at end %s (the machine is shared: read ratios, not absolute numbers)"
            % (" ".join(m["loadavg"]), " ".join(doc.get("loadavg_end", []))),
            "- %d s per run, %d runs per point (median reported), connections %s; wrk -t1; server pinned to"
            " CPU 0, wrk to CPU 1 (%s); total %.0f s" % (s["seconds"], s["runs"], s["conns"],
                                                      s["pinning"], doc.get("elapsed_s", 0)),
            ""]


def _workload_md(doc, w):
    pts = [p for p in doc["points"] if p["workload"] == w.name]
    if not pts:
        return []
    out = ["## Intake: %s" % w.title, "",
           "| target | conns | req/s | × ceiling | p50 ms | p99 ms | p99 × ceiling | server CPU % | peak RSS MB"
           " | non-2xx | socket errors | notes |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in pts:
        out.append("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            p["target"], p["conns"], _fmt(p.get("rps"), 0), _fmt(p.get("ratio")),
            _fmt(p.get("p50_us") and p["p50_us"] / 1000.0), _fmt(p.get("p99_us") and p["p99_us"] / 1000.0),
            _fmt(p.get("p99_ratio")), _fmt(p.get("cpu_share") and p["cpu_share"] * 100, 0),
            _fmt(p.get("rss_kb") and p["rss_kb"] / 1024.0, 1),
            p.get("non2xx", "—"), p.get("socket_errors", "—"), _notes(p)))
    return out + [""]


def _notes(p):
    notes = list(p["flags"])
    if p.get("close_delimited"):
        notes.append("%d wrk read errors not counted: each is a response ended by closing the connection"
                     % p["close_delimited"])
    runs = ", ".join("%.0f" % r["rps"] for r in p["runs"])
    if runs:
        notes.append("runs: " + runs)
    stored = [r for r in p["runs"] if "stored" in r]
    if stored:
        notes.append("stored/2xx: " + ", ".join("%s/%d" % (r["stored"], r["ok_2xx"]) for r in stored))
    backlog = [r for r in p["runs"] if "backlog_after_drain" in r]
    if backlog:
        notes.append("queue left after the %.0f s drain wait: " % backlog[0].get("drain_limit", 3)
                     + ", ".join(str(r["backlog_after_drain"]) for r in backlog))
    return "; ".join(notes)


def _processing_md(doc):
    out = ["## Processing throughput (hookd workers, Standard Webhooks intake at 64 connections)", "",
           "| action | intake req/s | finished ev/s during intake | finished ev/s after intake | oldest queued at end of intake (s) | drain window (s) | left after it | peak RSS MB | notes |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in doc.get("processing", []):
        if "intake_rps" not in r:
            out.append("| %s | — | — | — | — | — | — | — | %s |" % (r["action"], "; ".join(r["flags"])))
            continue
        drain = "kept up" if r["drain_eps"] is None else "%.0f" % r["drain_eps"]
        out.append("| %s | %.0f | %.0f | %s | %s | %.1f | %s | %s | %s |" % (
            r["action"], r["intake_rps"], r["during_eps"], drain, _fmt(r["oldest_end_of_intake_s"], 1),
            r["drain_window_s"], r["left"], _fmt(r["rss_kb"] / 1024.0, 1), "; ".join(r["flags"])))
    return out + [""]


def _ixon_md(ixon):
    if not ixon:
        return []
    return ["## IXON (bench/ixon_bench.py, exit %s)" % ixon["exit"], "", "```", ixon["output"].rstrip(),
            "```", ""]


def _targets_md():
    out = ["## What each target is", ""]
    for t in TARGETS:
        out.append("- **%s** (%s): %s; workloads: %s" % (t.name, t.role, t.title, ", ".join(t.workloads)))
    return out + [""]


def write(doc, results_dir, stem):
    """Write ``stem``.md and ``stem``.json under ``results_dir``; returns both paths."""
    os.makedirs(results_dir, exist_ok=True)
    md, js = os.path.join(results_dir, stem + ".md"), os.path.join(results_dir, stem + ".json")
    with open(js, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    with open(md, "w") as f:
        f.write(markdown(doc))
    return md, js


def profile_md(prof):
    """Lines for the profile section (empty when no profile was taken)."""
    if not prof:
        return []
    out = ["## Profile of hookd's request path (py-spy, Preservica CL intake at 64 connections)", ""]
    if "error" in prof:
        return out + ["Not taken: %s" % prof["error"], ""]
    out += ["%d samples of the thread holding the GIL (py-spy --gil); shares of all samples. hookd served"
            " %.0f req/s and used %.0f%% of its core meanwhile." % (prof["samples"], prof.get("rps", 0),
                                                                   prof.get("cpu_share", 0) * 100), "",
            "| self | function | | inclusive | function |", "|---|---|---|---|---|"]
    for (s, f), (i, g) in zip(prof["self"], prof["inclusive"]):
        out.append("| %.1f%% | `%s` | | %.1f%% | `%s` |" % (s * 100, f, i * 100, g))
    return out + [""]
