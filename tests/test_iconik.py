"""Tests for handlers/iconik.py: the per-asset state machine on a real sqlite, then the real daemon end to end.

Strategy: the pure parts (event classification, dedupe key, analyze path, state transitions inside one
transaction) are tested directly. Everything else goes through ``python3 hookd.py`` (tests/support.Daemon)
against tests/fake_iconik.FakeIconik on loopback: iconik's webhook deliveries come in with the custom secret
header, and the assertions count what reached the fake's analyze endpoint once every event is finished.
Each test uses fresh asset ids, so one daemon serves a whole class.
"""

import json
import os
import shutil
import signal
import sqlite3
import threading
import unittest

from handlers import iconik
from hookd_core.api import BadPayload
from tests import support
from tests.fake_iconik import FakeIconik, asset_created, deliver, envelope, proxy_event

SECRET = "s3cret-Header-Value-7f2c"
TOKEN = "auth-token-1"
ANALYZE = "/API/transcode/v1/analyze/assets/"


def config(fake, **extra):
    """A daemon config for ``fake``; ``extra`` adds/overrides [iconik] keys (dots written as __)."""
    keys = {"url": fake.url, "app_id": fake.app_id, "auth_token": TOKEN, "secret.header": "X-Hookd-Secret",
            "secret.key": SECRET}
    keys.update({k.replace("__", "."): v for k, v in extra.items()})
    lines = ["[hookd]", "workers = 4", "retry.base_delay = 0.05", "retry.max_delay = 0.2",
             "retry.max_attempts = 5", "", "[iconik]"] + ["%s = %s" % kv for kv in keys.items()]
    return "\n".join(lines) + "\n"


# -- pure parts ------------------------------------------------------------------------------------------

class ClassifyTest(unittest.TestCase):
    def test_create_takes_object_id_else_data_id(self):
        self.assertEqual(iconik.classify(envelope("assets", "entity", "create", "a-1", {"id": "a-2"})).asset_id,
                         "a-1")
        self.assertEqual(iconik.classify(envelope("assets", "entity", "create", None, {"id": "a-2"})).asset_id,
                         "a-2")

    def test_proxy_takes_data_asset_id_else_object_id(self):
        kind = iconik.classify(envelope("assets", "proxies", "update", "p-1", {"asset_id": "a-1",
                                                                                 "status": "CLOSED"}))
        self.assertEqual((kind.action, kind.asset_id, kind.proxy_status), ("proxy", "a-1", "CLOSED"))
        kind = iconik.classify(envelope("assets", "proxies", "create", "a-9", {"status": "OPEN"}))
        self.assertEqual((kind.action, kind.asset_id), ("proxy", "a-9"))

    def test_other_events(self):
        for event in (envelope("collections", "contents", "create", "c-1", {}),
                      envelope("assets", "shares", "create", "s-1", {}),
                      envelope("assets", "entity", "update", "a-1", {}),
                      envelope("assets", "proxies", "delete", "p-1", {})):
            self.assertEqual(iconik.classify(event).action, "other", event)

    def test_unsafe_or_missing_asset_id_is_rejected(self):
        for bad in (None, "", "../../users/v1/x", "a/b", "a?b=1", 42, "x" * 200):
            with self.assertRaises(BadPayload, msg=repr(bad)):
                iconik.classify(envelope("assets", "entity", "create", bad, {}))

    def test_dedupe_key_ignores_key_order_and_spacing_only(self):
        a = json.loads('{"a": 1, "b": {"c": 2}}')
        b = json.loads('{"b":{"c":2},"a":1}')
        self.assertEqual(iconik.canonical_key(a), iconik.canonical_key(b))
        self.assertNotEqual(iconik.canonical_key(a), iconik.canonical_key({"a": 1, "b": {"c": 3}}))

    def test_analyze_paths(self):
        self.assertEqual(iconik.analyze_path("a-1", ""), ANALYZE + "a-1/")
        self.assertEqual(iconik.analyze_path("a-1", "default"), ANALYZE + "a-1/profiles/default/")
        self.assertEqual(iconik.analyze_path("a-1", "p-7"), ANALYZE + "a-1/profiles/p-7/")


class StateMachineTest(unittest.TestCase):
    """Each transition in its own transaction on a real sqlite database, as store.write runs them."""

    def setUp(self):
        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        self.conn.executescript(iconik.SCHEMA)

    def step(self, fn, *args):
        self.conn.execute("BEGIN")
        result = fn(self.conn, *args)
        self.conn.execute("COMMIT")
        return result

    def state(self, asset_id):
        return self.conn.execute("SELECT state, proxy_ready FROM iconik_asset WHERE asset_id = ?",
                                 (asset_id,)).fetchone()

    def test_create_then_proxy_submits_once(self):
        self.assertIsNone(self.step(iconik.on_create, "a")[0])
        self.assertEqual(self.step(iconik.on_proxy_closed, "a")[0], "submit")
        self.step(iconik.finish, "a", "submitted", "ok")
        self.assertIsNone(self.step(iconik.on_proxy_closed, "a")[0])
        self.assertIsNone(self.step(iconik.on_create, "a")[0])
        self.assertEqual(self.state("a"), ("submitted", 1))

    def test_proxy_first_waits_for_create(self):
        self.assertIsNone(self.step(iconik.on_proxy_closed, "a")[0])
        self.assertIsNone(self.step(iconik.on_proxy_closed, "a")[0])
        self.assertEqual(self.state("a"), ("proxy_first", 1))
        self.assertEqual(self.step(iconik.on_create, "a")[0], "submit")

    def test_interrupted_submission_must_be_verified(self):
        self.step(iconik.on_create, "a")
        self.assertEqual(self.step(iconik.on_proxy_closed, "a")[0], "submit")
        # no finish: the attempt died after sending (network error, crash)
        self.assertEqual(self.step(iconik.on_proxy_closed, "a")[0], "verify")
        self.assertEqual(self.step(iconik.on_create, "a")[0], "verify")

    def test_refused_submission_goes_back_to_waiting(self):
        self.step(iconik.on_create, "a")
        self.step(iconik.on_proxy_closed, "a")
        self.step(iconik.finish, "a", "waiting", "HTTP 503")
        self.assertEqual(self.state("a"), ("waiting", 1))
        self.assertEqual(self.step(iconik.on_create, "a")[0], "submit")

    def test_gone_asset_is_never_submitted(self):
        self.step(iconik.on_create, "a")
        self.step(iconik.on_proxy_closed, "a")
        self.step(iconik.finish, "a", "gone", "404")
        self.assertIsNone(self.step(iconik.on_proxy_closed, "a")[0])


class CheckConfigTest(unittest.TestCase):
    def test_missing_and_bad_values_are_reported(self):
        d = support.Daemon("[iconik]\nurl = ftp://x\nsecret.header = X Bad\nanalyze.profile = ../x\n")
        self.addCleanup(shutil.rmtree, d.tmp, True)
        r = d.cli("check-config")
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        out = r.stdout + r.stderr
        for word in ("app_id is required", "auth_token is required", "secret.key is required",
                     "url must be", "secret.header must be", "analyze.profile must be"):
            self.assertIn(word, out)

    def test_good_section_passes(self):
        d = support.Daemon("[iconik]\napp_id = a\nauth_token = t\nsecret.key = k\n")
        self.addCleanup(shutil.rmtree, d.tmp, True)
        r = d.cli("check-config")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


class FakeIconikTest(unittest.TestCase):
    """The fake answers as upstreams.md §1.5 says, so the end-to-end tests below mean something."""

    def setUp(self):
        self.fake = FakeIconik()
        self.addCleanup(self.fake.close)
        self.auth = {"App-ID": self.fake.app_id, "Auth-Token": TOKEN, "Content-Type": "application/json"}

    def call(self, method, path, headers=None, body=b"{}"):
        status, _, raw = support.request(method, self.fake.url + path, body if method == "POST" else None,
                                         self.auth if headers is None else headers)
        return status, json.loads(raw)

    def test_analyze_needs_both_headers_and_a_known_asset(self):
        asset = self.fake.add_asset()
        path = ANALYZE + asset["id"] + "/"
        for headers in ({}, {"App-ID": self.fake.app_id}, {"Auth-Token": TOKEN},
                        dict(self.auth, **{"Auth-Token": "x"})):
            self.assertEqual(self.call("POST", path, headers), (401, {"errors": ["Token is invalid"]}))
        self.assertEqual(self.call("POST", ANALYZE + "no-such-asset/")[0], 404)
        status, job = self.call("POST", path + "profiles/default/")
        self.assertEqual((status, job["status"]), (201, "STARTED"))
        self.assertEqual(self.call("GET", "/API/assets/v1/assets/%s/" % asset["id"])[1]["analyze_status"],
                         "REQUESTED")

    def test_old_videointel_path_is_404(self):
        asset = self.fake.add_asset()
        status, _ = self.call("POST", "/API/transcode/v1/videointel/assets/%s/" % asset["id"])
        self.assertEqual(status, 404)
        self.assertEqual(self.fake.analyze_calls, [])

    def test_proxies_list(self):
        asset = self.fake.add_asset()
        proxy = self.fake.add_proxy(asset["id"])
        status, page = self.call("GET", "/API/files/v1/assets/%s/proxies/" % asset["id"])
        self.assertEqual((status, page["total"], page["objects"][0]["status"]), (200, 1, "CLOSED"))
        self.assertEqual(self.call("GET", "/API/files/v1/assets/%s/proxies/%s/" % (asset["id"], proxy["id"]))[0],
                         200)
        self.assertEqual(self.call("GET", "/API/files/v1/assets/nope/proxies/")[0], 404)


# -- end to end --------------------------------------------------------------------------------------------

class DaemonCase(unittest.TestCase):
    """One FakeIconik and one daemon for the class; ``extra`` holds [iconik] overrides."""
    extra = {}
    with_forward = False  # also configure the generic forward action to cls.forward

    @classmethod
    def setUpClass(cls):
        cls.fake = FakeIconik()
        cls.forward = support.FakeUpstream([(200, b"{}")])
        extra = dict(cls.extra, forward=cls.forward.url + "/fwd") if cls.with_forward else cls.extra
        cls.daemon = support.Daemon(config(cls.fake, **extra)).start()

    @classmethod
    def tearDownClass(cls):
        try:
            cls.daemon.stop()
        finally:
            cls.fake.close()
            cls.forward.close()
            shutil.rmtree(cls.daemon.tmp, ignore_errors=True)

    def send(self, event, secret=SECRET, **kw):
        headers = {"X-Hookd-Secret": secret} if secret is not None else {}
        return deliver(self.daemon.url + "/iconik", event, headers, **kw)

    def send_ok(self, event, **kw):
        """Deliver, expect 202 queued, return the new event id."""
        status, _, body = self.send(event, **kw)
        self.assertEqual(status, 202, body)
        answer = json.loads(body)
        self.assertEqual(answer["status"], "queued")
        return answer["id"]

    def done(self, *ids):
        return [self.daemon.wait_status(i, ("done", "dead")) for i in ids]

    def created_and_closed(self):
        """A new asset in the fake with one CLOSED proxy: (asset, create event, proxy event)."""
        asset = self.fake.add_asset()
        proxy = self.fake.add_proxy(asset["id"], "CLOSED")
        return asset, asset_created(asset), proxy_event(proxy)


class IconikEndToEndTest(DaemonCase):
    with_forward = True

    def test_wrong_or_missing_secret_is_401_and_nothing_stored(self):
        asset, create, _ = self.created_and_closed()
        before = len(self.daemon.events())
        for secret in ("wrong", None, SECRET + "x", SECRET[:-1], ""):
            status, _, _ = self.send(create, secret=secret)
            self.assertEqual(status, 401, secret)
        self.assertEqual(len(self.daemon.events()), before)
        self.assertEqual(self.fake.analyze_paths(asset["id"]), [])
        self.assertNotIn(SECRET, self.daemon.log())

    def test_create_then_closed_proxy_analyzes_once_with_both_headers(self):
        asset, create, proxy = self.created_and_closed()
        ids = [self.send_ok(create), self.send_ok(proxy)]
        self.assertEqual([e["status"] for e in self.done(*ids)], ["done", "done"])
        calls = [r for r in self.fake.analyze_calls if asset["id"] in r.path]
        self.assertEqual([r.path for r in calls], [ANALYZE + asset["id"] + "/"])
        self.assertEqual(calls[0].headers.get("app-id"), self.fake.app_id)
        self.assertEqual(calls[0].headers.get("auth-token"), TOKEN)
        self.assertEqual(calls[0].headers.get("content-type"), "application/json")
        self.assertEqual(self.fake.assets[asset["id"]]["analyze_status"], "REQUESTED")
        self.assertEqual(self.fake.count("/API/transcode/v1/videointel/"), 0)
        stored = self.daemon.event(ids[1])
        self.assertEqual(stored["note"], "analysis submitted (HTTP 201)")
        self.assertNotIn("x-hookd-secret", {k.lower() for k in stored.get("headers") or {}})
        self.assertNotIn(SECRET, json.dumps(stored))

    def test_three_identical_proxy_deliveries_are_duplicates(self):
        asset, create, proxy = self.created_and_closed()
        first = self.send_ok(create)
        body = json.dumps(proxy).encode()
        answers = [self.send(body) for _ in range(3)]
        self.assertEqual(answers[0][0], 202)
        for status, _, raw in answers[1:]:
            self.assertIn(status, (200, 202))
            self.assertEqual(json.loads(raw)["status"], "duplicate")
        self.done(first, json.loads(answers[0][2])["id"])
        self.assertEqual(len(self.fake.analyze_paths(asset["id"])), 1)

    def test_three_distinct_closed_proxy_events_analyze_once(self):
        asset, create, _ = self.created_and_closed()
        proxies = [proxy_event(self.fake.add_proxy(asset["id"]), op) for op in ("create", "update", "update")]
        ids = [self.send_ok(create)] + [self.send_ok(p) for p in proxies]
        self.assertEqual({e["status"] for e in self.done(*ids)}, {"done"})
        self.assertEqual(len(self.fake.analyze_paths(asset["id"])), 1)

    def test_proxy_before_create_analyzes_once_the_create_arrives(self):
        asset, create, proxy = self.created_and_closed()
        self.done(self.send_ok(proxy), self.send_ok(proxy_event(self.fake.add_proxy(asset["id"]))))
        self.assertEqual(self.fake.analyze_paths(asset["id"]), [])
        self.done(self.send_ok(create))
        self.assertEqual(self.fake.analyze_paths(asset["id"]), [ANALYZE + asset["id"] + "/"])

    def test_concurrent_burst_for_one_asset_analyzes_once(self):
        asset, create, _ = self.created_and_closed()
        events = [create] + [proxy_event(self.fake.add_proxy(asset["id"])) for _ in range(5)]
        ids = []

        def one(event):
            ids.append(self.send_ok(event))
        threads = [threading.Thread(target=one, args=(e,)) for e in reversed(events)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(len(ids), 6)
        self.assertEqual({e["status"] for e in self.done(*ids)}, {"done"})
        self.assertEqual(len(self.fake.analyze_paths(asset["id"])), 1)

    def test_proxy_not_closed_submits_nothing(self):
        asset = self.fake.add_asset()
        growing = proxy_event(self.fake.add_proxy(asset["id"], "OPEN"), "create")
        self.done(self.send_ok(asset_created(asset)), self.send_ok(growing))
        self.assertEqual(self.fake.analyze_paths(asset["id"]), [])
        closed = dict(growing, operation="update", data=dict(growing["data"], status="CLOSED"))
        self.done(self.send_ok(closed))
        self.assertEqual(len(self.fake.analyze_paths(asset["id"])), 1)

    def test_503_503_201_is_done_after_retries(self):
        asset, create, proxy = self.created_and_closed()
        self.fake.fail_analyze(503, 503)
        self.done(self.send_ok(create))
        event = self.done(self.send_ok(proxy))[0]
        self.assertEqual((event["status"], event["attempts"]), ("done", 3), event)
        self.assertEqual(self.fake.count(ANALYZE + asset["id"]), 3)
        self.assertEqual(len(self.fake.analyze_paths(asset["id"])), 1)

    def test_lost_reply_is_checked_not_posted_again(self):
        asset, create, proxy = self.created_and_closed()
        self.fake.fail_analyze("drop")
        self.done(self.send_ok(create))
        event = self.done(self.send_ok(proxy))[0]
        self.assertEqual(event["status"], "done", event)
        self.assertGreaterEqual(event["attempts"], 2)
        self.assertEqual(self.fake.count(ANALYZE + asset["id"]), 1)
        self.assertEqual(self.fake.count("/API/assets/v1/assets/%s/" % asset["id"]), 1)

    def test_deleted_asset_is_done_with_a_note(self):
        asset = {"id": "0d56db81-0000-4000-8000-00000000dead", "title": "gone"}
        proxy = proxy_event({"id": "p-gone", "asset_id": asset["id"], "status": "CLOSED"})
        ids = [self.send_ok(asset_created(asset)), self.send_ok(proxy)]
        self.assertEqual([e["status"] for e in self.done(*ids)], ["done", "done"])
        self.assertEqual(self.fake.count(ANALYZE + asset["id"]), 1)
        self.assertIn("not found", self.daemon.event(ids[1])["note"])

    def test_other_events_are_stored_and_touch_no_api(self):
        before = len(self.fake.seen)
        events = [envelope("collections", "contents", "create", "7f1ad7f0-c715-11ec-972a-32f3401f5ebb",
                           {"collection_id": "8ae2", "object_id": "0d56db81", "object_type": "assets"}),
                  envelope("assets", "shares", "create", "s-1", {"id": "s-1", "object_id": "a-1"})]
        ids = [self.send_ok(e) for e in events]
        self.assertEqual([e["status"] for e in self.done(*ids)], ["done", "done"])
        self.assertEqual([e["route"] for e in self.daemon.events() if e["id"] in ids], ["iconik"] * 2)
        self.assertEqual(len(self.fake.seen), before)
        forwarded = [r.json() for r in list(self.forward.seen)]
        for event in events:
            self.assertIn(event, forwarded)

    def test_bad_bodies_are_refused_and_not_stored(self):
        before = len(self.daemon.events())
        cases = [(b"not json", 400), (b"[1, 2]", 422),
                 (json.dumps(envelope("assets", "entity", "create", None, {})).encode(), 422),
                 (json.dumps(envelope("assets", "entity", "create", "../../x", {})).encode(), 422)]
        for body, want in cases:
            self.assertEqual(self.send(body)[0], want, body)
        self.assertEqual(len(self.daemon.events()), before)

    def test_chunked_delivery_is_accepted(self):
        asset, create, proxy = self.created_and_closed()
        ids = [self.send_ok(create, chunked=True), self.send_ok(proxy, chunked=True)]
        self.done(*ids)
        self.assertEqual(len(self.fake.analyze_paths(asset["id"])), 1)

    def test_state_table_records_the_submission(self):
        asset, create, proxy = self.created_and_closed()
        self.done(self.send_ok(create), self.send_ok(proxy))
        rows = []
        for name in os.listdir(self.daemon.state_dir):
            if name.endswith((".db", ".sqlite", ".sqlite3")):
                with sqlite3.connect(os.path.join(self.daemon.state_dir, name)) as conn:
                    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'iconik_asset'").fetchone():
                        rows += conn.execute("SELECT state, proxy_ready, submitted_at FROM iconik_asset "
                                             "WHERE asset_id = ?", (asset["id"],)).fetchall()
        self.assertEqual(len(rows), 1, rows)
        self.assertEqual(rows[0][:2], ("submitted", 1))
        self.assertTrue(rows[0][2])


class DefaultProfileTest(DaemonCase):
    extra = {"analyze__profile": "default"}

    def test_default_profile_path(self):
        asset, create, proxy = self.created_and_closed()
        self.done(self.send_ok(create), self.send_ok(proxy))
        self.assertEqual(self.fake.analyze_paths(asset["id"]), [ANALYZE + asset["id"] + "/profiles/default/"])


class CustomProfileTest(DaemonCase):
    extra = {"analyze__profile": "a1b2c3d4-0000-4000-8000-000000000001"}

    def test_custom_profile_path(self):
        asset, create, proxy = self.created_and_closed()
        self.done(self.send_ok(create), self.send_ok(proxy))
        self.assertEqual(self.fake.analyze_paths(asset["id"]),
                         [ANALYZE + asset["id"] + "/profiles/a1b2c3d4-0000-4000-8000-000000000001/"])


class WrongTokenTest(DaemonCase):
    extra = {"auth_token": "not-the-token-9c1e"}

    def test_401_is_dead_at_once_with_a_clear_error(self):
        asset, create, proxy = self.created_and_closed()
        self.done(self.send_ok(create))
        event = self.done(self.send_ok(proxy))[0]
        self.assertEqual((event["status"], event["attempts"]), ("dead", 1), event)
        self.assertIn("token", event["last_error"])
        self.assertEqual(self.fake.count(ANALYZE + asset["id"]), 1)
        self.assertNotIn("not-the-token-9c1e", self.daemon.log())


class TokenFixedTest(DaemonCase):
    """The operator's way out of a dead event: fix the token, reload (SIGHUP), `hookd retry ID`."""
    extra = {"auth_token": "not-the-token-9c1e"}

    def test_after_fixing_the_token_a_retry_submits(self):
        asset, create, proxy = self.created_and_closed()
        self.done(self.send_ok(create))
        dead = self.send_ok(proxy)
        self.assertEqual(self.done(dead)[0]["status"], "dead")
        with open(self.daemon.config_path) as f:
            text = f.read()
        with open(self.daemon.config_path, "w") as f:
            f.write(text.replace("not-the-token-9c1e", TOKEN))
        self.daemon.signal(signal.SIGHUP)
        self.daemon.wait_log("reload")
        r = self.daemon.cli("retry", str(dead))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        support.wait_until(lambda: self.fake.analyze_paths(asset["id"]), 10, message="analyze after retry")
        self.assertEqual(self.done(dead)[0]["status"], "done")
        self.assertEqual(len(self.fake.analyze_paths(asset["id"])), 1)


if __name__ == "__main__":
    unittest.main()
