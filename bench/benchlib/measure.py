"""The intake measurement: for each workload, every target at 1/16/64 connections, 3 runs, interleaved.

Strategy: a ratio divides a target's median by the ceiling's at the same workload and connection count,
so the runs it comes from are taken in the same minutes. Within one workload and one connection count the
targets' runs alternate (``run_order``): run 1 of every target in turn (ceiling, naive-durable, hookd,
the peers), then run 2 of every target, and so on. Each target keeps one server process for the whole
workload: all are started before its first run and stopped after its last, and the first run waits until
every one of them has gone quiet after its start (``wait_quiet``: below QUIET_SHARE of a core, at most
QUIET_MOST seconds; a server that does not settle is recorded on that run). The ceiling's
first run at a connection count (20,000 req/s at least, if the host slowed it) sizes the other targets'
pools there (each run gets a fresh pool of distinct requests, 1.6x the rate it is expected to reach, and
the Lua script reports any wrap-around).
The server's CPU use during each run is recorded as a share of one core: a target near 100% is
CPU-bound, one far below it is waiting on something. A ``CpuMeter`` reads it over wrk's run alone (from
wrk's ready marker, after its pool is read, to its exit; see wrkrun.py), and another the other servers'
CPU share over the same seconds (``others_cpu_share``: idle servers should cost next to nothing; the
report flags a run where they did not). A ``DiskMeter`` reads, over the same seconds, what the disk under
the work directory did (writes, flushes and their average time, from /proc/diskstats) and, at the run's
start, how much the kernel still had to write back (Dirty and Writeback in /proc/meminfo): a server that
fdatasyncs waits behind whatever else is being written, and a target's runs follow other targets' writes.
A ``StealMeter`` reads the share of the CPUs' time the virtual machine's host took meanwhile (steal):
a run where it passed RETAKE_STEAL is taken again (``retake``), and the report notes every kept run
above report.STEAL_SHARE.
Its peak RSS is read after every run. For hookd and
every target that stores, each run is checked: stored events (read-only from its database) must equal
the 2xx answers, give or take the requests still in flight when wrk stopped. After each of hookd's runs
its workers get up to DRAIN_LIMIT seconds to drain before the next run of any target starts (what is
left is reported as backlog, not hidden: the report flags every run that starts before a drain of
hookd's reads 0 again); after the
workload the CLI's ``events --json`` count must equal the database count. Points with errors are
flagged, never hidden; a point the time budget cut short says so (``cut``), and its runs are judged as
any others are (a point with no run at all is flagged).
"""

import contextlib
import os
import shutil
import statistics
import time

from . import hookdctl, pool, procs, wrkrun
from .targets import TARGETS, WORKLOADS

DRAIN_LIMIT = 3.0  # seconds the workers get to empty hookd's queue after each run (the backlog is reported)
# Before a workload's first run every started server must use less than QUIET_SHARE of a core over a
# QUIET_WINDOW: a peer's boot (gunicorn's took 6-7 % of a core for seconds) would otherwise run beside
# the ceiling's first run. At most QUIET_MOST seconds, then the run goes on and the record says so.
QUIET_SHARE = 0.02
QUIET_WINDOW = 2.0  # one clock tick (10 ms) is 0.5 % of a core over it: 0.5 s could not tell 2 % from 0
QUIET_MOST = 10.0
# A run during which the host took more than RETAKE_STEAL of the CPUs' time (steal: a busy neighbour on
# the host, which on this VM took up to 43 % in some runs and cut any target's rate to an eighth) is taken
# again at once, at most RETAKES times, and the take with the least steal is kept; the report lists every
# take replaced, and what it read; a replaced take is checked as a kept run is (``_summarise``).
RETAKE_STEAL = 0.05
RETAKES = 2
ORDER = ("interleaved: per workload and connection count, run 1 of every target in turn (ceiling first),"
         " then run 2, ...; one server per target for the whole workload")
CPU_WINDOW = ("a server's CPU over wrk's run alone, from its ready line (the request pool read) to its exit;"
              " a workload's first run after every server used < %.0f %% of a core for %.1f s (at most %.0f s)"
              % (QUIET_SHARE * 100, QUIET_WINDOW, QUIET_MOST))


class CpuMeter:
    """The CPU that ``servers`` (procs.Server, each summed over its process group, so a master's workers
    count) use between ``start()`` and ``stop()``: ``share`` of one core over ``seconds``, from
    monotonic ``started`` to ``stopped``."""

    def __init__(self, servers):
        self.servers = list(servers)
        self.started = self.stopped = self.seconds = self.share = None
        self._cpu0 = None

    def _cpu(self):
        return sum(s.cpu_seconds() for s in self.servers)

    def start(self):
        self._cpu0, self.started = self._cpu(), time.monotonic()

    def stop(self):
        cpu, self.stopped = self._cpu(), time.monotonic()
        self.seconds = self.stopped - self.started
        self.share = (cpu - self._cpu0) / self.seconds


class DiskMeter:
    """What the disk holding ``path`` (the whole disk, for a partition) did between ``start()`` and
    ``stop()``, and the dirty memory at ``start()``: ``record()`` is {"dirty_kb", "writeback_kb",
    "disk_writes", "disk_mb_written", "disk_write_ms_avg", "disk_flushes", "disk_flush_ms_avg"} (the
    device's figures None where it is not in /proc/diskstats, as on tmpfs)."""

    def __init__(self, path):
        st = os.stat(path)
        self.device = _whole_disk((os.major(st.st_dev), os.minor(st.st_dev)))
        self.dirty = self._before = self._after = None

    def _stats(self):
        """The device's counters after its name (reads, ..., writes, writes merged, sectors written, ms
        writing, ..., flushes, ms flushing), or None."""
        try:
            with open("/proc/diskstats") as f:
                for line in f:
                    fields = line.split()
                    if (int(fields[0]), int(fields[1])) == self.device:
                        return [int(x) for x in fields[3:]]
        except OSError:
            pass
        return None

    def start(self):
        self.dirty = _meminfo_kb("Dirty", "Writeback")
        self._before = self._stats()

    def stop(self):
        self._after = self._stats()

    def record(self):
        out = {"dirty_kb": self.dirty.get("Dirty"), "writeback_kb": self.dirty.get("Writeback")}
        b, a = self._before, self._after
        if not b or not a:
            return dict(out, disk_writes=None, disk_mb_written=None, disk_write_ms_avg=None,
                        disk_flushes=None, disk_flush_ms_avg=None)
        writes, flushes = a[4] - b[4], (a[15] - b[15] if len(a) > 16 else None)
        return dict(out, disk_writes=writes, disk_mb_written=round((a[6] - b[6]) * 512 / 1e6, 1),
                    disk_write_ms_avg=round((a[7] - b[7]) / writes, 3) if writes else None,
                    disk_flushes=flushes,
                    disk_flush_ms_avg=round((a[16] - b[16]) / flushes, 3) if flushes else None)


class StealMeter:
    """The share of the machine's CPU time its host took (``steal`` in /proc/stat: time a virtual CPU was
    ready to run and did not) between ``start()`` and ``stop()``: ``share``, 0.0 where the kernel does not
    count it. A run beside a busy neighbour on the host is slowed in every target alike only by chance."""

    def __init__(self):
        self.share = None
        self._before = None

    @staticmethod
    def times(line):
        """(all CPU time, stolen time) from /proc/stat's first line: user, nice, system, idle, iowait, irq,
        softirq, steal (guest time is counted in user already)."""
        fields = [int(x) for x in line.split()[1:9]]
        return sum(fields), (fields[7] if len(fields) > 7 else 0)

    @staticmethod
    def _read():
        with open("/proc/stat") as f:
            return f.readline()

    def start(self):
        self._before = self.times(self._read())

    def stop(self):
        total, steal = self.times(self._read())
        elapsed = total - self._before[0]
        self.share = (steal - self._before[1]) / elapsed if elapsed > 0 else 0.0


def _whole_disk(device):
    """The disk a partition (major, minor) is on, or ``device`` itself: the kernel counts flushes on the
    whole disk only."""
    node = os.path.realpath("/sys/dev/block/%d:%d" % device)
    if not os.path.exists(os.path.join(node, "partition")):
        return device
    try:
        with open(os.path.join(os.path.dirname(node), "dev")) as f:
            major, minor = f.read().split(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return device


def _meminfo_kb(*names):
    """{name: kB} for ``names`` in /proc/meminfo."""
    found = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in names:
                found[name] = int(rest.split()[0])
    return found


def wait_quiet(servers, most=QUIET_MOST):
    """Until every server of ``servers`` ({name: procs.Server}) uses less than QUIET_SHARE of a core over
    one QUIET_WINDOW, at most ``most`` seconds. Returns {"quiet": bool, "waited_s", "shares": {name: share
    in the last window}}."""
    begun = time.monotonic()
    while True:
        meters = {name: CpuMeter([server]) for name, server in servers.items()}
        for meter in meters.values():
            meter.start()
        time.sleep(QUIET_WINDOW)  # the measuring window itself
        for meter in meters.values():
            meter.stop()
        shares = {name: round(m.share, 4) for name, m in meters.items()}
        quiet = all(share < QUIET_SHARE for share in shares.values())
        waited = time.monotonic() - begun
        if quiet or waited >= most:
            return {"quiet": quiet, "waited_s": round(waited, 2), "shares": shares}


class Plan:
    """What to run: durations, repeats, connection counts, filters, and a time budget."""

    def __init__(self, seconds, runs, conns, targets, workloads, workdir, budget):
        self.seconds, self.runs, self.conns = seconds, runs, conns
        self.targets, self.workloads, self.workdir = targets, workloads, workdir
        self.deadline = time.monotonic() + budget


def intake(plan, log):
    """All intake points, as a list of dicts (see ``workload_block``)."""
    points = []
    for workload in WORKLOADS:
        if workload.name not in plan.workloads:
            continue
        chosen = [t for t in TARGETS if t.name in plan.targets and workload.name in t.workloads]
        points += workload_block(plan, chosen, workload, log)
    return points


def run_order(targets, conns, runs):
    """The runs of one workload in the order they are taken, as (conns, run index, target): for each
    connection count, run 1 of every target in the order given, then run 2 of every target, ..."""
    return [(c, r, t) for c in conns for r in range(runs) for t in targets]


def workload_block(plan, targets, workload, log, env=None, tag=""):
    """Every connection count of ``targets`` (the ceiling first, if it is one of them) on one workload,
    their runs interleaved (``run_order``), one server process per target. ``env``: extra environment for
    the servers (the slow-disk shim); ``tag`` names the scratch directories. One point per target and
    connection count, targets in the order given."""
    workdirs = {t.name: _workdir(plan, t, workload, tag) for t in targets}
    if time.monotonic() > plan.deadline:
        return [_skipped(t, workload, c) for t in targets for c in plan.conns]
    points = {(t.name, c): _new_point(t, workload, c) for t in targets for c in plan.conns}
    with contextlib.ExitStack() as stack:
        servers = {t.name: stack.enter_context(_server(t, workdirs[t.name], env)) for t in targets}
        settle = wait_quiet(servers)
        if not settle["quiet"]:
            log("  servers not quiet after %.0f s: %s" % (settle["waited_s"], settle["shares"]))
        _interleave(plan, targets, workload, servers, workdirs, points, log, settle)
        for target in targets:
            if target.role == "hookd":
                _cli_check([points[(target.name, c)] for c in plan.conns], workdirs[target.name], log)
    return [points[(t.name, c)] for t in targets for c in plan.conns]


def _workdir(plan, target, workload, tag):
    workdir = os.path.join(plan.workdir, "%s-%s%s" % (target.name, workload.name, tag))
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    return workdir


def _server(target, workdir, env):
    port = procs.free_port()
    return procs.Server(target.name, target.argv(port, workdir), port, os.path.join(workdir, "server.log"),
                        env=dict(_env(), **(env or {})), cwd=workdir)


def _new_point(target, workload, conns):
    return {"target": target.name, "role": target.role, "workload": workload.name, "conns": conns,
            "runs": [], "flags": []}


def _interleave(plan, targets, workload, servers, workdirs, points, log, settle):
    """Take the runs in ``run_order``; stops a target's point when its server died, every point when the
    time budget runs out. The first run taken records ``settle`` (``wait_quiet``'s answer before it).
    Summarises every point."""
    base = {}  # conns -> the ceiling's first run's rate there, which sizes the other targets' pools
    stopped = set()
    for conns, r, target in run_order(targets, plan.conns, plan.runs):
        key = (target.name, conns)
        point = points[key]
        if key in stopped:
            continue
        if time.monotonic() > plan.deadline:  # noted, not flagged: the runs taken are judged as they are
            for name, c in points:
                taken = len(points[(name, c)]["runs"])
                if (name, c) not in stopped and taken < plan.runs:
                    points[(name, c)]["cut"] = "time budget ran out after %d runs" % taken
            break
        server = servers[target.name]
        if not server.alive():
            point["flags"].append("server died")
            stopped.add(key)
            continue
        shape = target.request_shape(workload)
        expect = _expect(target, base.get(conns, 20000.0), point["runs"])
        others = [s for name, s in servers.items() if name != target.name]
        takes = [_one_run(plan, target, workload, conns, server, others, workdirs[target.name], shape, expect)]
        while retake(takes[-1], takes[:-1]) and time.monotonic() < plan.deadline and server.alive():
            log("  %-14s %-18s c=%-3d run %d taken again: the host took %.0f %% of the CPUs' time (%.0f req/s)"
                % (target.name, workload.name, conns, r + 1, takes[-1]["steal_share"] * 100, takes[-1]["rps"]))
            takes.append(_one_run(plan, target, workload, conns, server, others, workdirs[target.name], shape,
                                  expect))
        run, replaced = keep(takes)
        if replaced:  # kept whole: their errors, wraps, stored counts and backlogs are checked as a run's
            run["retaken"] = replaced
        if settle is not None:
            run["settle"], settle = settle, None
        point["runs"].append(run)
        if target.role == "ceiling" and r == 0:
            # a run the host slowed would size every pool at this point too small (they wrap)
            base[conns] = run["rps"] if (run.get("steal_share") or 0) <= RETAKE_STEAL else max(run["rps"], 20000.0)
        log("  %-14s %-18s c=%-3d run %d: %8.0f req/s  p99 %7.1f ms  non2xx %d  sockerr %d%s"
            % (target.name, workload.name, conns, r + 1, run["rps"], run["p99_us"] / 1000.0,
               run["non2xx"], run["socket_errors"], _check_text(run)))
    for point in points.values():
        _summarise(point)


def retake(run, retaken):
    """Whether ``run`` is to be taken again: the host took more than RETAKE_STEAL of the CPUs' time during
    it, and it has been taken again fewer than RETAKES times (``retaken``: the runs it replaced)."""
    return (run.get("steal_share") or 0) > RETAKE_STEAL and len(retaken) < RETAKES


def keep(takes):
    """(the take of a run kept, [the takes it replaces]): the one during which the host took least."""
    kept = min(takes, key=lambda t: t.get("steal_share") or 0)
    return kept, [t for t in takes if t is not kept]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("HOOKD_CONFIG", "STATE_DIRECTORY", "LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET"):
        env.pop(name, None)
    return env


def _expect(target, base, runs):
    """The rate the next run may reach, to size its pool (a wrap is reported, never hidden); ``runs``:
    the target's runs so far at this point, ``base``: the ceiling's first run there (or 20000)."""
    if not runs:
        return max(base, 20000.0)  # a first run may beat the ceiling (a compiled peer does)
    fastest = max(r["rps"] for r in runs)
    if target.role == "ceiling":
        return max(base, 1.3 * fastest)
    return max(2.0 * fastest, 0.25 * base)


def _one_run(plan, target, workload, conns, server, others, workdir, shape, expect):
    scheme, route, header = shape
    count = int(expect * 1.6 * plan.seconds) + 500
    pool_path = os.path.join(workdir, "pool.txt")
    pool.build(pool_path, scheme, count)
    store = target.store_path(workdir)
    before = hookdctl.count_db(workdir, store) if target.stores else None
    own, idle, disk, host = CpuMeter([server]), CpuMeter(others), DiskMeter(workdir), StealMeter()
    run = wrkrun.run(workload.lua, "http://127.0.0.1:%d" % server.port, conns, plan.seconds,
                     pool_path, route, header, meters=(own, idle, disk, host))
    run.update(disk.record())
    run["steal_share"] = host.share
    run["cpu_share"], run["others_cpu_share"] = own.share, idle.share
    run["cpu_window_s"] = round(own.seconds, 3)
    run["pool"] = count
    if target.closes:
        _close_delimited(run)
    if target.stores:
        _stored_check(run, workdir, store, before, workload.events if target.per_event else 1)
    if target.role == "hookd":
        _hookd_check(run, server, workdir)
    run["rss_kb"] = server.peak_rss_kb()
    os.unlink(pool_path)
    return run


def _close_delimited(run):
    """wrk counts a read error for every response that ends by closing the connection (HTTP/1.0, no
    Content-Length) although the response was complete; those are not errors of the target."""
    artefacts = min(run["read"], run["responses"])
    run["close_delimited"] = artefacts
    run["socket_errors"] -= artefacts


def _stored_check(run, workdir, store, before, rows_per_request):
    time.sleep(0.3)  # requests in flight when wrk stopped finish and commit
    after = hookdctl.count_db(workdir, store)
    run["stored"] = None if after is None or before is None else after - before
    run["ok_2xx"] = run["responses"] - run["non2xx"]
    run["rows_per_request"] = rows_per_request


def _hookd_check(run, server, workdir):
    run["oldest_queued_s"] = _oldest(workdir)
    waited, left = hookdctl.wait_drained(workdir, DRAIN_LIMIT)
    run["drain_s"], run["backlog_after_drain"], run["drain_limit"] = round(waited, 2), left, DRAIN_LIMIT


def _oldest(workdir):
    snap = hookdctl.metrics(workdir)
    values = [v for _, v in snap.get("hookd_oldest_queued_seconds", [])]
    return max(values) if values else None


def _check_text(run):
    if "stored" not in run:
        return ""
    return "  stored %s / 2xx %d" % (run["stored"], run["ok_2xx"])


def _summarise(point):
    """The point's medians over its kept runs; its error counts and checks over every take, replaced ones
    too (``keep``)."""
    runs = point["runs"]
    if not runs:
        point.update(rps=None, p50_us=None, p99_us=None, rss_kb=None, cpu_share=None)
        point["flags"].append("no runs")
        return
    point["rps"] = statistics.median(r["rps"] for r in runs)
    point["p50_us"] = statistics.median(r["p50_us"] for r in runs)
    point["p99_us"] = statistics.median(r["p99_us"] for r in runs)
    point["rss_kb"] = max(r["rss_kb"] for r in runs)
    point["cpu_share"] = statistics.median(r["cpu_share"] for r in runs)
    takes = runs + [t for r in runs for t in r.get("retaken", ())]
    point["non2xx"] = sum(t["non2xx"] for t in takes)
    point["socket_errors"] = sum(t["socket_errors"] for t in takes)
    point["wraps"] = sum(t["wraps"] for t in takes)
    _flag(point)


def _flag(point):
    flags = point["flags"]
    if point["non2xx"]:
        flags.append("%d non-2xx answers" % point["non2xx"])
    if point["socket_errors"]:
        flags.append("%d socket errors" % point["socket_errors"])
    if any(r.get("close_delimited") for r in point["runs"]):
        point["close_delimited"] = sum(r.get("close_delimited", 0) for r in point["runs"])
    if point["wraps"]:
        flags.append("request pool wrapped (duplicates sent)")
    for i, run in enumerate(point["runs"]):
        for take in [run] + run.get("retaken", []):
            if "stored" in take:
                _flag_stored(flags, i, take, point["conns"])
        for take in run.get("retaken", ()):
            if take.get("backlog_after_drain"):  # the next take, or target, ran beside it
                flags.append("run %d: a take replaced left hookd's backlog of %s events"
                             % (i + 1, take["backlog_after_drain"]))


def _flag_stored(flags, i, run, conns):
    stored, ok, per = run["stored"], run["ok_2xx"], run.get("rows_per_request", 1)
    if stored is None:
        flags.append("run %d: stored count unavailable" % (i + 1))
    elif not 0 <= stored - ok * per <= conns * per:
        flags.append("run %d: stored %d events for %d 2xx answers (%d events each)" % (i + 1, stored, ok, per))


def _cli_check(points, workdir, log):
    config = os.path.join(workdir, "credentials.properties")
    by_cli, by_db = hookdctl.count_cli(config), hookdctl.count_db(workdir)
    log("  hookd events --json lists %s events; database has %s" % (by_cli, by_db))
    for point in points:
        point["cli_count"], point["db_count"] = by_cli, by_db
    if by_cli is None or by_cli != by_db:
        points[-1]["flags"].append("events --json lists %s events, database has %s" % (by_cli, by_db))


def _skipped(target, workload, conns):
    point = _new_point(target, workload, conns)
    point["flags"].append("skipped: time budget ran out")
    _summarise(point)
    return point
