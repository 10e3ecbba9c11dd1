"""Workers driven one iteration at a time (``Worker.loop()``), on a real App, store and command.

No thread is started: each test puts events in the store, submits them, and calls ``loop()`` itself, so
outcomes (done, retry with backoff, dead, deferral by serial key or max_parallel) are checked exactly.
"""

import json
import os
import re
import resource
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import unittest

from tests.support import Daemon, app_from, wait_until
from hookd_core.store import Store
from hookd_core import workers
from hookd_core.workers import Pool, backoff

EXIT_WITH = "import sys; sys.exit(int(open(sys.argv[1]).read()))"


class OneWorkerCase(unittest.TestCase):
    """A real App, store and pool of one worker over a configuration, each test's own; ``stored`` puts
    one event in the store and submits it, as intake does."""

    def open_pool(self, conf):
        self.app = app_from(self.tmp.name, conf)
        self.assertEqual(self.app.problems, [])
        self.app.open_store()
        self.pool = Pool(self.app, 1)
        self.worker = self.pool.workers[0]

    def tearDown(self):
        self.app.store.close()
        self.tmp.cleanup()

    def stored(self, route, body, serial=None):
        row = {"dedupe_key": None, "serial_key": serial, "headers": "{}", "content_type": "application/json",
               "body": body, "payload": None}
        [(eid, _)] = self.app.store.add_events(route, [row])
        self.pool.submit(eid, route, serial)
        return eid


class WorkerTest(OneWorkerCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.code = os.path.join(self.tmp.name, "code")
        self.set_exit(0)
        self.open_pool("[hookd]\nstate_dir = %s\nretry.max_attempts = 3\nretry.base_delay = 10\n"
                       "retry.max_delay = 100\n[hook:w]\nverify = none\nallow_unsigned = true\ndedupe = none\n"
                       "command = %s -c \"%s\" %s\n" % (self.tmp.name, sys.executable, EXIT_WITH, self.code))

    def set_exit(self, code):
        with open(self.code, "w") as f:
            f.write(str(code))

    def add(self, serial=None):
        return self.stored("hook:w", b'{"x": 1}', serial)

    def event(self, eid):
        self.app.store.write(lambda c: None)  # writes commit in order: every outcome so far is stored
        return self.app.store.read(lambda c: c.execute(
            "SELECT status, attempts, next_at, last_error FROM events WHERE id=?", (eid,)).fetchone())

    def test_success_is_done(self):
        eid = self.add()
        self.assertEqual(self.worker.loop(timeout=0), "done")
        self.assertEqual(self.event(eid)[:2], ("done", 1))

    def test_failure_is_retry_with_backoff_then_dead(self):
        self.set_exit(5)
        eid = self.add()
        self.assertEqual(self.worker.loop(timeout=0, now=1000.0), "retry")
        status, attempts, next_at, error = self.event(eid)
        self.assertEqual((status, attempts), ("retry", 1))
        self.assertIn("exit", error)
        self.assertGreater(next_at, 0)
        for expected in ("retry", "dead"):
            self.app.store.write(lambda c: c.execute("UPDATE events SET next_at=0 WHERE id=?", (eid,)))
            self.pool.schedule_once()
            self.assertEqual(self.worker.loop(timeout=0), expected)
        self.assertEqual(self.event(eid)[:2], ("dead", 3))

    def test_same_serial_key_waits_for_the_running_one(self):
        a, b = self.add("cam1"), self.add("cam1")
        first = self.pool.queue.get_nowait()
        self.assertTrue(self.pool.try_start(first))
        self.assertEqual(self.worker.loop(timeout=0), "deferred")
        self.assertEqual(self.event(b)[0], "queued", "must not run while cam1 is busy")
        self.pool.release(first)
        self.assertEqual(self.worker.loop(timeout=0), "done")
        self.assertEqual(self.event(b)[0], "done")
        self.assertEqual(self.event(a)[0], "queued")

    def test_progress_skips_finished_steps_on_retry(self):
        eid = self.add()
        self.app.store.write(lambda c: c.execute(
            "UPDATE events SET progress=? WHERE id=?",
            (json.dumps({"main": True, "note": "n", "input": None, "skip": False, "actions": ["command"]}), eid)))
        self.set_exit(9)  # the command would fail, but it already ran
        self.assertEqual(self.worker.loop(timeout=0), "done")

    def test_backoff_grows_and_is_capped(self):
        for attempt, low, high in ((1, 1, 2), (2, 2, 4), (3, 4, 8), (10, 50, 100)):
            d = backoff(attempt, 2, 100)
            self.assertTrue(low <= d <= high, (attempt, d))

    def test_unhealthy_when_a_job_overruns_its_timeout(self):
        self.assertTrue(self.pool.healthy())
        self.worker.busy_since, self.worker.busy_timeout = 0.0, 5
        self.assertFalse(self.pool.healthy(now=10.0))
        self.assertTrue(self.pool.healthy(now=4.0))


# Each job's program writes a file named after its event into a directory and waits (at most 30 s) until
# as many files as the directory's ".want" file says are there: it gets past only beside the others.
# Then it exits with its payload's "exit".
MEET = """import json, os, sys, time
doc, where = json.load(sys.stdin), sys.argv[1]
open(os.path.join(where, str(doc["id"])), "w").close()
want, deadline = int(open(where + ".want").read()), time.time() + 30
while len(os.listdir(where)) < want and time.time() < deadline:
    time.sleep(0.01)
sys.exit(doc["payload"]["exit"] if len(os.listdir(where)) >= want else 7)
"""


def closed_port():
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BatchTest(OneWorkerCase):
    """A worker takes the command jobs of one route waiting at the front of the queue together (up to
    ``command.batch``; 1 by default), runs their programs side by side and waits for them at once; each
    job keeps its own outcome."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.where = os.path.join(self.tmp.name, "met")
        os.mkdir(self.where)
        script = os.path.join(self.tmp.name, "meet.py")
        with open(script, "w") as f:
            f.write(MEET)
        hook = "verify = none\nallow_unsigned = true\ndedupe = none\ncommand = %s %s %s\n" % (
            sys.executable, script, self.where)
        self.open_pool("[hookd]\nstate_dir = %s\nretry.max_attempts = 3\n[hook:w]\n%s"
                       "command.batch = 4\n[hook:v]\n%s[hook:f]\n%scommand.batch = 4\nforward = "
                       "http://127.0.0.1:%d/\n[hook:nul]\nverify = none\nallow_unsigned = true\n"
                       "command = /bin/echo a\x00b\ncommand.batch = 4\n"
                       % (self.tmp.name, hook, hook, hook, closed_port()))

    def meet(self, n):
        with open(self.where + ".want", "w") as f:
            f.write(str(n))

    def add(self, route="hook:w", serial=None, exit=0):
        return self.stored(route, json.dumps({"exit": exit}).encode(), serial)

    def status(self, eid):
        self.app.store.write(lambda c: None)  # writes commit in order: every outcome so far is stored
        return self.app.store.read(lambda c: c.execute("SELECT status, attempts FROM events WHERE id=?",
                                                       (eid,)).fetchone())

    def test_queued_command_jobs_run_side_by_side_each_with_its_own_outcome(self):
        self.meet(3)
        ids = [self.add(exit=0), self.add(exit=4), self.add(exit=0)]
        self.assertEqual(self.worker.loop(timeout=0), ["done", "retry", "done"])
        self.assertEqual([self.status(e) for e in ids], [("done", 1), ("retry", 1), ("done", 1)])
        self.assertEqual(self.pool._running, {"hook:w": 0}, "every job of the batch was released")

    def test_a_batch_stops_at_another_route_and_at_batch_size(self):
        self.meet(1)  # every program gets past at once
        w = [self.add() for _ in range(5)]
        v = self.add("hook:v")
        last = self.add()
        self.assertEqual(self.worker.loop(timeout=0), ["done"] * 4)
        self.assertEqual(self.worker.loop(timeout=0), "done")
        self.assertEqual(self.status(w[-1])[0], "done")
        self.assertEqual(self.status(v)[0], "queued")
        self.assertEqual(self.worker.loop(timeout=0), "done")
        self.assertEqual(self.status(v)[0], "done")
        self.assertEqual(self.worker.loop(timeout=0), "done")
        self.assertEqual(self.status(last)[0], "done")

    def test_a_section_that_also_forwards_runs_one_job_an_iteration(self):
        self.meet(1)
        first, second = self.add("hook:f"), self.add("hook:f")
        self.assertEqual(self.worker.loop(timeout=0), "retry")  # nothing listens on the forward's port
        self.assertEqual([self.status(e)[0] for e in (first, second)], ["retry", "queued"])

    def test_a_program_that_cannot_be_started_is_a_retry_of_its_own_job(self):
        # posix_spawn refuses an argument holding a NUL with a ValueError (check-config lets it through)
        ids = [self.add("hook:nul") for _ in range(2)]
        outcomes = []
        loop = threading.Thread(target=lambda: outcomes.append(self.worker.loop(timeout=0)), daemon=True)
        loop.start()
        loop.join(30)
        self.assertFalse(loop.is_alive(), "the iteration ends")
        self.assertEqual(outcomes, [["retry", "retry"]])
        self.assertEqual([self.status(e) for e in ids], [("retry", 1)] * 2)

    def test_command_batch_1_by_default_runs_one_job_an_iteration(self):
        self.meet(1)
        first, second = self.add("hook:v"), self.add("hook:v")
        self.assertEqual(self.worker.loop(timeout=0), "done")
        self.assertEqual([self.status(e)[0] for e in (first, second)], ["done", "queued"])

    def test_a_job_whose_serial_key_is_busy_is_not_taken_into_the_batch(self):
        self.meet(1)
        first, same_key, other = self.add(serial="cam1"), self.add(serial="cam1"), self.add(serial="cam2")
        self.assertEqual(self.worker.loop(timeout=0), ["done", "done"])
        self.assertEqual([self.status(e)[0] for e in (first, same_key, other)], ["done", "queued", "done"])
        self.assertEqual(self.worker.loop(timeout=0), "done")
        self.assertEqual(self.status(same_key)[0], "done")


if __name__ == "__main__":
    unittest.main()


class PruneTest(unittest.TestCase):
    """The daily prune runs on a thread of its own that the scheduler starts (at start, then once a day):
    on a large store it reads and deletes for seconds to minutes (review R8: 9 s for a million events),
    and the scheduler goes on meanwhile. These tests start the pool's threads."""

    KEPT, OLD = 100000, 20000  # events within retention, events past it (each with its own body, over ROW_BODY_BYTES)

    def test_a_retry_that_comes_due_runs_while_a_large_prune_goes_on(self):
        """A store of 120,000 events, 20,000 of them past retention; the bodies no event needs are looked
        for 20 at a time (IDS_PER_READ, lowered: each look reads all the events still kept, as on a big
        store). A retry that comes due once the prune has started runs while the prune still has bodies
        to delete; with the prune on the scheduler's thread it ran only after the prune's end."""
        from hookd_core import store as store_mod
        saved = vars(store_mod).get("IDS_PER_READ")
        self.addCleanup(setattr, store_mod, "IDS_PER_READ", saved)
        store_mod.IDS_PER_READ = 20
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        app = app_from(tmp.name, "[hookd]\nstate_dir = %s\nworkers = 1\nretention.days = 30\n[hook:w]\n"
                       "verify = none\nallow_unsigned = true\ndedupe = none\ncommand = %s\n"
                       % (tmp.name, shutil.which("true")))
        store = app.open_store()
        self.addCleanup(store.close)
        row = {"dedupe_key": None, "serial_key": None, "headers": "{}", "content_type": "application/json",
               "payload": None, "done": True}
        old, pad = time.time() - 40 * 86400, b" " * store_mod.ROW_BODY_BYTES  # in request_bodies, not in the rows
        for first in range(0, self.OLD, 1000):
            store.add_events("hook:w", [dict(row, body=b'{"n": %d}' % n + pad) for n in range(first, first + 1000)],
                             now=old)
        for first in range(0, self.KEPT, 1000):  # a request's body is stored once, however many events
            store.add_events("hook:w", [dict(row, body=b'{"batch": %d}' % first)] * 1000)
        [(retrying, _)] = store.add_events("hook:w", [dict(row, body=b"{}", done=False)])
        store.claim(retrying)
        store.finish(retrying, "hook:w", "retry", next_at=time.time() + 86400)
        count = lambda sql: store.read(lambda c: c.execute(sql).fetchone()[0])  # noqa: E731
        bodies = count("SELECT count(*) FROM request_bodies")
        app.pool = pool = Pool(app, 1)
        self.addCleanup(pool.join, 30)
        self.addCleanup(app.stopping.set)  # cleanups run last first: stop, join the threads, close the store
        pool.start()
        wait_until(lambda: count("SELECT count(*) FROM events") <= self.KEPT + self.OLD, 60,
                   interval=0.005, message="the prune to delete its first events")
        self.assertEqual(store.retry(retrying), [retrying])  # due now, as `hookd.py retry` makes it
        wait_until(lambda: count("SELECT status FROM events WHERE id=%d" % retrying) == "done", 60,
                   message="the retry to run")
        left = count("SELECT count(*) FROM request_bodies")
        self.assertGreater(left, bodies - self.OLD // 2, "the retry ran only once the prune had deleted %d of"
                           " the %d bodies no event needs" % (bodies - left, self.OLD))

    def test_a_prune_that_fails_is_one_line_and_the_next_waits(self):
        """A prune whose write is refused (a StoreError, as on a full disk; here the store is closed, as
        when a shutdown overtakes it) is one ERROR line without a traceback, and the next one is due
        PRUNE_AGAIN later, not at the scheduler's next round (once a second, each with its line)."""
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        app = app_from(tmp.name, "[hookd]\nstate_dir = %s\n" % tmp.name)
        app.open_store().close()
        pool = Pool(app, 1)
        with self.assertLogs("hookd", "ERROR") as logged:
            pool.prune_when_due()
            self.assertEqual(pool.join(10), 0)
            pool.prune_when_due()
            self.assertEqual(pool.join(10), 0)
        self.assertEqual(logged.output, ["ERROR:hookd:daily prune failed: store is closed; tried again in 10 minutes"])
        self.assertIsNone(logged.records[0].exc_info)

    def test_a_prune_that_a_shutdown_overtakes_before_it_began_is_one_info_line(self):
        """The scheduler starts the prune as the daemon stops, and the shutdown's grace is over: its first
        write meets the closed store. One INFO line says the prune stopped at shutdown; no ERROR (old
        code: "daily prune failed: store is closed; tried again in 10 minutes", as if the disk were full)."""
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        app = app_from(tmp.name, "[hookd]\nstate_dir = %s\n" % tmp.name)
        app.open_store()
        pool = Pool(app, 1)
        app.stopping.set()
        app.store.close()
        with self.assertLogs("hookd", "INFO") as logged:
            pool.prune_when_due()
            self.assertEqual(pool.join(10), 0)
        self.assertEqual(logged.output, ["INFO:hookd:daily prune stopped at shutdown: store is closed"])

    def test_a_shutdown_during_the_daily_prune_is_one_info_line_saying_how_far_it_got(self):
        """The daemon starts its daily prune on a store of 400,000 events past retention (each with its
        own body) and is sent SIGTERM once the prune has deleted some: it stops at the write it is on and
        says so in one INFO line, with the events and bodies it deleted (counted here in the database),
        and exits 0 with no ERROR line. Old code: "pruned N finished events older than 30 days", N the
        part it got through, as if that were all."""
        tmp = tempfile.mkdtemp(prefix="hookd-prune-stop-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "var", "hookd.sqlite3")
        store = Store(path)
        row = {"dedupe_key": None, "serial_key": None, "headers": "{}", "content_type": "application/json",
               "payload": None, "done": True}
        old, total = time.time() - 40 * 86400, 400000
        for first in range(0, total, 1000):
            store.add_events("hook:w", [dict(row, body=b'{"n": %d}' % n) for n in range(first, first + 1000)],
                             now=old)
        store.close()
        db = sqlite3.connect(path, timeout=10)
        self.addCleanup(db.close)
        count = lambda sql: db.execute(sql).fetchone()[0]  # noqa: E731
        bodies = count("SELECT count(*) FROM request_bodies")
        d = Daemon("[hookd]\nretention.days = 30\n[hook:w]\nverify = none\nallow_unsigned = true\n", tmpdir=tmp)
        self.addCleanup(d.stop)
        d.start()
        wait_until(lambda: count("SELECT min(id) FROM events") > 1, 60, interval=0.005,
                   message="the prune to delete its first events")
        self.assertEqual(d.stop(), 0)
        events_left = count("SELECT count(*) FROM events")
        self.assertGreater(events_left, 1, "the prune ended before the shutdown: make the store larger")
        lines = [line for line in d.log().splitlines() if re.search(r" ERROR | INFO (daily prune|pruned)", line)]
        self.assertEqual(len(lines), 1, d.log())
        m = re.search(r" INFO daily prune stopped at shutdown while deleting (old events|the bodies no event needs),"
                      r" after (\d+) events and (\d+) bodies; the rest waits for the next prune$", lines[0])
        self.assertIsNotNone(m, lines[0])
        self.assertEqual((int(m.group(2)), int(m.group(3))),
                         (total - events_left, bodies - count("SELECT count(*) FROM request_bodies")))


class SchedulerRefusedWritesTest(unittest.TestCase):
    """The scheduler's rounds (``Pool.schedule_round``, called here as its thread does once a second) on a
    store that refuses every write: a real EFBIG from RLIMIT_FSIZE of 1 byte on this process (Python
    ignores SIGXFSZ), as WritesRefusedTest does to the daemon. The write that fails every round is the
    end of an overdue lease (a remote worker that went away)."""

    def test_refused_writes_are_one_error_line_then_one_info_line_once_they_work(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        app = app_from(tmp.name, "[hookd]\nstate_dir = %s\n[hook:r]\nverify = none\nallow_unsigned = true\n"
                       "remote = true\n" % tmp.name)
        store = app.open_store()
        self.addCleanup(store.close)
        app.pool = pool = Pool(app, 1)
        row = {"dedupe_key": None, "serial_key": None, "headers": "{}", "content_type": "application/json",
               "body": b"{}", "payload": None}
        [(event_id, _)] = store.add_events("hook:r", [row])
        self.assertEqual(len(store.lease(["hook:r"], 1, 1, "gone", now=time.time() - 100)), 1)  # overdue
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_FSIZE, limit)
        self.addCleanup(setattr, workers, "REFUSED_REMINDER", workers.REFUSED_REMINDER)
        with self.assertLogs("hookd", "INFO") as logged:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1, limit[1]))
            refused = [pool.schedule_round() for _ in range(5)]
            lines_while_refused = list(logged.output)
            workers.REFUSED_REMINDER = 0  # a minute has passed
            refused.append(pool.schedule_round())
            workers.REFUSED_REMINDER = 60
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
            self.assertIsNone(pool.schedule_round())
            self.assertIsNone(pool.schedule_round())
        self.assertTrue(all(refused), refused)  # every round met the full disk
        self.assertEqual(lines_while_refused, ["ERROR:hookd:scheduler: the database refuses writes: %s;"
                                               " tried again every round" % refused[0]])
        self.assertRegex(logged.output[1], r"^ERROR:hookd:scheduler: the database still refuses writes \(for \d+ s\):")
        self.assertEqual(len(logged.output), 4, logged.output)
        self.assertIn("lease of worker gone expired", logged.output[2])  # the round that worked
        self.assertRegex(logged.output[3], r"^INFO:hookd:scheduler: the database takes writes again \(refused for \d+ s\)$")
        self.assertEqual(store.read(lambda c: c.execute("SELECT status FROM events WHERE id=?",
                                                        (event_id,)).fetchone()[0]), "retry")  # back in the queue

