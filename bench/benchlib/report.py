"""The results: the targets verdict, the machine description, and the Markdown and JSON files.

Strategy: everything is computed from the list of points and processing results; ratios are always to
the ceiling measured in the same run at the same workload and connection count (absolute numbers drift
on a shared machine, ratios much less). ``verdicts`` applies the issue's targets to hookd's points;
``markdown`` renders one table per workload; ``write`` stores both files under bench/results/.
``guards`` reads from the runs' records what stood beside each run (the other servers' CPU, servers
that had not gone quiet, hookd's backlog), so a disturbed point says so in its notes.
"""

import collections
import json
import os
import platform
import subprocess
import sys

from . import measure
from .targets import TARGETS, WORKLOADS

OTHERS_SHARE = 0.02  # flagged above this: the other (idle) servers' CPU beside a run, a share of a core
STEAL_SHARE = 0.02  # flagged above this: the CPUs' time the host took during a run (steal)
# Noted above this: a point's fastest run over its slowest (req/s; a run at 0 req/s makes it infinite).
# In the readable full runs (the thirteenth and fourteenth) the ceiling's runs at a point spread
# 1.03-1.23x; in the fifteenth, with up to 43 % steal, 1.16-6.0x; in the sixteenth, whose host ran one
# loop at two speeds about 1.8x apart with no steal, 1.17-1.72x (docs/performance.md, "The host's two
# speeds, sixteenth round").
SPREAD = 1.25

FRAMINGS = ("preservica-cl", "preservica-chunked")


def _key(p):
    return (p["target"], p["workload"], p["conns"])


def index(points):
    return {_key(p): p for p in points}


def add_ratios(points):
    """Set ``ratio`` (req/s) and ``p99_ratio`` against the ceiling at the same workload and conns."""
    idx = index(points)
    for p in points:
        c = idx.get(("ceiling", p["workload"], p["conns"]))
        ok = c and c.get("rps") and p.get("rps") is not None
        p["ratio"] = p["rps"] / c["rps"] if ok else None
        p["p99_ratio"] = p["p99_us"] / c["p99_us"] if ok and c["p99_us"] else None


def guards(points):
    """{(target, workload, conns): [texts]}: each run's neighbours, walking every workload's runs in the
    order they were taken (measure.run_order over the points' targets and connection counts, as listed).
    Flagged: the other servers using more than OTHERS_SHARE of a core during a run; servers not quiet
    before a workload's first run; and every run from the one after a hookd drain that left a backlog
    up to the next hookd drain that read 0 (the workers still ran beside them)."""
    notes = collections.defaultdict(list)
    for workload in dict.fromkeys(p["workload"] for p in points):
        by = {(p["target"], p["conns"]): p for p in points if p["workload"] == workload}
        names = list(dict.fromkeys(name for name, _ in by))
        conns = list(dict.fromkeys(c for _, c in by))
        backlog = None
        for c, r, name in measure.run_order(names, conns, max(len(p["runs"]) for p in by.values())):
            runs = by[(name, c)]["runs"] if (name, c) in by else []
            if r >= len(runs):
                continue
            run, out = runs[r], notes[(name, workload, c)]
            settle = run.get("settle")
            if settle and not settle["quiet"]:
                loud = ["%s %.1f %% of a core" % (n, share * 100) for n, share in settle["shares"].items()
                        if share >= measure.QUIET_SHARE]
                out.append("run %d: servers not quiet after %.0f s of waiting (%s)"
                           % (r + 1, settle["waited_s"], ", ".join(loud)))
            if (run.get("others_cpu_share") or 0) > OTHERS_SHARE:
                out.append("run %d: the other servers used %.1f %% of a core meanwhile"
                           % (r + 1, run["others_cpu_share"] * 100))
            if backlog:
                out.append("run %d: started beside hookd's backlog of %s events" % (r + 1, backlog))
            if run.get("backlog_after_drain") is not None:
                backlog = run["backlog_after_drain"]
    return notes


def spread(p):
    """A point's fastest run over its slowest (req/s); None with fewer than two runs."""
    rates = [r["rps"] for r in p["runs"] if r.get("rps") is not None]
    if len(rates) < 2 or not max(rates):
        return None
    return max(rates) / min(rates) if min(rates) else float("inf")


def _times(x):
    return "%.2f×" % x if x != float("inf") else "from 0 req/s up"


def _caveats(idx, p):
    """Said beside a ratio of ``p`` to the ceiling when the runs of either spread over SPREAD: then the
    medians divided are not readings of one steady machine (a bare server's runs spread that far only
    when the host's speed changed between them; hookd's may also have a cause of its own); and when the
    time budget cut either short, the median of fewer runs. "" when neither."""
    parts = []
    for name, q in (("the ceiling", idx.get(("ceiling", p["workload"], p["conns"]))), ("hookd", p)):
        x = q and spread(q)
        if x and x > SPREAD:
            parts.append("%s's runs spread %s" % (name, _times(x)))
        if q and q.get("cut"):
            parts.append("%s's %s" % (name, q["cut"]))
    return ", ".join(parts)


def _ratio_detail(idx, p):
    caveats = _caveats(idx, p)
    return "%s c=%d: %s× (%s µs/req%s)" % (p["workload"], p["conns"], _fmt(p["ratio"]), _fmt(cpu_us(p), 0),
                                           "; " + caveats if caveats else "")


def _p99_detail(idx, p):
    caveats = _caveats(idx, p)
    return "%s c=%d: %s×%s" % (p["workload"], p["conns"], _fmt(p["p99_ratio"]),
                               " (%s)" % caveats if caveats else "")


def cpu_us(p):
    """CPU microseconds the server spent per request at a point (its CPU share over its req/s)."""
    if not p.get("rps") or p.get("cpu_share") is None:
        return None
    return p["cpu_share"] / p["rps"] * 1e6


STANDARD = ("standard", "standard-chunked")
TARGET_RATIO = {"standard": 1.0, "standard-chunked": 1.0, "preservica-cl": 0.6, "preservica-chunked": 0.6}


def verdicts(doc):
    """[(target text, met: True/False/None, detail)] for hookd: issue 14's targets."""
    points = doc["points"]
    idx = index(points)
    hookd = [p for p in points if p["target"] == "hookd" and p.get("rps") is not None]
    return [_ratio_target(hookd, idx, STANDARD, 1.0, "Standard Webhooks"),
            _ratio_target(hookd, idx, FRAMINGS, 0.6, "Preservica (4 events per delivery)"),
            _naive_target(hookd, idx), _p99_target(hookd, idx), _rss_target(doc, hookd),
            _slow_disk_target(doc.get("slow_disk")), _workers_target(doc.get("processing")),
            _peer_target(points, idx), _honesty_target(doc, hookd)]


def _fmt(x, digits=2):
    return "—" if x is None else ("%.*f" % (digits, x))


def _ratio_target(hookd, idx, workloads, bound, what):
    pts = [p for p in hookd if p["workload"] in workloads and p["conns"] in (16, 64)]
    met = bool(pts) and all(p["ratio"] is not None and p["ratio"] >= bound for p in pts)
    detail = ", ".join(_ratio_detail(idx, p) for p in pts)
    return ("%s ≥ %.1f× the ceiling at 16 and 64 connections, both framings" % (what, bound),
            met if pts else None, detail)


def _naive_target(hookd, idx):
    parts, met = [], True
    for p in hookd:
        n = idx.get(("naive-durable", p["workload"], p["conns"]))
        if p["conns"] == 1 and n and n.get("rps"):
            x = p["rps"] / n["rps"]
            met = met and x >= 0.9
            parts.append("%s: %s×" % (p["workload"], _fmt(x)))
    return ("1 connection: ≥ 0.9× naive-durable (one fsync per request is the limit there)",
            met if parts else None, ", ".join(parts))


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


def _p99_target(hookd, idx):
    pts = [p for p in hookd if p.get("p99_ratio") is not None and p["conns"] in (16, 64)]
    met = bool(pts) and all(p["p99_ratio"] <= 1.0 for p in pts)
    detail = ", ".join(_p99_detail(idx, p) for p in pts)
    return ("p99 ≤ the ceiling's p99 at 16 and 64 connections", met if pts else None, detail)


def _rss_target(doc, hookd):
    peaks = [p["rss_kb"] for p in hookd if p.get("rss_kb")]
    peaks += [r["rss_kb"] for r in doc.get("processing") or [] if r.get("rss_kb")]
    peaks += [p["rss_kb"] for p in (doc.get("slow_disk") or {}).get("points", [])
              if p["target"] == "hookd" and p.get("rss_kb")]
    peak = max(peaks, default=None)
    return ("peak RSS ≤ 40 MB over the whole run", None if peak is None else peak <= 40 * 1024,
            "hookd peak VmHWM %s MB" % _fmt(peak and peak / 1024.0, 1))


def _slow_disk_target(slow):
    if not slow or "error" in slow:
        return ("slow disk (2 ms fsync): hookd ≥ 10× naive-durable at 64 connections", None,
                (slow or {}).get("error", "not run"))
    pts = [p for p in slow["points"] if p["target"] == "hookd" and p.get("x_naive") is not None]
    at64 = [p for p in pts if p["conns"] == 64]
    detail = ", ".join("c=%d: %s×%s" % (p["conns"], _fmt(p["x_naive"], 1),
                                         " (%s)" % p["cut"] if p.get("cut") else "") for p in pts)
    return ("slow disk (2 ms fsync): hookd ≥ 10× naive-durable at 64 connections",
            (at64[0]["x_naive"] >= 10) if at64 else None, detail)


def _workers_target(processing):
    done = [r for r in processing or [] if r.get("intake_rps")]
    met = bool(done) and all(r["during_eps"] >= 0.3 * r["intake_rps"] for r in done)
    detail = ", ".join("%s: %.0f of %.0f req/s (%.0f%%)" % (r["action"], r["during_eps"], r["intake_rps"],
                                                          100.0 * r["during_eps"] / r["intake_rps"]) for r in done)
    return ("workers finish ≥ 30% of the intake rate during saturated intake (command and forward)",
            met if done else None, detail or "not run")


def _honesty_target(doc, hookd):
    slow = (doc.get("slow_disk") or {}).get("points", [])
    seen, seen_slow = guards(doc["points"]), guards(slow)
    noted = [(p, p["flags"] + seen[_key(p)]) for p in hookd]
    noted += [(p, p["flags"] + seen_slow[_key(p)]) for p in slow if p["target"] == "hookd"]
    flagged = ["%s c=%d: %s" % (p["workload"], p["conns"], "; ".join(texts)) for p, texts in noted if texts]
    return ("every request distinct; no errors; stored events = 2xx answers (database and events --json)",
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
    seen = guards(doc["points"])
    for w in WORKLOADS:
        lines += _workload_md(doc, w, seen)
    lines += _summary_md(doc)
    lines += _processing_md(doc)
    lines += _slow_disk_md(doc.get("slow_disk"))
    lines += _busy_job_md(doc.get("busy_job"))
    lines += _stages_md(doc.get("stages"))
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
            "- order of runs: %s" % s["order"],
            "- server CPU read: %s" % s.get("cpu", "over wrk's whole process, its pool's reading included"),
            ""]


def _workload_md(doc, w, seen):
    pts = [p for p in doc["points"] if p["workload"] == w.name]
    if not pts:
        return []
    out = ["## Intake: %s" % w.title, "",
           "| target | conns | req/s | × ceiling | CPU µs/req | p50 ms | p99 ms | p99 × ceiling | server CPU %"
           " | peak RSS MB | non-2xx | socket errors | notes |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in pts:
        out.append("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            p["target"], p["conns"], _fmt(p.get("rps"), 0), _fmt(p.get("ratio")), _fmt(cpu_us(p), 0),
            _fmt(p.get("p50_us") and p["p50_us"] / 1000.0), _fmt(p.get("p99_us") and p["p99_us"] / 1000.0),
            _fmt(p.get("p99_ratio")), _fmt(p.get("cpu_share") and p["cpu_share"] * 100, 0),
            _fmt(p.get("rss_kb") and p["rss_kb"] / 1024.0, 1),
            p.get("non2xx", "—"), p.get("socket_errors", "—"), _notes(p, seen)))
    return out + [""]


def _notes(p, seen):
    """A point's notes: its flags, the time budget's cut, then what ``guards`` (``seen``) found beside its
    runs, then its runs."""
    notes = p["flags"] + ([p["cut"]] if p.get("cut") else []) + seen[_key(p)]
    if p.get("close_delimited"):
        notes.append("%d wrk read errors not counted: each is a response ended by closing the connection"
                     % p["close_delimited"])
    stolen = ["run %d: %.1f %%" % (i + 1, r["steal_share"] * 100) for i, r in enumerate(p["runs"])
              if (r.get("steal_share") or 0) > STEAL_SHARE]
    if stolen:  # the host's doing, not the bench's: noted, and no guard of the honesty target
        notes.append("the host took the CPUs' time (steal) in " + ", ".join(stolen))
    again = ["run %d (%s)" % (i + 1, ", ".join("%.0f req/s at %.0f %% steal" % (x["rps"], x["steal_share"] * 100)
                                               for x in r["retaken"]))
             for i, r in enumerate(p["runs"]) if r.get("retaken")]
    if again:
        notes.append("taken again after the host took over %.0f %% of the CPUs' time: %s"
                     % (measure.RETAKE_STEAL * 100, ", ".join(again)))
    x = spread(p)
    if x and x > SPREAD:
        notes.append("its runs spread %s (fastest over slowest)" % _times(x))
    runs = ", ".join("%.0f" % r["rps"] for r in p["runs"])
    if runs:
        notes.append("runs: " + runs)
    stored = [r for r in p["runs"] if "stored" in r]
    if stored:
        notes.append("stored/2xx: " + ", ".join("%s/%d" % (r["stored"], r["ok_2xx"]) for r in stored))
    if p["role"] == "hookd" and p["runs"]:
        notes.append("p99 ms: " + ", ".join("%.1f" % (r["p99_us"] / 1000.0) for r in p["runs"]))
        disk = [r for r in p["runs"] if r.get("dirty_kb") is not None]
        if disk:
            notes.append("dirty MB at start: " + ", ".join("%.0f" % (r["dirty_kb"] / 1024.0) for r in disk))
            notes.append("disk flush ms (average): " + ", ".join(_fmt(r.get("disk_flush_ms_avg"), 3)
                                                                 for r in disk))
    backlog = [r for r in p["runs"] if "backlog_after_drain" in r]
    if backlog:
        notes.append("queue left after the %.0f s drain wait: " % backlog[0].get("drain_limit", 3)
                     + ", ".join(str(r["backlog_after_drain"]) for r in backlog))
    return "; ".join(notes)


def _summary_md(doc):
    """Issue 14's table: hookd's req/s as a ratio of the ceiling, and its CPU per request."""
    idx = index(doc["points"])
    conns = doc["settings"]["conns"]
    rows = [("ceiling", "bare ThreadingHTTPServer (ceiling)"), ("naive-durable", "naive durable (one commit per request)"),
            ("hookd", "hookd")]
    out = ["## Summary: req/s as a ratio of the ceiling (CPU µs/request in brackets)", "",
           "| target | workload | " + " | ".join("%d conn%s" % (c, "" if c == 1 else "s") for c in conns) + " |",
           "|---|---|" + "---|" * len(conns)]
    for w in WORKLOADS:
        for name, title in rows:
            cells = []
            for c in conns:
                p = idx.get((name, w.name, c))
                cells.append("—" if not p or p.get("ratio") is None else "%s (%s)" % (
                    _fmt(p["ratio"]), _fmt(cpu_us(p), 0)))
            if any(cell != "—" for cell in cells):
                out.append("| %s | %s | %s |" % (title, w.name, " | ".join(cells)))
    return out + [""]


def _slow_disk_md(slow):
    if not slow:
        return []
    out = ["## Slow disk: every fsync/fdatasync 2 ms slower (bench/slowfsync.c), Standard Webhooks", ""]
    if "error" in slow:
        return out + ["Not run: %s" % slow["error"], ""]
    out += ["| target | conns | req/s | × naive-durable | CPU µs/req | p99 ms | non-2xx | socket errors | notes |",
            "|---|---|---|---|---|---|---|---|---|"]
    seen = guards(slow["points"])
    for p in slow["points"]:
        out.append("| %s | %d | %s | %s | %s | %s | %s | %s | %s |" % (
            p["target"], p["conns"], _fmt(p.get("rps"), 0), _fmt(p.get("x_naive"), 1), _fmt(cpu_us(p), 0),
            _fmt(p.get("p99_us") and p["p99_us"] / 1000.0), p.get("non2xx", "—"), p.get("socket_errors", "—"),
            _notes(p, seen)))
    return out + [""]


def _busy_job_md(busy):
    if not busy:
        return []
    out = ["## Intake beside a busy job of hookd's (Standard Webhooks, %d connections; the job on hookd's core)"
           % busy.get("conns", 16), ""]
    if "error" in busy:
        return out + ["Not run: %s" % busy["error"], ""]
    out += ["| busy jobs | their policy | unloaded req/s | beside them req/s | share | p99 ms unloaded | p99 ms beside"
            " them | hookd CPU % unloaded / beside | non-2xx + socket errors |", "|---|---|---|---|---|---|---|---|---|",
            "| %d × `%s` | %s | %.0f | %.0f | %.0f%% | %.1f | %.1f | %.0f / %.0f | %d |" % (
                busy["jobs"], busy["command"], "/".join(busy["policy"]), busy["unloaded_rps"], busy["busy_rps"],
                100 * busy["share"], busy["unloaded_p99_us"] / 1000.0, busy["busy_p99_us"] / 1000.0,
                100 * busy["unloaded_cpu_share"], 100 * busy["busy_cpu_share"], busy["errors"]), ""]
    return out


def _processing_md(doc):
    out = ["## Processing throughput (hookd workers, Standard Webhooks intake at 64 connections)", "",
           "| action | intake req/s | finished ev/s during intake | share of intake | finished ev/s after intake | oldest queued at end of intake (s) | drain window (s) | left after it | peak RSS MB | notes |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc.get("processing", []):
        if "intake_rps" not in r:
            out.append("| %s | — | — | — | — | — | — | — | — | %s |" % (r["action"], "; ".join(r["flags"])))
            continue
        drain = "kept up" if r["drain_eps"] is None else "%.0f" % r["drain_eps"]
        out.append("| %s | %.0f | %.0f | %.0f%% | %s | %s | %.1f | %s | %s | %s |" % (
            r["action"], r["intake_rps"], r["during_eps"], 100.0 * r["during_eps"] / max(r["intake_rps"], 1e-9),
            drain, _fmt(r["oldest_end_of_intake_s"], 1),
            r["drain_window_s"], r["left"], _fmt(r["rss_kb"] / 1024.0, 1),
            "; ".join(([r["config"]] if "config" in r else []) + r["flags"])))
    return out + [""]


STAGES = (("reader", "framing.Reader: request line, headers, body"),
          ("route_and_request", "route lookup, Request"),
          ("accept", "integration.accept: signature, JSON parse, (Preservica) per-element keys"),
          ("event_rows", "App.event_rows: stored headers, rows"),
          ("submit_and_wait", "store.submit_events + wait, request thread's part"),
          ("writer_thread", "writer thread: dedupe look-up, executemany, COMMIT (fsync), in groups of 32"),
          ("answer_log_metric", "outcome: log line, metric, 202 bytes"))


def _stages_md(stages):
    if not stages:
        return []
    passes = stages.get("passes", 1)  # results files before ece7481 have one pass and no "passes"
    out = ["## Where hookd's CPU per request goes (bench/benchlib/stages.py: each stage of the request path,"
           " real code, no sockets, thread CPU clock%s)" % (", the fastest of %d passes" % passes if passes > 1 else ""),
           ""]
    if "error" in stages:
        return out + [stages["error"], ""]
    schemes = [s for s in stages if s != "passes"]
    out += ["| stage | " + " | ".join("%s µs/req" % s for s in schemes) + " |", "|---|" + "---|" * len(schemes)]
    for key, title in STAGES:
        out.append("| %s | %s |" % (title, " | ".join(_fmt(stages[s].get(key), 1) for s in schemes)))
    out.append("| **sum** | %s |" % " | ".join(_fmt(sum(v for v in stages[s].values()), 1) for s in schemes))
    below = (" Each stage is its fastest pass, so the sum is below what any one pass took, and the difference"
             " is at most their cost.") if passes > 1 else ""
    return out + ["", "Not in these figures: socket reads and writes, thread switches and waiting for the GIL,"
                  " the Reaper's deadline; the intake tables' CPU µs/req minus this sum is their cost.%s" % below, ""]


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
