"""End-to-end tests of the Preservica integration: the real daemon, a loopback Preservica, a loopback Teams.

Strategy: each class starts one ``hookd.py`` subprocess (tests/support.Daemon) with a ``[preservica]``
section pointing at ``FakePreservica`` (tests/fake_preservica.py, upstreams.md §2.7), and drives it the
way Preservica does: the challenge handshake, chunked and Content-Length deliveries signed over
``"preservica-webhook-auth" + body``. Side effects are checked where they land: the stored events (CLI
``--json``), the thumbnail files, the fake's request log and the Teams cards received. Retry delays are
tiny so retried paths finish in well under a second.
"""

import json
import os
import sqlite3
import sys
import tempfile
import time
import unittest
import urllib.parse
import uuid

from tests import fake_preservica as fp
from tests.fake_teams import FakeTeams
from tests.support import Daemon, hmac_hex, post, raw_exchange, wait_until
from tests.support import request as support_request

SECRET = "my_shared_secret"
PASSWORD = "hunter2-preservica"
FAST = """[hookd]
workers = 3
retry.base_delay = 0.05
retry.max_delay = 0.2
retry.max_attempts = 3
"""


def new_ref():
    return str(uuid.uuid4())


def read_database(daemon, fn):
    """``fn(connection)`` on the daemon's database, read-only."""
    db = sqlite3.connect("file:%s?mode=ro" % os.path.join(daemon.state_dir, "hookd.sqlite3"), uri=True)
    try:
        return fn(db)
    finally:
        db.close()


def delivery_bytes(body):
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def login(fake, password=PASSWORD):
    """A token from the fake, as pyPreservica gets one."""
    status, _, body = post(fake.url + "/api/accesstoken/login",
                           urllib.parse.urlencode({"username": "hookd", "password": password,
                                                   "tenant": "DEMO"}),
                           {"Content-Type": "application/x-www-form-urlencoded"})
    return json.loads(body.decode("utf-8")).get("token") if status == 200 else None


def request_json(fake, method, path, token, doc=None):
    headers = {"Preservica-Access-Token": token or "", "Content-Type": "application/json"}
    body = json.dumps(doc).encode("utf-8") if doc is not None else None
    return support_request(method, fake.url + path, body, headers)


class FakeSelfTest(unittest.TestCase):
    """The fake itself answers as upstreams.md §2.5-2.7 says (no daemon needed)."""

    @classmethod
    def setUpClass(cls):
        cls.fake = fp.FakePreservica()
        cls.fake.thumbnails["r1"] = (b"\x89PNG fake", "image/png")

    @classmethod
    def tearDownClass(cls):
        cls.fake.close()

    def test_login_and_thumbnail(self):
        self.assertIsNone(login(self.fake, password="nope"))
        token = login(self.fake, password="pw")
        self.assertTrue(token)
        status, headers, body = support_request(
            "GET", self.fake.url + "/api/content/thumbnail?id=sdb%3AIO%7Cr1&size=large", None,
            {"Preservica-Access-Token": token})
        self.assertEqual((status, headers["content-type"], body), (200, "image/png", b"\x89PNG fake"))
        for query, expected in (("id=sdb%3AIO%7Cr9&size=large", 404), ("id=sdb%3AIO%7Cr1&size=huge", 400),
                                ("id=r1&size=large", 400)):
            status, _, _ = support_request("GET", self.fake.url + "/api/content/thumbnail?" + query, None,
                                           {"Preservica-Access-Token": token})
            self.assertEqual(status, expected, query)
        status, _, _ = support_request("GET", self.fake.url + "/api/content/thumbnail?id=sdb%3AIO%7Cr1"
                                       "&size=large", None, {"Preservica-Access-Token": "stale"})
        self.assertEqual(status, 401)

    def test_token_expiry(self):
        token = login(self.fake, password="pw")
        self.fake.expire_tokens()
        status, _, _ = request_json(self.fake, "GET", "/api/webhook/subscriptions", token)
        self.assertEqual(status, 401)


class PreservicaCase(unittest.TestCase):
    """One daemon per class; subclasses give ``section(cls)``."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="hookd-preservica-")
        cls.fake = fp.FakePreservica(username="hookd", password=PASSWORD, tenant="DEMO")
        cls.teams = FakeTeams()
        cls.thumbs = os.path.join(cls.tmp.name, "thumbs")
        cls.d = Daemon(FAST + cls.section(), tmpdir=cls.tmp.name).start()
        cls.url = cls.d.url + "/preservica"

    @classmethod
    def tearDownClass(cls):
        try:
            cls.d.stop()
        finally:
            cls.fake.close()
            cls.teams.close()
            cls.tmp.cleanup()

    @classmethod
    def section(cls):
        return "[preservica]\nsecret.key = %s\n" % SECRET

    def deliver(self, events, **kw):
        status, headers, body = fp.deliver(self.url, SECRET, fp.envelope(events), **kw)
        self.assertEqual(status, 202, body)
        doc = json.loads(body.decode("utf-8"))
        self.assertEqual(doc["status"], "queued")
        return doc["ids"]

    def deliver_one(self, ref, entity_type="IO"):
        return self.deliver([fp.io_event(ref, entity_type=entity_type)])[0]

    def cards_about(self, ref):
        """The valid Teams cards received that mention ``ref``, as (kind, document)."""
        return [(kind, doc) for kind, doc in list(self.teams.cards) if ref in json.dumps(doc)]


class IntakeTest(PreservicaCase):
    """Handshake and deliveries with no actions: store and log only."""

    def test_challenge_worked_example(self):
        status, headers, body = post(self.url + "?challengeCode=abc123", b"")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"].split(";")[0], "application/json")
        self.assertEqual(json.loads(body.decode("utf-8")), {
            "challengeCode": "abc123",
            "challengeResponse": "8ecc163a3d4079d2f3eb2c5f36ed1c5c9e855a42477fb81d24fded7cad766946"})
        self.assertEqual(body, json.dumps(json.loads(body.decode("utf-8"))).encode("utf-8"))

    def test_bodiless_challenge_as_curl_sends_it(self):
        """``curl -X POST '.../preservica?challengeCode=abc123'``: neither Content-Length nor
        Transfer-Encoding (the way docs/preservica.md shows it, and Preservica may send it) is 200."""
        port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        head = ("POST /preservica?challengeCode=abc123 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                "User-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n" % port).encode("ascii")
        status, headers, body = raw_exchange("127.0.0.1", port, head)
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body.decode("utf-8"))["challengeResponse"],
                         "8ecc163a3d4079d2f3eb2c5f36ed1c5c9e855a42477fb81d24fded7cad766946")
        self.assertEqual(headers.get("connection"), "close")  # nothing after it is read as a request
        no_code = head.replace(b"?challengeCode=abc123", b"")
        self.assertEqual(raw_exchange("127.0.0.1", port, no_code)[0], 401)  # a delivery must be signed

    def test_challenge_comes_before_any_signature_check(self):
        status, _, body = post(self.url + "?challengeCode=x%22y", b"{}",
                               {"Preservica-Signature": "00" * 32}, chunked=True)
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body.decode("utf-8")),
                         {"challengeCode": 'x"y', "challengeResponse": hmac_hex(SECRET, 'x"y')})

    def test_fake_preservica_subscribes_through_the_handshake(self):
        self.assertEqual(fp.challenge(self.url, SECRET), (True, "ok"))
        self.assertEqual(fp.challenge(self.url, "another secret"), (False, "wrong challengeResponse"))

    def test_subscribe_call_on_the_fake_runs_the_handshake_against_hookd(self):
        token = login(self.fake)
        for secret, expected in ((SECRET, 200), ("wrong", 400)):
            status, _, body = request_json(self.fake, "POST", "/api/webhook/subscriptions", token, {
                "url": self.url, "triggerType": "FULL_TEXT_INDEXED", "secret": secret,
                "includeIdentifiers": "true"})
            self.assertEqual(status, expected, body)
        self.assertEqual(len(self.fake.subscriptions), 1)

    def test_challenge_is_not_a_signing_oracle(self):
        forged = b'{"events":[{"entityRef":"x","entityType":"IO"}]}'
        code = "preservica-webhook-auth" + forged.decode("ascii")
        status, _, _ = fp._send(self.url + "?challengeCode=" + urllib.parse.quote(code), b"",
                                {}, None, 10)
        self.assertEqual(status, 400)

    def test_chunked_delivery_becomes_one_job_per_event(self):
        refs = [new_ref(), new_ref()]
        ids = self.deliver([fp.io_event(refs[0]), fp.io_event(refs[1], entity_type="SO")], chunk_size=16)
        self.assertEqual(len(ids), 2)
        for event_id, ref in zip(ids, refs):
            ev = self.d.wait_status(event_id, "done")
            self.assertEqual(ev["route"], "preservica")
            self.assertEqual(ev["payload"]["event"]["entityRef"], ref)
            self.assertEqual(ev["payload"]["subscriptionId"], "4583e1e6d2c72ed96a1151bc7dfd53c2")
            self.assertEqual(ev["payload"]["trigger"], "FULL_TEXT_INDEXED")
            self.assertNotIn("events", ev["payload"])

    def test_content_length_delivery(self):
        ref = new_ref()
        event_id = self.deliver([fp.io_event(ref)], chunked=False)[0]
        self.assertEqual(self.d.wait_status(event_id, "done")["payload"]["event"]["entityRef"], ref)

    def test_non_ascii_body_split_inside_a_character(self):
        for chunked in (True, False):
            ev = fp.io_event(new_ref(), batch="東京 café Ærø")
            event_id = self.deliver([ev], chunked=chunked, split_multibyte=chunked)[0]
            stored = self.d.wait_status(event_id, "done")["payload"]["event"]
            self.assertEqual(stored["identifiers"], [{"BatchId": "東京 café Ærø"}])

    def test_optional_fields_may_be_missing(self):
        ref = new_ref()
        body = {"subscriptionId": "s1", "events": [{"entityType": "IO", "entityRef": ref}]}
        status, _, reply = fp.deliver(self.url, SECRET, body)
        self.assertEqual(status, 202, reply)
        event_id = json.loads(reply.decode("utf-8"))["id"]
        self.assertEqual(self.d.wait_status(event_id, "done")["payload"]["event"]["entityRef"], ref)

    def test_redelivery_is_a_duplicate(self):
        body = fp.envelope([fp.io_event(new_ref())])
        first = fp.deliver(self.url, SECRET, body)
        again = fp.deliver(self.url, SECRET, body, chunked=False)
        self.assertEqual(first[0], 202)
        self.assertIn(again[0], (200, 202))
        self.assertEqual(json.loads(again[2].decode("utf-8"))["status"], "duplicate")

    def test_a_redelivered_element_is_a_duplicate_and_the_new_one_beside_it_is_queued(self):
        """Dedupe is per element: the same envelope again with the first element unchanged and a second
        one added stores the second as new and the first as a duplicate of the first delivery's."""
        first, second = fp.io_event(new_ref()), fp.io_event(new_ref())
        stamp = "2026-11-30T07:44:00.123Z"
        status, _, reply = fp.deliver(self.url, SECRET, fp.envelope([first], timestamp=stamp))
        self.assertEqual(status, 202, reply)
        [original] = json.loads(reply.decode("utf-8"))["ids"]
        status, _, reply = fp.deliver(self.url, SECRET, fp.envelope([first, second], timestamp=stamp), chunked=False)
        self.assertEqual(status, 202, reply)
        doc = json.loads(reply.decode("utf-8"))
        self.assertEqual((doc["status"], doc["ids"][0]), ("queued", original))
        added = doc["ids"][1]
        self.assertGreater(added, original)
        self.assertEqual(self.d.wait_status(added, "done")["payload"]["event"]["entityRef"], second["entityRef"])
        duplicates = [e for e in self.d.events("--status", "duplicate") if e["id"] > original]
        self.assertEqual(len(duplicates), 1)
        self.assertEqual(self.d.event(duplicates[0]["id"])["duplicate_of"], original)

    def test_a_delivery_stores_one_dedupe_key_and_a_later_one_is_judged_by_element(self):
        """A new delivery of 4 events stores one dedupe key (the delivery's), not one per element; the
        same message again with its second element replaced stores that one and marks the others
        duplicates of the stored ones."""
        stamp = "2026-11-30T10:41:00.456Z"
        events = [fp.io_event(new_ref()) for _ in range(4)]
        status, _, reply = fp.deliver(self.url, SECRET, fp.envelope(events, timestamp=stamp))
        self.assertEqual(status, 202, reply)
        ids = json.loads(reply.decode("utf-8"))["ids"]
        keys = read_database(self.d, lambda db: [db.execute("SELECT dedupe_key FROM events WHERE id=?",
                                                            (i,)).fetchone()[0] for i in ids])
        self.assertEqual(sum(k is not None for k in keys), 1, keys)
        fresh = fp.io_event(new_ref())
        status, _, reply = fp.deliver(self.url, SECRET, fp.envelope([events[0], fresh] + events[2:], timestamp=stamp))
        self.assertEqual(status, 202, reply)
        again = json.loads(reply.decode("utf-8"))["ids"]
        self.assertEqual([again[0]] + again[2:], [ids[0]] + ids[2:])
        self.assertNotIn(again[1], ids)
        self.assertEqual(self.d.wait_status(again[1], "done")["payload"]["event"]["entityRef"], fresh["entityRef"])

    def test_a_deeply_nested_delivery_sent_again_is_a_duplicate(self):
        """The writer takes a redelivery apart on a deeper stack than the request thread that accepted it:
        an element nested as deep as the request thread could parse still makes the same bytes again a
        duplicate (it was stored again, with no key, when the writer could not parse it)."""
        accepted = 0
        for depth in range(940, 1000, 3):
            deep = '{"a":' * depth + "1" + "}" * depth
            raw = ('{"subscriptionId": "s", "timestamp": "2026-11-30T11:%02d:00Z", "trigger": "MOVED", "events":'
                   ' [{"entityRef": "%s", "entityType": "IO", "deep": %s}]}' % (depth % 60, new_ref(), deep)).encode()
            first = fp.deliver(self.url, SECRET, raw, chunked=False)
            if first[0] != 202:
                continue  # deeper than the request thread parses: refused, nothing to redeliver
            accepted += 1
            again = fp.deliver(self.url, SECRET, raw, chunked=False)
            self.assertEqual(json.loads(again[2].decode("utf-8"))["status"], "duplicate", depth)
            self.assertEqual(json.loads(again[2].decode("utf-8"))["id"], json.loads(first[2].decode("utf-8"))["id"])
        self.assertGreater(accepted, 0, "no depth was accepted: nothing was tested")

    def test_wrong_shapes_are_refused_and_not_stored(self):
        before = len(self.d.events())
        cases = [(b"not json", 400), (b'{"events": {}}', 422), (b'[1, 2]', 422),
                 (b'{"events": [{"entityType": "IO"}]}', 422), (b'{"events": ["x"]}', 422)]
        for body, expected in cases:
            status, _, _ = fp.deliver(self.url, SECRET, body)
            self.assertEqual(status, expected, body)
        status, _, _ = fp.deliver(self.url, SECRET, b'{"events":[]}')
        self.assertEqual(status, 200)
        too_many = fp.envelope([fp.io_event("r%d" % i) for i in range(1001)])
        self.assertEqual(fp.deliver(self.url, SECRET, too_many, chunk_size=65536)[0], 422)
        self.assertEqual(len(self.d.events()), before)

    def test_a_delivery_is_stored_once_not_once_per_event(self):
        """SPEC §5.1: a signed 1 MiB delivery of 250 events adds at most ~3 MiB to database + WAL, and
        each of its 250 jobs still sees the envelope's fields plus its own element."""
        refs = [new_ref() for _ in range(250)]
        body = fp.envelope([fp.io_event(ref, batch="b" * 200) for ref in refs])
        body["note"] = ""
        body["note"] = "n" * (1040000 - len(delivery_bytes(body)))  # a big envelope field: ~1 MiB in all
        raw = delivery_bytes(body)
        self.assertGreater(len(raw), 1000000)
        before = self.database_bytes()
        status, _, reply = fp.deliver(self.url, SECRET, raw, chunked=False)
        self.assertEqual(status, 202, reply[:200])
        ids = json.loads(reply.decode("utf-8"))["ids"]
        self.assertEqual(len(ids), 250)
        grown = self.database_bytes() - before
        self.assertLessEqual(grown, 3 << 20, "one 1 MiB delivery grew database + WAL by %d bytes" % grown)
        for i in (0, 137, 249):
            ev = self.d.event(ids[i])
            self.assertEqual(ev["payload"]["event"]["entityRef"], refs[i])
            self.assertEqual(len(ev["payload"]["note"]), len(body["note"]))
            self.assertNotIn("events", ev["payload"])

    def database_bytes(self):
        """Size of the database file and its WAL now."""
        total = 0
        for name in os.listdir(self.d.state_dir):
            if name.startswith("hookd.sqlite3"):
                total += os.path.getsize(os.path.join(self.d.state_dir, name))
        return total


class UpgradeTest(unittest.TestCase):
    """A delivery stored by the version before one key per delivery (one key per element) is still
    recognised when Preservica sends it again after the upgrade."""

    def test_a_delivery_stored_with_a_key_per_element_is_a_duplicate_after_the_upgrade(self):
        import hashlib
        from hookd_core.store import Store
        with tempfile.TemporaryDirectory(prefix="hookd-preservica-") as tmp:
            state = os.path.join(tmp, "var")
            events = [fp.io_event(new_ref()) for _ in range(3)]
            body = fp.envelope(events, timestamp="2026-11-30T09:00:00.000Z")
            raw = delivery_bytes(body)
            base = json.dumps([body["subscriptionId"], body["timestamp"], body["trigger"]])  # 6b547b0's recipe
            keys = ["pv:%s:%s" % (body["timestamp"], hashlib.sha256(("%s\0%d\0%s\0%s\0%s" % (
                base, i, e.get("entityRef"), e.get("entityType"), e.get("event"))).encode()).hexdigest()[:32])
                for i, e in enumerate(events)]
            old = Store(os.path.join(state, "hookd.sqlite3"))
            try:
                stored = old.add_events("preservica", [
                    {"dedupe_key": key, "serial_key": "preservica:" + e["entityRef"], "headers": "{}",
                     "content_type": "application/json", "body": raw, "element": i, "done": True}
                    for i, (key, e) in enumerate(zip(keys, events))])
            finally:
                old.close()
            d = Daemon("[preservica]\nsecret.key = %s\n" % SECRET, tmpdir=tmp, state_dir=state).start()
            try:
                status, _, reply = fp.deliver(d.url + "/preservica", SECRET, raw)
                doc = json.loads(reply.decode("utf-8"))
                self.assertEqual((doc["status"], doc["ids"]), ("duplicate", [i for i, _ in stored]), doc)
            finally:
                d.stop()


class RejectTest(PreservicaCase):
    """Missing or wrong signatures: 401 and nothing stored."""

    def test_bad_and_missing_signatures_are_401_and_nothing_is_stored(self):
        body = fp.envelope([fp.io_event(new_ref())])
        raw = delivery_bytes(body)
        wrong = fp.sign("not the secret", b"preservica-webhook-auth" + raw)
        unprefixed = fp.sign(SECRET, raw)
        for sig in (wrong, unprefixed, "", "zz", wrong.upper()[:-1]):
            for chunked in (True, False):
                status, _, _ = fp.deliver(self.url, SECRET, raw, chunked=chunked, signature=sig)
                self.assertEqual(status, 401, (sig, chunked))
        self.assertEqual(self.d.events(), [])
        self.assertNotIn(wrong, self.d.log())

    def test_signature_over_different_bytes_is_401(self):
        raw = delivery_bytes(fp.envelope([fp.io_event(new_ref(), batch="café")]))
        latin1 = raw.decode("utf-8").encode("latin-1")  # pyPreservica's encoding: other bytes, other HMAC
        sig = fp.sign(SECRET, b"preservica-webhook-auth" + latin1)
        status, _, _ = fp.deliver(self.url, SECRET, raw, signature=sig)
        self.assertEqual(status, 401)
        self.assertEqual(self.d.events(), [])


class CheckConfigTest(unittest.TestCase):
    def test_preservica_without_secret_key_is_a_problem_line(self):
        # the handler prepares its signature key when it is built, which check-config does for a section
        # whose secret.key is missing too: that is a problem line and exit 1, never a traceback
        r = Daemon("[preservica]\nserver = https://eu.preservica.com\n").cli("check-config")
        self.assertEqual((r.returncode, r.stderr), (1, ""))
        self.assertIn("[preservica] secret.key is required", r.stdout.splitlines())


class ThumbnailKeepDaysTest(PreservicaCase):
    """thumbnail.keep_days: the daily prune (which also runs once at start) deletes older thumbnails."""

    @classmethod
    def section(cls):
        os.makedirs(cls.thumbs)
        for name, age_days in (("old-ref.jpg", 3), ("old-ref2.png", 3), ("new-ref.jpg", 0), ("keep.txt", 3)):
            with open(os.path.join(cls.thumbs, name), "wb") as f:
                f.write(b"x")
            stamp = time.time() - age_days * 86400
            os.utime(os.path.join(cls.thumbs, name), (stamp, stamp))
        return ("[preservica]\nsecret.key = %s\nserver = %s\nusername = hookd\npassword = %s\n"
                "actions = thumbnail\nthumbnail.dir = %s\nthumbnail.keep_days = 1\n"
                % (SECRET, cls.fake.url, PASSWORD, cls.thumbs))

    def test_daily_prune_deletes_thumbnails_older_than_keep_days(self):
        # the prune deletes one file at a time: wait for the whole listing, not for the first file
        wait_until(lambda: sorted(os.listdir(self.thumbs)) == ["keep.txt", "new-ref.jpg"], 10,
                   message="both old thumbnails to be pruned, the new one and keep.txt kept")
        wait_until(lambda: "pruned 2 thumbnails older than 1 days" in self.d.log(), 10,
                   message="the prune's log line")


class LowDiskThumbnailTest(PreservicaCase):
    """Below min_free_mb a thumbnail waits (retried later); the delivery itself is still accepted."""

    @classmethod
    def section(cls):
        return ("min_free_mb = 900000000\n[preservica]\nsecret.key = %s\nserver = %s\nusername = hookd\n"
                "password = %s\nactions = thumbnail\nthumbnail.dir = %s\n"
                % (SECRET, cls.fake.url, PASSWORD, cls.thumbs))

    def test_thumbnail_waits_for_space(self):
        ref = new_ref()
        self.fake.thumbnails[ref] = (b"\xff\xd8\xff jpeg", "image/jpeg")
        event = self.d.wait_status(self.deliver_one(ref), ("retry", "dead"))
        self.assertIn("min_free_mb", event["last_error"])
        self.assertEqual(self.fake.thumbnail_ids, [])
        self.assertFalse(os.path.exists(self.thumbs) and os.listdir(self.thumbs))


class ThumbnailTest(PreservicaCase):
    """``actions = thumbnail`` against the fake Preservica."""

    @classmethod
    def section(cls):
        cls.png, cls.jpg = fp.make_images()
        return ("[preservica]\nsecret.key = %s\nserver = %s\nusername = hookd\npassword = %s\n"
                "tenant = DEMO\nactions = thumbnail\nthumbnail.size = medium\nthumbnail.dir = %s\n"
                % (SECRET, cls.fake.url, PASSWORD, cls.thumbs))

    def thumb(self, name):
        return os.path.join(self.thumbs, name)

    def test_jpeg_written_with_the_exact_bytes(self):
        ref = new_ref()
        self.fake.thumbnails[ref] = (self.jpg, "image/jpeg")
        self.d.wait_status(self.deliver_one(ref), "done")
        with open(self.thumb(ref + ".jpg"), "rb") as f:
            self.assertEqual(f.read(), self.jpg)
        self.assertIn(("sdb:IO|%s" % ref, "medium"), self.fake.thumbnail_ids)
        self.assertEqual([n for n in os.listdir(self.thumbs) if n.startswith(".tmp")], [])

    def test_png_named_by_content_type(self):
        ref = new_ref()
        self.fake.thumbnails[ref] = (self.png, "image/png")
        self.d.wait_status(self.deliver_one(ref), "done")
        with open(self.thumb(ref + ".png"), "rb") as f:
            self.assertEqual(f.read(), self.png)
        self.assertFalse(os.path.exists(self.thumb(ref + ".jpg")))

    def test_folder_uses_sdb_so(self):
        ref = new_ref()
        self.fake.thumbnails[ref] = (self.png, "image/png")
        self.d.wait_status(self.deliver_one(ref, entity_type="SO"), "done")
        self.assertIn(("sdb:SO|%s" % ref, "medium"), self.fake.thumbnail_ids)
        self.assertTrue(os.path.exists(self.thumb(ref + ".png")))

    def test_unknown_reference_is_done_without_a_file(self):
        ref = new_ref()
        ev = self.d.wait_status(self.deliver_one(ref), "done")
        self.assertEqual(ev["attempts"], 1)
        self.assertIn(("sdb:IO|%s" % ref, "medium"), self.fake.thumbnail_ids)
        self.assertFalse([n for n in os.listdir(self.thumbs) if n.startswith(ref)] if
                         os.path.isdir(self.thumbs) else [])

    def test_token_is_cached_and_an_expired_token_means_one_new_login(self):
        first, second = new_ref(), new_ref()
        self.fake.thumbnails[first] = self.fake.thumbnails[second] = (self.jpg, "image/jpeg")
        self.d.wait_status(self.deliver_one(first), "done")
        logins, refused = self.fake.logins, self.fake.count_401()
        self.d.wait_status(self.deliver_one(new_ref()), "done")
        self.assertEqual(self.fake.logins, logins, "the cached token was not reused")
        self.fake.expire_tokens()
        ev = self.d.wait_status(self.deliver_one(second), "done")
        self.assertEqual(ev["attempts"], 1)
        self.assertEqual(self.fake.logins, logins + 1)
        self.assertEqual(self.fake.count_401(), refused + 1)
        with open(self.thumb(second + ".jpg"), "rb") as f:
            self.assertEqual(f.read(), self.jpg)
        log = self.d.log()
        for secret in self.fake.issued + [PASSWORD, SECRET]:
            self.assertNotIn(secret, log)

    def test_preservica_503_is_retried_then_done(self):
        ref = new_ref()
        self.fake.thumbnails[ref] = (self.jpg, "image/jpeg")
        self.fake.fail_next("/api/content/thumbnail", 503, body={"success": False, "message": "busy"})
        ev = self.d.wait_status(self.deliver_one(ref), "done")
        self.assertEqual(ev["attempts"], 2)
        self.assertTrue(os.path.exists(self.thumb(ref + ".jpg")))

    def test_401_after_a_new_login_is_dead(self):
        ref = new_ref()
        self.fake.thumbnails[ref] = (self.jpg, "image/jpeg")
        self.fake.reject_all_tokens = True
        try:
            ev = self.d.wait_status(self.deliver_one(ref), "dead")
        finally:
            self.fake.reject_all_tokens = False
        self.assertEqual(ev["attempts"], 1)
        self.assertIn("401", ev["last_error"])
        self.assertFalse(os.path.exists(self.thumb(ref + ".jpg")))

    def test_one_failing_asset_does_not_block_the_others(self):
        bad, good = new_ref(), new_ref()
        self.fake.broken_refs.add(bad)
        self.fake.thumbnails[good] = (self.jpg, "image/jpeg")
        bad_id, good_id = self.deliver([fp.io_event(bad), fp.io_event(good)])
        self.d.wait_status(good_id, "done")
        self.assertTrue(os.path.exists(self.thumb(good + ".jpg")))
        ev = self.d.wait_status(bad_id, "dead")
        self.assertEqual(ev["attempts"], 3)
        self.assertIn("500", ev["last_error"])

    def test_reference_cannot_escape_the_thumbnail_dir(self):
        ref = "../../escaped-" + new_ref()
        self.fake.thumbnails[ref] = (self.jpg, "image/jpeg")
        self.d.wait_status(self.deliver_one(ref), "done")
        self.assertTrue(os.path.exists(self.thumb("_.._" + ref[6:] + ".jpg")))
        self.assertFalse(os.path.exists(os.path.join(self.tmp.name, ref[6:] + ".jpg")))
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(self.tmp.name), ref[6:] + ".jpg")))


class TeamsTest(PreservicaCase):
    """``actions = thumbnail, teams``: an Adaptive Card with the asset's title read from Preservica."""

    @classmethod
    def section(cls):
        return ("[preservica]\nsecret.key = %s\nserver = %s\nusername = hookd\npassword = %s\n"
                "tenant = DEMO\nactions = thumbnail, teams\nthumbnail.dir = %s\n"
                "teams.url = %s\nteams.format = adaptive\n"
                % (SECRET, cls.fake.url, PASSWORD, cls.thumbs, cls.teams.workflow_url))

    def test_card_carries_title_trigger_type_and_reference(self):
        ref = new_ref()
        self.fake.titles[ref] = "Harbour ledger, 1852 — Tōkyō"
        self.d.wait_status(self.deliver_one(ref), "done")
        cards = self.cards_about(ref)
        self.assertEqual([kind for kind, _ in cards], ["adaptive"])
        content = cards[0][1]["attachments"][0]["content"]
        facts = {f["title"]: f["value"] for b in content["body"] if b["type"] == "FactSet" for f in b["facts"]}
        self.assertEqual(facts["Title"], "Harbour ledger, 1852 — Tōkyō")
        self.assertEqual(facts["Trigger"], "FULL_TEXT_INDEXED")
        self.assertEqual(facts["Entity type"], "IO")
        self.assertEqual(facts["Reference"], ref)
        self.assertIn("Harbour ledger, 1852 — Tōkyō", content["body"][0]["text"])

    def test_title_failure_falls_back_to_the_reference(self):
        ref = new_ref()  # no title known: the entity API answers 404
        self.d.wait_status(self.deliver_one(ref), "done")
        cards = self.cards_about(ref)
        self.assertEqual(len(cards), 1)
        self.assertIn(ref, cards[0][1]["attachments"][0]["content"]["body"][0]["text"])


class CommandAndLegacyTeamsTest(PreservicaCase):
    """No API credentials: ``actions = command, teams`` with a MessageCard; the card names the reference."""

    @classmethod
    def section(cls):
        cls.out = os.path.join(cls.tmp.name, "out")
        os.makedirs(cls.out)
        script = os.path.join(cls.tmp.name, "record.py")
        with open(script, "w") as f:
            f.write("import os, sys\nopen(os.path.join(sys.argv[1], os.environ['HOOKD_EVENT_ID']), 'wb')"
                    ".write(sys.stdin.buffer.read())\n")
        return ("[preservica]\nsecret.key = %s\nactions = command, teams\n"
                "command = %s %s %s\nteams.url = %s\nteams.format = messagecard\n"
                % (SECRET, sys.executable, script, cls.out, cls.teams.legacy_url))

    def test_command_gets_the_event_and_card_names_the_reference(self):
        ref = new_ref()
        event_id = self.deliver_one(ref)
        self.d.wait_status(event_id, "done")
        path = os.path.join(self.out, str(event_id))
        wait_until(lambda: os.path.exists(path), 5, message="command output")
        with open(path, "rb") as f:
            self.assertIn(ref, f.read().decode("utf-8"))
        cards = self.cards_about(ref)
        self.assertEqual([kind for kind, _ in cards], ["messagecard"])
        facts = {f["name"]: f["value"] for f in cards[0][1]["sections"][0]["facts"]}
        self.assertEqual((facts["Reference"], facts["Title"]), (ref, "(unknown)"))
        self.assertEqual(self.fake.logins, 0)


if __name__ == "__main__":
    unittest.main()
