"""The benchmark's own honesty. It takes the runs a ratio divides in the same minutes: within one workload and
one connection count, run 1 of every target (the ceiling first), then run 2 of every target, and so on, so
that no target's runs at a point sit in a block of their own, minutes away from the ceiling's they are
divided by. It reads a server's CPU over wrk's run alone (real wrk against the real ceiling server), waits
for just-started servers to go quiet before a workload's first run (real processes), and its report shows
what stood beside each run (from a constructed results dict); its busy-job phase runs the real hookd beside
a real busy job of its own."""

import errno
import os
import shutil
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from benchlib import busyjob, measure, pool, procs, report, targets, wrkrun  # noqa: E402


class RunOrderTest(unittest.TestCase):
    def test_runs_alternate_between_targets_within_each_connection_count(self):
        order = measure.run_order(["ceiling", "naive-durable", "hookd"], [1, 16], 3)
        expected = []
        for conns in (1, 16):
            for run in range(3):
                expected += [(conns, run, "ceiling"), (conns, run, "naive-durable"), (conns, run, "hookd")]
        self.assertEqual(order, expected)

    def test_every_target_runs_between_two_runs_of_another(self):
        names = ["ceiling", "naive-durable", "hookd", "flask-dev"]
        order = measure.run_order(names, [16], 3)
        for name in names:
            at = [i for i, (_, _, t) in enumerate(order) if t == name]
            self.assertEqual(len(at), 3)
            for first, second in zip(at, at[1:]):
                between = {t for _, _, t in order[first + 1:second]}
                self.assertEqual(between, set(names) - {name}, "between two runs of %s" % name)


@unittest.skipUnless(shutil.which("wrk"), "wrk is not installed: the CPU meter's window is wrk's own run")
class WrkWindowTest(unittest.TestCase):
    """The server's CPU is read over wrk's run alone: the meter starts at the Lua script's BENCHREADY
    line, which init() prints after it has read the whole request pool, and stops when wrk has exited."""

    def test_meter_starts_after_wrk_has_read_its_pool(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        built = os.path.join(tmp, "pool.txt")
        pool.build(built, "standard", 20000)
        # wrk reads the pool through a FIFO that this test writes, so the moment its last byte went in
        # is known: nothing wrk does after reading the pool can come before it.
        fifo = os.path.join(tmp, "pool.fifo")
        os.mkfifo(fifo)
        ceiling = [t for t in targets.TARGETS if t.name == "ceiling"][0]
        port = procs.free_port()
        with procs.Server("ceiling", ceiling.argv(port, tmp), port, os.path.join(tmp, "server.log")) as server:
            meter, answer = measure.CpuMeter([server]), {}

            def drive():
                answer["result"] = wrkrun.run("stdwebhooks.lua", "http://127.0.0.1:%d" % port, 2, 1, fifo,
                                              "/hooks/bench", meters=(meter,))
            driver = threading.Thread(target=drive)
            driver.start()
            fd = _open_for_writing_once_read(fifo, driver, time.monotonic() + 60)
            self.assertIsNotNone(fd, "wrk ended before it opened its pool (%r)" % answer)
            with open(fd, "wb") as sink, open(built, "rb") as source:
                shutil.copyfileobj(source, sink)
                last_byte = time.monotonic()  # wrk sees the pool's end only when this file closes
            driver.join(90)
            ended = time.monotonic()
        result = answer["result"]
        self.assertGreater(result["requests"], 0)
        self.assertGreater(meter.started, last_byte, "the meter started before wrk had read its pool")
        self.assertLessEqual(meter.stopped, ended)
        self.assertGreater(meter.share, 0.0, "the ceiling served wrk's requests inside the meter's window")
        self.assertGreater(result["ready_s"], 0.0)


def _open_for_writing_once_read(fifo, reader, deadline):
    """A descriptor writing into ``fifo`` (blocking) once ``reader`` (a thread) has it open for reading;
    None if that thread ends or ``deadline`` passes first, so a wrk that fails before it opens its pool
    fails the test instead of leaving it blocked in open()."""
    while reader.is_alive() and time.monotonic() < deadline:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            reader.join(0.01)
            continue
        os.set_blocking(fd, True)
        return fd
    return None


BUSY_THEN_IDLE = """
import socket, sys, time
listener = socket.socket()
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen()
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    pass
open(sys.argv[3], "w").close()
time.sleep(600)
"""


FORKS_A_BUSY_CHILD = """
import os, socket, subprocess, sys, time
listener = socket.socket()
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
subprocess.run([sys.executable, "-c", "import time\\nend = time.process_time() + 0.4\\nwhile time.process_time() < end: pass"])
open(sys.argv[3], "w").close()
time.sleep(600)
"""


class ChildCpuTest(unittest.TestCase):
    """A server that runs a command per request (adnanh/webhook) spends its CPU in children that have
    exited by the time the meter stops: their time, which the kernel adds to the parent's cutime and
    cstime when it waits for them, is the server's."""

    def test_the_cpu_of_a_child_that_has_exited_counts(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        go, done = os.path.join(tmp, "go"), os.path.join(tmp, "done")
        port = procs.free_port()
        server = procs.Server("forks", [sys.executable, "-c", FORKS_A_BUSY_CHILD, str(port), go, done], port,
                              os.path.join(tmp, "server.log"))
        server.start()
        self.addCleanup(server.stop)
        meter = measure.CpuMeter([server])
        meter.start()
        open(go, "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.02)
        meter.stop()
        self.assertTrue(os.path.exists(done), "the server's child did not finish within 30 s")
        self.assertGreaterEqual(meter.share * meter.seconds, 0.35, "the child's 0.4 s of CPU was not counted")


@unittest.skipUnless(shutil.which("wrk"), "wrk is not installed")
class BusyJobTest(unittest.TestCase):
    """The busy-job phase measures the real hookd beside a real CPU-bound job of its own: the job is seen
    running, at the policy hookd gave it (SCHED_IDLE past job_idle_after), and nothing of it is left
    when the phase is over."""

    def test_intake_is_measured_beside_an_idle_job_and_the_job_is_gone_after(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        plan = measure.Plan(1, 1, [16], ["hookd"], ["standard"], tmp, 120)
        result = busyjob.run(plan, lambda msg: None)
        self.assertNotIn("error", result, result.get("error"))
        self.assertEqual(result["policy"], ["idle"])
        self.assertEqual(result["errors"], 0)
        self.assertTrue(result["unloaded_rps"] > 0 and result["busy_rps"] > 0, result)
        self.assertEqual(busyjob._running(), [])
        self.assertIn("| 1 × `", "\n".join(report._busy_job_md(result)))


class WaitQuietTest(unittest.TestCase):
    """A workload's first run waits until the servers just started have gone quiet (below 2 % of a core
    over a QUIET_WINDOW), at most a bound, and records whether they did."""

    def _server(self, busy_s, tmp):
        port = procs.free_port()
        idle_mark = os.path.join(tmp, "idle-%d" % port)
        argv = [sys.executable, "-c", BUSY_THEN_IDLE, str(port), str(busy_s), idle_mark]
        server = procs.Server("busy", argv, port, os.path.join(tmp, "server-%d.log" % port))
        server.start()
        self.addCleanup(server.stop)
        return server, idle_mark

    def test_waits_until_a_server_busy_after_its_start_is_idle(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        busy, idle_mark = self._server(1.5, tmp)
        idle, _ = self._server(0, tmp)
        settle = measure.wait_quiet({"busy": busy, "idle": idle})
        self.assertTrue(os.path.exists(idle_mark), "returned while the server still burned its core")
        self.assertTrue(settle["quiet"], settle)
        self.assertLess(settle["shares"]["busy"], measure.QUIET_SHARE)

    def test_a_server_that_never_goes_quiet_is_recorded_after_the_bound(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        busy, idle_mark = self._server(60, tmp)
        settle = measure.wait_quiet({"busy": busy}, most=1.2)
        self.assertFalse(settle["quiet"], settle)
        self.assertGreaterEqual(settle["waited_s"], 1.2)
        self.assertGreaterEqual(settle["shares"]["busy"], measure.QUIET_SHARE)
        self.assertFalse(os.path.exists(idle_mark))


class StealMeterTest(unittest.TestCase):
    def test_a_run_the_host_took_over_5_percent_of_is_taken_again_at_most_twice(self):
        self.assertFalse(measure.retake(_run(9000, steal_share=0.049), []))
        self.assertFalse(measure.retake(_run(9000), []))  # a kernel that counts no steal
        self.assertTrue(measure.retake(_run(1177, steal_share=0.382), []))
        self.assertTrue(measure.retake(_run(1177, steal_share=0.382), [{}]))
        self.assertFalse(measure.retake(_run(1177, steal_share=0.382), [{}, {}]))

    def test_the_take_with_the_least_steal_is_kept(self):
        takes = [_run(5000, steal_share=0.06), _run(1000, steal_share=0.40), _run(1200, steal_share=0.38)]
        kept, replaced = measure.keep(takes)
        self.assertIs(kept, takes[0])
        self.assertEqual(replaced, takes[1:])
        kept, replaced = measure.keep([_run(7000, steal_share=0.01)])
        self.assertEqual((kept["rps"], replaced), (7000, []))

    def test_what_a_replaced_take_would_have_flagged_is_flagged(self):
        take = _run(1000, steal_share=0.4, wraps=1, socket_errors=3, backlog_after_drain=250, stored=990,
                    ok_2xx=1000)
        kept = _run(7000, steal_share=0.01, retaken=[take])
        point = {"target": "hookd", "role": "hookd", "workload": "standard", "conns": 16,
                 "runs": [_run(7100), kept], "flags": []}
        measure._summarise(point)
        flags = point["flags"]
        self.assertIn("3 socket errors", flags)
        self.assertIn("request pool wrapped (duplicates sent)", flags)
        self.assertIn("run 2: a take replaced left hookd's backlog of 250 events", flags)
        self.assertTrue(any("stored 990 events for 1000 2xx answers" in f for f in flags), flags)
        self.assertEqual(point["rps"], 7050)  # the medians are over the kept runs alone
        clean = {"target": "hookd", "role": "hookd", "workload": "standard", "conns": 16,
                 "runs": [_run(7000, retaken=[_run(2000, steal_share=0.3)])], "flags": []}
        measure._summarise(clean)
        self.assertEqual(clean["flags"], [])

    def test_the_eighth_time_of_the_cpu_line_is_the_hosts(self):
        # user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
        line = "cpu  4700 20 1200 14000 120 0 140 758 300 0\n"
        self.assertEqual(measure.StealMeter.times(line), (20938, 758))

    def test_reads_this_machines_stat_over_a_busy_half_second(self):
        meter = measure.StealMeter()
        meter.start()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:  # the clock must move for the share to be read
            pass
        meter.stop()
        self.assertTrue(0.0 <= meter.share <= 1.0, meter.share)


class DiskMeterTest(unittest.TestCase):
    """The disk beside a run: what the kernel still had to write back at its start, and what the device
    under the work directory wrote and flushed during it."""

    def test_dirty_pages_at_the_start_and_the_synced_writes_during_the_run(self):
        tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(__file__)))
        self.addCleanup(shutil.rmtree, tmp, True)
        meter = measure.DiskMeter(tmp)
        if meter._stats() is None:
            self.skipTest("the tests' directory is not on a block device in /proc/diskstats")
        with open(os.path.join(tmp, "dirty"), "wb") as f:
            f.write(b"d" * (32 << 20))  # left for the kernel to write back: 30 s before it starts to
        meter.start()
        fd = os.open(os.path.join(tmp, "synced"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(64):
                os.write(fd, b"s" * 65536)
                os.fdatasync(fd)
        finally:
            os.close(fd)
        meter.stop()
        record = meter.record()
        self.assertGreaterEqual(record["dirty_kb"] + record["writeback_kb"], 16 << 10, record)
        self.assertGreaterEqual(record["disk_writes"], 1, record)
        self.assertGreaterEqual(record["disk_mb_written"], 4.0, record)
        self.assertIsNotNone(record["disk_write_ms_avg"], record)


def _run(rps, **extra):
    run = {"rps": rps, "p50_us": 900, "p99_us": 3000, "rss_kb": 20000, "cpu_share": 0.9, "non2xx": 0,
           "socket_errors": 0, "wraps": 0, "others_cpu_share": 0.001}
    run.update(extra)
    return run


class ReportGuardsTest(unittest.TestCase):
    """The report shows what stood beside each run: the other servers' CPU above 2 % of a core, servers
    not quiet before the first run, and hookd's backlog on every run until a hookd drain reads 0."""

    def doc(self):
        hookd_runs = [_run(9000, backlog_after_drain=500, dirty_kb=2048, disk_flush_ms_avg=0.25,
                           steal_share=0.05),
                      _run(9100, backlog_after_drain=0, dirty_kb=184320, disk_flush_ms_avg=1.5),
                      _run(9200, backlog_after_drain=0, p99_us=4200, dirty_kb=0, disk_flush_ms_avg=None)]
        settle = {"quiet": False, "waited_s": 10.2, "shares": {"ceiling": 0.001, "gunicorn": 0.065}}
        runs = {"ceiling": [_run(10000, settle=settle), _run(10100), _run(10200, others_cpu_share=0.015)],
                "naive-durable": [_run(2000, steal_share=0.088), _run(2100, steal_share=0.015),
                                  _run(2200, others_cpu_share=0.035)],
                "hookd": hookd_runs}
        runs["ceiling"][1]["retaken"] = [_run(1177, p99_us=90000, steal_share=0.382),
                                         _run(3100, p99_us=20000, steal_share=0.091)]
        points = []
        for name, role in (("ceiling", "ceiling"), ("naive-durable", "reference"), ("hookd", "hookd")):
            point = {"target": name, "role": role, "workload": "standard", "conns": 16, "runs": runs[name],
                     "flags": []}
            measure._summarise(point)
            points.append(point)
        report.add_ratios(points)
        machine = {"cpu_model": "test", "cpus": 2, "mem_total": "1 kB", "platform": "test", "python": "3",
                   "sqlite": "3", "wrk": "wrk", "webhook": "webhook", "loadavg": ["0", "0", "0"]}
        doc = {"started": "now", "machine": machine, "points": points,
               "settings": {"seconds": 3, "runs": 3, "conns": [16], "pinning": "taskset", "order": "o"}}
        doc["verdicts"] = report.verdicts(doc)
        return doc

    def rows(self, text):
        return {line.split("|")[1].strip(): line for line in text.splitlines()
                if line.startswith("| ") and "| 16 |" in line}

    def test_backlog_is_flagged_on_every_run_until_a_hookd_drain_reads_0(self):
        rows = self.rows(report.markdown(self.doc()))
        for name in ("ceiling", "naive-durable", "hookd"):
            self.assertIn("run 2: started beside hookd's backlog of 500 events", rows[name])
            self.assertNotIn("run 3: started beside", rows[name])
            self.assertNotIn("run 1: started beside", rows[name])

    def test_other_servers_cpu_above_2_percent_of_a_core_is_flagged(self):
        rows = self.rows(report.markdown(self.doc()))
        self.assertIn("run 3: the other servers used 3.5 % of a core meanwhile", rows["naive-durable"])
        self.assertNotIn("the other servers used", rows["ceiling"])  # 1.5 %: below the flag
        self.assertNotIn("the other servers used", rows["hookd"])

    def test_a_run_whose_host_took_over_2_percent_of_the_cpus_is_noted(self):
        rows = self.rows(report.markdown(self.doc()))
        self.assertIn("the host took the CPUs' time (steal) in run 1: 8.8 %;", rows["naive-durable"])
        self.assertNotIn("run 2: 1.5 %", rows["naive-durable"])  # below the flag
        self.assertIn("the host took the CPUs' time (steal) in run 1: 5.0 %", rows["hookd"])

    def test_the_runs_taken_again_are_listed_with_what_they_read(self):
        rows = self.rows(report.markdown(self.doc()))
        self.assertIn("taken again after the host took over 5 % of the CPUs' time: run 2 (1177 req/s at 38 % steal,"
                      " 3100 req/s at 9 % steal)", rows["ceiling"])
        self.assertNotIn("taken again", rows["hookd"])

    def test_servers_not_quiet_before_the_first_run_are_flagged(self):
        rows = self.rows(report.markdown(self.doc()))
        self.assertIn("run 1: servers not quiet after 10 s of waiting (gunicorn 6.5 % of a core)", rows["ceiling"])

    def test_hookd_runs_show_their_p99_and_the_disk_beside_them(self):
        rows = self.rows(report.markdown(self.doc()))
        self.assertIn("p99 ms: 3.0, 3.0, 4.2", rows["hookd"])
        self.assertIn("dirty MB at start: 2, 180, 0", rows["hookd"])
        self.assertIn("disk flush ms (average): 0.250, 1.500, —", rows["hookd"])
        self.assertNotIn("dirty MB", rows["ceiling"])

    def test_runs_spread_over_a_quarter_are_noted_and_so_are_the_ratios_to_them(self):
        doc = self.doc()
        text = report.markdown(doc)
        self.assertNotIn("spread", text)  # 10000-10200 and 9000-9200: steady
        doc["points"][0]["runs"][2]["rps"] = 13000  # the ceiling's runs: 10000, 10100, 13000
        doc["verdicts"] = report.verdicts(doc)
        rows = self.rows(report.markdown(doc))
        self.assertIn("its runs spread 1.30× (fastest over slowest)", rows["ceiling"])
        self.assertNotIn("spread", rows["hookd"])
        verdicts = {text: detail for text, met, detail in doc["verdicts"]}
        self.assertIn("standard c=16: 0.90× (99 µs/req; the ceiling's runs spread 1.30×)",
                      verdicts["Standard Webhooks ≥ 1.0× the ceiling at 16 and 64 connections, both framings"])
        self.assertIn("standard c=16: 1.00× (the ceiling's runs spread 1.30×)",
                      verdicts["p99 ≤ the ceiling's p99 at 16 and 64 connections"])
        doc["points"][0]["runs"][2]["rps"] = 12500  # 1.25x: at the line, not over it
        doc["points"][2]["runs"][0]["rps"] = 0  # hookd: a run that served nothing
        doc["verdicts"] = report.verdicts(doc)
        rows = self.rows(report.markdown(doc))
        self.assertNotIn("spread", rows["ceiling"])
        self.assertIn("its runs spread from 0 req/s up (fastest over slowest)", rows["hookd"])
        self.assertIn("hookd's runs spread from 0 req/s up", doc["verdicts"][0][2])

    def test_the_stages_table_says_how_many_passes_it_kept_the_fastest_of(self):
        stages = {"passes": 5, "standard": {"reader": 6.0, "accept": 4.0}, "preservica": {"reader": 6.5, "accept": 9.0}}
        text = "\n".join(report._stages_md(stages))
        self.assertIn("thread CPU clock, the fastest of 5 passes)", text)
        self.assertIn("| **sum** | 10.0 | 15.5 |", text)
        self.assertIn("the sum is below what any one pass took", text)
        old = "\n".join(report._stages_md({"standard": {"reader": 6.0}}))  # results files before ece7481
        self.assertNotIn("passes", old)
        self.assertIn("| **sum** | 6.0 |", old)

    def test_a_backlog_beside_hookd_fails_the_honesty_target(self):
        verdicts = {text: (met, detail) for text, met, detail in self.doc()["verdicts"]}
        met, detail = [v for text, v in verdicts.items() if text.startswith("every request distinct")][0]
        self.assertFalse(met)
        self.assertIn("run 2: started beside hookd's backlog of 500 events", detail)
        self.assertNotIn("steal", detail)  # the host's doing, not the bench's


class BudgetTest(unittest.TestCase):
    """A point the time budget cut short says so beside its runs; it is not an error of what was measured."""

    def test_a_point_cut_short_by_the_budget_is_noted_and_its_runs_still_judged(self):
        plan = measure.Plan(3, 3, [16], None, None, None, budget=-1)  # the budget is spent already
        chosen = [t for t in targets.TARGETS if t.name in ("ceiling", "hookd")]
        workload = [w for w in targets.WORKLOADS if w.name == "standard"][0]
        points = {(t.name, 16): measure._new_point(t, workload, 16) for t in chosen}
        for (name, _), point in points.items():
            rps = 10000 if name == "ceiling" else 9000
            point["runs"] = [_run(rps + n, stored=rps * 3, ok_2xx=rps * 3) for n in (0, 100)]
        measure._interleave(plan, chosen, workload, {}, {}, points, lambda msg: None, None)
        doc = {"points": list(points.values())}
        report.add_ratios(doc["points"])
        honesty = [v for v in report.verdicts(doc) if v[0].startswith("every request distinct")][0]
        self.assertEqual((honesty[1], honesty[2]), (True, "all hookd points clean"))
        notes = report._notes(points[("hookd", 16)], report.guards(doc["points"]))
        self.assertIn("time budget ran out after 2 runs", notes)
        standard = report.verdicts(doc)[0]  # and beside the ratio that divides the two medians
        self.assertIn("standard c=16: 0.90× (", standard[2])
        self.assertIn("the ceiling's time budget ran out after 2 runs, hookd's time budget ran out after 2 runs",
                      standard[2])
        slow = {"points": [{"target": "hookd", "conns": 64, "x_naive": 14.6,
                            "cut": "time budget ran out after 3 runs"}]}
        self.assertEqual(report._slow_disk_target(slow)[1:], (True, "c=64: 14.6× (time budget ran out after 3 runs)"))
        # a point that got no run at all cannot vouch for anything
        points[("hookd", 16)]["runs"] = []
        measure._summarise(points[("hookd", 16)])
        self.assertFalse([v for v in report.verdicts(doc) if v[0].startswith("every request distinct")][0][1])


if __name__ == "__main__":
    unittest.main()
