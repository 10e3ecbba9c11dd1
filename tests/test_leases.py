"""The lease API (SPEC §10) called directly: ``admin.dispatch(app, req)`` on a real App and sqlite file.

No HTTP and no threads of the daemon: each test stores events, then calls the admin dispatcher (which
asks ``leases.handle``) with an ``api.Request`` as the admin listener would, and reads the store to see
what changed. Times are moved by
passing ``now`` to the store, never by sleeping, except where the long poll itself is under test.
"""

import json
import sys
import tempfile
import threading
import time
import unittest

from hookd_core import admin, leases
from hookd_core.api import Headers, Reject, Request
from tests.support import app_from
from hookd_core.store import list_workers
from hookd_core.workers import Pool

JSON = {"Content-Type": "application/json"}


class LeaseTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.app = app_from(self.tmp.name,
                            "[hookd]\nstate_dir = %s\nretry.max_attempts = 3\nretry.base_delay = 10\n"
                            "[hook:r]\nverify = none\nallow_unsigned = true\ndedupe = none\nremote = true\n"
                            "command = %s -c pass\n"
                            "[hook:l]\nverify = none\nallow_unsigned = true\ndedupe = none\n"
                            "command = %s -c pass\n" % (self.tmp.name, sys.executable, sys.executable))
        self.assertEqual(self.app.problems, [])
        self.app.open_store()
        self.app.pool = Pool(self.app, 1)

    def tearDown(self):
        self.app.store.close()
        self.tmp.cleanup()

    # -- helpers --------------------------------------------------------------------------------------
    def add(self, route="hook:r", serial=None, body=b'{"x": 1}'):
        row = {"dedupe_key": None, "serial_key": serial, "headers": '{"x-h": "v"}',
               "content_type": "application/json", "body": body, "payload": None}
        [(eid, _)] = self.app.store.add_events(route, [row])
        self.app.pool.submit(eid, route, serial)
        return eid

    def call(self, path, body=None, headers=JSON, method="POST"):
        raw = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        try:
            r = admin.dispatch(self.app, Request(method, path, {}, Headers(list(headers.items())), raw,
                                                 "127.0.0.1"))
        except Reject as e:
            return e.status, {"error": str(e)}
        return r.status, json.loads(r.body)

    def take(self, routes=("hook:r",), **kw):
        body = dict({"routes": list(routes), "wait": 0, "worker": "w1"}, **kw)
        status, got = self.call("/work/lease", body)
        self.assertEqual(status, 200, got)
        return got

    def event(self, eid):
        return self.app.store.read(lambda c: c.execute(
            "SELECT status, attempts, next_at, last_error, note, progress FROM events WHERE id=?",
            (eid,)).fetchone())

    # -- leasing --------------------------------------------------------------------------------------
    def test_lease_hands_out_a_due_event_as_running_with_its_document(self):
        eid = self.add()
        [job] = self.take(lease_seconds=30)
        self.assertEqual((job["id"], job["route"], job["attempt"]), (eid, "hook:r", 1))
        self.assertRegex(job["lease_id"], r"^[0-9a-f]{32}$")
        self.assertRegex(job["lease_until"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(job["event"]["payload"], {"x": 1})
        self.assertEqual(job["event"]["headers"], {"x-h": "v"})
        self.assertEqual(job["event"]["id"], eid)
        self.assertEqual(job["progress"], {})
        self.assertEqual(self.event(eid)[:2], ("running", 1))
        self.assertEqual(self.take(), [], "a leased event is not leased again")

    def test_lease_takes_only_the_asked_routes_and_at_most_max(self):
        local = self.add("hook:l")
        ids = [self.add() for _ in range(3)]
        got = self.take(max=2)
        self.assertEqual([j["id"] for j in got], ids[:2])
        self.assertEqual(self.event(local)[0], "queued")

    def test_one_serial_key_is_never_leased_twice_nor_claimed_locally_while_leased(self):
        a, b = self.add(serial="cam1"), self.add(serial="cam1")
        c = self.add("hook:l", serial="cam1")
        got = self.take(max=5)
        self.assertEqual([j["id"] for j in got], [a])
        self.assertIsNone(self.app.store.claim(c), "a local worker must wait for the remote one")
        self.assertEqual(self.call("/work/%s/done" % got[0]["lease_id"], {"note": "ok"})[0], 200)
        self.assertEqual([j["id"] for j in self.take(max=5)], [b])

    def test_a_key_running_locally_is_not_leased(self):
        local = self.add("hook:l", serial="cam2")
        self.assertIsNotNone(self.app.store.claim(local))
        self.add(serial="cam2")
        self.assertEqual(self.take(), [])

    def test_long_poll_answers_when_an_event_arrives(self):
        started = time.monotonic()
        self.assertEqual(self.take(wait=0.3), [])
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        timer = threading.Timer(0.3, self.add)
        timer.start()
        started = time.monotonic()
        got = self.take(wait=10)
        elapsed = time.monotonic() - started
        timer.join()
        self.assertEqual(len(got), 1)
        self.assertLess(elapsed, 5, "the waiting lease call is woken by the new event")

    def test_a_caller_that_hung_up_while_waiting_is_handed_nothing(self):
        req = Request("POST", "/work/lease", {}, Headers(list(JSON.items())),
                      json.dumps({"routes": ["hook:r"], "wait": 10, "worker": "gone"}).encode(), "127.0.0.1")
        req.connected = lambda: False  # as the admin listener says once the worker's socket is closed
        timer = threading.Timer(0.2, self.add)
        timer.start()
        started = time.monotonic()
        self.assertEqual(json.loads(admin.dispatch(self.app, req).body), [])
        timer.join()
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(len(self.take()), 1, "the event waits for a worker that is still there")

    def test_remote_route_is_left_to_remote_workers(self):
        self.add()
        self.add("hook:l")
        self.assertEqual(self.app.pool.queue.qsize(), 1)
        self.app.pool.queue.get_nowait()
        self.app.pool._inflight.clear()
        self.app.pool.schedule_once()
        self.assertEqual(self.app.pool.queue.get_nowait()[1], "hook:l")
        self.assertTrue(self.app.pool.queue.empty(), "the scheduler must not queue a remote route")

    # -- ending a lease -------------------------------------------------------------------------------
    def test_done_twice_is_200_then_200_and_another_verb_after_it_is_409(self):
        eid = self.add()
        [job] = self.take()
        lid = job["lease_id"]
        self.assertEqual(self.call("/work/%s/done" % lid, {"note": "recorded", "progress": {"main": True}}),
                         (200, {"lease_id": lid, "id": eid, "ended": "done"}))
        self.assertEqual(self.call("/work/%s/done" % lid, {"note": "recorded"})[0], 200)
        status, attempts, _, _, note, progress = self.event(eid)
        self.assertEqual((status, attempts, note), ("done", 1, "recorded"))
        self.assertEqual(json.loads(progress), {"main": True})
        for verb in ("retry", "dead", "extend"):
            self.assertEqual(self.call("/work/%s/%s" % (lid, verb), {})[0], 409, verb)
        self.assertEqual(self.event(eid)[0], "done", "a 409 changes nothing")
        self.assertEqual(self.app.store.waiting("hook:r"), 0)

    def test_unknown_lease_is_409(self):
        self.assertEqual(self.call("/work/%s/done" % ("0" * 32), {})[0], 409)

    def test_retry_puts_the_event_back_later_and_dead_after_the_last_attempt(self):
        eid = self.add()
        for attempt in (1, 2):
            [job] = self.take()
            self.assertEqual(job["attempt"], attempt)
            before = time.time()
            self.assertEqual(self.call("/work/%s/retry" % job["lease_id"],
                                       {"error": "camera busy", "retry_after": 60})[0], 200)
            status, attempts, next_at, error = self.event(eid)[:4]
            self.assertEqual((status, attempts, error), ("retry", attempt, "camera busy"))
            self.assertAlmostEqual(next_at, before + 60, delta=5)
            self.assertEqual(self.take(), [], "not due before retry_after")
            self.app.store.write(lambda c: c.execute("UPDATE events SET next_at=0 WHERE id=?", (eid,)))
        [job] = self.take()
        self.call("/work/%s/retry" % job["lease_id"], {"error": "still busy"})
        self.assertEqual(self.event(eid)[:2], ("dead", 3))
        self.assertIn("after 3 attempts", self.event(eid)[3])

    def test_dead_ends_the_event_at_once(self):
        eid = self.add()
        [job] = self.take()
        self.assertEqual(self.call("/work/%s/dead" % job["lease_id"], {"error": "bad token"})[0], 200)
        self.assertEqual(self.event(eid)[:4:3], ("dead", "bad token"))

    # -- expiry ---------------------------------------------------------------------------------------
    def test_an_expired_lease_returns_the_event_and_a_late_done_is_409(self):
        eid = self.add()
        [(held, _)] = self.app.store.lease(["hook:r"], 1, 5, "w1", now=time.time() - 100)
        self.assertEqual(self.call("/work/%s/done" % held["lease_id"], {})[0], 409,
                         "overdue: 409 even before the sweep ran")
        self.assertEqual(self.event(eid)[0], "running", "and nothing changed")
        self.assertEqual(leases.sweep(self.app), 1)
        status, attempts, _, error = self.event(eid)[:4]
        self.assertEqual((status, attempts), ("retry", 1))
        self.assertIn("expired", error)
        self.assertEqual(self.call("/work/%s/done" % held["lease_id"], {})[0], 409)
        [job] = self.take()
        self.assertEqual((job["id"], job["attempt"]), (eid, 2), "the attempt that expired is counted")
        self.assertIn('hookd_lease_expired_total{route="hook:r"} 1', self.app.metrics.render(self.app.store))

    def test_extend_keeps_the_lease_and_carries_progress_to_the_next_lease(self):
        eid = self.add()
        [(held, _)] = self.app.store.lease(["hook:r"], 1, 30, "w1", now=time.time() - 25)
        status, answer = self.call("/work/%s/extend" % held["lease_id"],
                                   {"lease_seconds": 30, "progress": {"main": True, "actions": []}})
        self.assertEqual(status, 200, answer)
        self.assertEqual(leases.sweep(self.app, now=time.time() + 10), 0, "extended: not overdue")
        self.assertEqual(leases.sweep(self.app, now=time.time() + 31), 1)
        self.app.store.write(lambda c: c.execute("UPDATE events SET next_at=0 WHERE id=?", (eid,)))
        [job] = self.take()
        self.assertEqual((job["id"], job["progress"]), (eid, {"main": True, "actions": []}))

    def test_a_restart_keeps_leased_events_running_and_requeues_local_ones(self):
        leased, local = self.add(), self.add("hook:l")
        [job] = self.take()
        self.assertIsNotNone(self.app.store.claim(local))
        self.assertEqual(self.app.store.requeue_running(), 1)
        self.assertEqual(self.event(leased)[0], "running")
        self.assertEqual(self.event(local)[0], "queued")
        self.assertEqual(self.call("/work/%s/done" % job["lease_id"], {})[0], 200,
                         "the worker reports to the restarted hookd")

    # -- the HTTP surface -----------------------------------------------------------------------------
    def test_not_a_work_path_is_none(self):
        r = leases.handle(self.app, Request("GET", "/events", {}, Headers([]), b"", "127.0.0.1"))
        self.assertIsNone(r)

    def test_refusals(self):
        self.assertEqual(self.call("/work/lease", {"routes": ["hook:r"]}, headers={})[0], 415)
        self.assertEqual(self.call("/work/lease", {"routes": ["hook:r"]},
                                   headers={"Content-Type": "text/plain"})[0], 415)
        status, _ = self.call("/work/lease", method="GET")
        self.assertEqual(status, 405)
        for body in ({}, {"routes": []}, {"routes": "hook:r"}, {"routes": ["hook:r"], "max": 0},
                     {"routes": ["hook:r"], "wait": -1}, {"routes": ["hook:r"], "worker": "a b"},
                     {"routes": ["hook:r"], "lease_seconds": "x"}):
            self.assertEqual(self.call("/work/lease", body)[0], 422, body)
        self.assertEqual(self.call("/work/nope/done", {})[0], 404)
        self.assertEqual(self.call("/work/lease", b"{")[0], 400)
        self.assertEqual(self.call("/work/lease", b"[]")[0], 422)

    def test_metrics_show_held_leases_and_workers_last_seen(self):
        self.add()
        before = time.time()
        self.take(worker="cam-host-1")
        text = self.app.metrics.render(self.app.store)
        self.assertIn('hookd_leases{route="hook:r"} 1', text)
        [w] = self.app.store.read(list_workers)
        self.assertEqual((w["worker"], w["leases"], w["routes"]), ("cam-host-1", 1, "hook:r"))
        self.assertGreaterEqual(w["last_seen"], before - 1)
        self.assertIn('hookd_worker_last_seen_seconds{worker="cam-host-1"} %.3f' % w["last_seen"], text)


class RemoteConfigTest(unittest.TestCase):
    def test_remote_is_refused_where_jobs_keep_state_in_the_store(self):
        with tempfile.TemporaryDirectory() as tmp:
            problems = app_from(tmp, "[hookd]\nstate_dir = %s\n[iconik]\napp_id = a\nauth_token = t\n"
                                     "secret.key = s\nremote = true\n" % tmp).problems
        self.assertTrue(any("remote = true is not possible" in p for p in problems), problems)


if __name__ == "__main__":
    unittest.main()
