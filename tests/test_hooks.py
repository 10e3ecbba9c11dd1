"""End-to-end tests of ``[hook:NAME]`` routes with the real daemon: every verification scheme through
``/hooks/NAME``, 401 storing nothing, dedupe by delivery id, the filter, the command action's retries and
``retry ID``, forward and Teams actions, and ``verify = none`` refused without ``allow_unsigned``."""

import base64
import hashlib
import hmac
import json
import os
import shutil
import sys
import tempfile
import textwrap
import threading
import time
import unittest

from tests.fake_teams import FakeTeams
from tests.support import Daemon, FakeUpstream, app_from, hmac_hex, process_alive, wait_until

SW_SECRET_OLD = "whsec_" + base64.b64encode(b"old standard webhooks key").decode()
SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
GH_SECRET = "gh-e2e-secret"  # GitHub's documented example secret has spaces: space separates secrets here
STRIPE_SECRET = "whsec_stripe_e2e"
SHOP_SECRET = "shpss_e2e_secret"
PRES_SECRET = "preservica-shared"
TOKEN = "tok-e2e-123456"

# The user command: logs "ROUTE ID ATTEMPT" per run, keeps stdin, and exits as its mode says.
COMMAND = textwrap.dedent("""\
    import os, sys
    log, mode = sys.argv[1], sys.argv[2]
    data = sys.stdin.buffer.read()
    event, attempt = os.environ["HOOKD_EVENT_ID"], int(os.environ["HOOKD_ATTEMPT"])
    with open(log, "a") as f:
        f.write("%s %s %d\\n" % (os.environ["HOOKD_ROUTE"], event, attempt))
    with open("%s.%s.stdin" % (log, event), "wb") as f:
        f.write(data)
    if mode == "flaky" and attempt < 3:
        sys.exit("not yet (attempt %d)" % attempt)
    if mode.startswith("fixable:") and not os.path.exists(mode[8:]):
        sys.exit("broken until %s exists" % mode[8:])
    if mode == "hang":
        import subprocess, time
        child = subprocess.Popen(["sleep", "60"])
        with open(log + ".children", "a") as f:
            f.write("%d\\n" % child.pid)
        time.sleep(60)
""")


def sw_sign(secret, msg_id, stamp, body):
    key = base64.b64decode(secret[len("whsec_"):])
    mac = hmac.new(key, ("%s.%s." % (msg_id, stamp)).encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def sw_headers(msg_id, body, secret=SW_SECRET, stamp=None):
    stamp = str(int(time.time())) if stamp is None else str(stamp)
    return {"webhook-id": msg_id, "webhook-timestamp": stamp, "Content-Type": "application/json",
            "webhook-signature": sw_sign(secret, msg_id, stamp, body)}


def stripe_headers(body, secret=STRIPE_SECRET, stamp=None):
    stamp = str(int(time.time())) if stamp is None else str(stamp)
    return {"Stripe-Signature": "t=%s,v1=%s" % (stamp, hmac_hex(secret, stamp.encode() + b"." + body))}


class HooksTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="hookd-hooks-")
        cls.script = os.path.join(cls.tmp, "command.py")
        with open(cls.script, "w") as f:
            f.write(COMMAND)
        cls.runs = os.path.join(cls.tmp, "runs.log")
        cls.fix = os.path.join(cls.tmp, "fixed")
        cls.up = FakeUpstream([(200, b"ok")])
        cls.teams = FakeTeams()
        cls.d = Daemon(cls.config(), tmpdir=cls.tmp).start()

    @classmethod
    def tearDownClass(cls):
        code = cls.d.stop()
        cls.up.close()
        cls.teams.close()
        shutil.rmtree(cls.tmp, True)
        assert code == 0, "daemon exit code %s" % code

    @classmethod
    def config(cls):
        def cmd(mode):
            return "command = %s %s %s %s" % (sys.executable, cls.script, cls.runs, mode)
        return textwrap.dedent("""\
            [hookd]
            workers = 2
            retry.base_delay = 0.05
            retry.max_delay = 0.2
            retry.max_attempts = 3

            [hook:sw]
            verify = standard-webhooks
            secret = {sw_old} {sw}
            {cmd_ok}

            [hook:gh]
            verify = github
            secret = {gh}

            [hook:stripe]
            verify = stripe
            secret = {stripe}

            [hook:shop]
            verify = shopify
            secret = {shop}

            [hook:pres]
            verify = hmac
            secret = {pres}
            signature.header = Preservica-Signature
            signature.message = preservica-webhook-auth{{body}}

            [hook:tok]
            verify = token
            secret = {tok}

            [hook:flaky]
            verify = token
            secret = {tok}
            {cmd_flaky}

            [hook:broken]
            verify = token
            secret = {tok}
            dedupe = none
            {cmd_fixable}

            [hook:hang]
            verify = token
            secret = {tok}
            {cmd_hang}
            command.timeout = 0.5

            [hook:filtered]
            verify = token
            secret = {tok}
            filter = json:action == opened and header:X-Kind != test

            [hook:fwd]
            verify = token
            secret = {tok}
            forward = {up}/inbox

            [hook:teams]
            verify = token
            secret = {tok}
            teams.url = {teams}
            teams.format = adaptive
            """).format(sw_old=SW_SECRET_OLD, sw=SW_SECRET, gh=GH_SECRET, stripe=STRIPE_SECRET,
                        shop=SHOP_SECRET, pres=PRES_SECRET, tok=TOKEN, cmd_ok=cmd("ok"),
                        cmd_flaky=cmd("flaky"), cmd_fixable=cmd("fixable:" + cls.fix), cmd_hang=cmd("hang"),
                        up=cls.up.url,
                        teams=cls.teams.workflow_url)

    # -- helpers ------------------------------------------------------------------------------------
    def post(self, name, body, headers, expect, chunked=False):
        if isinstance(body, str):
            body = body.encode("utf-8")
        status, _, reply = self.d.post("/hooks/" + name, body, headers, chunked=chunked)
        self.assertEqual(status, expect, reply)
        return json.loads(reply.decode("utf-8")) if reply else {}

    def count(self, route):
        return len(self.d.events("--route", "hook:" + route))

    def runs_of(self, route):
        if not os.path.exists(self.runs):
            return []
        with open(self.runs) as f:
            return [line.split() for line in f if line.startswith("hook:%s " % route)]

    def assert_refused(self, name, body, headers):
        """401, and nothing stored for the route."""
        before = self.count(name)
        self.post(name, body, headers, 401)
        self.assertEqual(self.count(name), before)

    # -- each scheme --------------------------------------------------------------------------------
    def test_standard_webhooks_valid_rotated_expired_and_dedupe_runs_command_once(self):
        body = b'{"type": "invoice.paid", "data": {"id": "in_1"}}'
        first = self.post("sw", body, sw_headers("msg_e2e_1", body), 202)
        self.assertEqual(first["status"], "queued")
        # the sender retries: same webhook-id, new timestamp, signed with the old key during a rotation
        again = self.post("sw", body, sw_headers("msg_e2e_1", body, SW_SECRET_OLD, int(time.time()) + 1), 200)
        self.assertEqual((again["status"], again["id"]), ("duplicate", first["id"]))
        event = self.d.wait_status(first["id"], "done")
        self.assertEqual(event["attempts"], 1)
        self.assertEqual(self.runs_of("sw"), [["hook:sw", str(first["id"]), "1"]])
        with open("%s.%s.stdin" % (self.runs, first["id"]), "rb") as f:
            doc = json.loads(f.read())
        self.assertEqual((doc["payload"]["type"], doc["body"].encode()), ("invoice.paid", body))
        statuses = sorted(e["status"] for e in self.d.events("--route", "hook:sw"))
        self.assertEqual(statuses, ["done", "duplicate"])
        self.assert_refused("sw", body, sw_headers("msg_e2e_2", body, stamp=int(time.time()) - 301))
        self.assert_refused("sw", body, sw_headers("msg_e2e_3", body,
                                                   "whsec_" + base64.b64encode(b"x" * 24).decode()))
        self.assert_refused("sw", body, {"webhook-id": "m", "webhook-timestamp": "x",
                                         "webhook-signature": "v1,!"})

    def test_svix_headers_verify_and_dedupe_on_svix_id(self):
        """Svix, Clerk and Resend send svix-id / svix-timestamp / svix-signature (the same scheme)."""
        body = b'{"type": "email.delivered", "data": {"email_id": "4ef9a417"}}'
        svix = {k.replace("webhook-", "svix-"): v for k, v in sw_headers("msg_svix_1", body).items()}
        first = self.post("sw", body, svix, 202)
        later = {k.replace("webhook-", "svix-"): v
                 for k, v in sw_headers("msg_svix_1", body, stamp=int(time.time()) + 1).items()}
        again = self.post("sw", body, later, 200)
        self.assertEqual((again["status"], again["id"]), ("duplicate", first["id"]))
        self.d.wait_status(first["id"], "done")
        self.assert_refused("sw", body, dict(svix, **{"svix-id": "msg_svix_2"}))

    def test_github_signature_and_delivery_dedupe(self):
        headers = {"X-Hub-Signature-256": "sha256=" + hmac_hex(GH_SECRET, "Hello, World!"),
                   "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958", "X-GitHub-Event": "ping"}
        first = self.post("gh", "Hello, World!", headers, 202)
        self.assertEqual(self.post("gh", "Hello, World!", headers, 200)["status"], "duplicate")
        self.d.wait_status(first["id"], "done")
        self.assert_refused("gh", "Hello, World?", headers)
        self.assert_refused("gh", "Hello, World!", dict(headers, **{"X-Hub-Signature-256": "sha256=zz"}))

    def test_stripe_dedupes_on_event_id(self):
        body = b'{"id": "evt_e2e_1", "type": "charge.succeeded"}'
        first = self.post("stripe", body, stripe_headers(body), 202)
        later = stripe_headers(body, stamp=int(time.time()) + 5)
        self.assertEqual(self.post("stripe", body, later, 200)["id"], first["id"])
        self.assert_refused("stripe", body, stripe_headers(body, stamp=int(time.time()) - 400))
        self.assert_refused("stripe", body, {"Stripe-Signature": "t=1,v1"})

    def test_shopify_base64(self):
        body = b'{"id": 820982911946154508, "email": "jon@example.com"}'
        sig = base64.b64encode(hmac.new(SHOP_SECRET.encode(), body, hashlib.sha256).digest()).decode()
        self.post("shop", body, {"X-Shopify-Hmac-Sha256": sig, "X-Shopify-Webhook-Id": "b54557e4"}, 202)
        self.assert_refused("shop", body, {"X-Shopify-Hmac-Sha256": hmac_hex(SHOP_SECRET, body)})

    def test_hmac_recipe_preservica_chunked_non_ascii(self):
        body = '{"events": [{"entityRef": "a1", "title": "Caf\u00e9 \u2603"}]}'.encode("utf-8")
        sig = hmac_hex(PRES_SECRET, b"preservica-webhook-auth" + body)
        first = self.post("pres", body, {"Preservica-Signature": sig}, 202, chunked=True)
        self.assertEqual(self.d.event(first["id"])["payload"]["events"][0]["title"], "Caf\u00e9 \u2603")
        self.assert_refused("pres", body, {"Preservica-Signature": hmac_hex(PRES_SECRET, body)})

    def test_token_bearer_basic_and_wrong(self):
        self.post("tok", "a", {"Authorization": "Bearer " + TOKEN}, 202)
        basic = base64.b64encode(("zencoder:" + TOKEN).encode()).decode()
        self.post("tok", "b", {"Authorization": "Basic " + basic}, 202)
        self.assert_refused("tok", "c", {"Authorization": "Bearer wrong"})
        self.assert_refused("tok", "c", {})

    # -- filter, actions, retries -------------------------------------------------------------------
    def test_filter_ignores_non_matching_events_and_stores_nothing(self):
        auth = {"Authorization": TOKEN}
        reply = self.post("filtered", '{"action": "closed"}', auth, 200)
        self.assertEqual(reply["status"], "ignored")
        self.post("filtered", '{"action": "opened"}', dict(auth, **{"X-Kind": "test"}), 200)
        self.post("filtered", "not json", auth, 200)
        self.assertEqual(self.count("filtered"), 0)
        self.post("filtered", '{"action": "opened"}', auth, 202)
        self.assertEqual(self.count("filtered"), 1)
        self.assert_refused("filtered", '{"action": "opened"}', {"Authorization": "wrong"})

    def test_command_failing_twice_then_succeeding_ends_done_after_3_attempts(self):
        first = self.post("flaky", '{"n": 1}', {"Authorization": TOKEN}, 202)
        event = self.d.wait_status(first["id"], "done")
        self.assertEqual(event["attempts"], 3)
        self.assertEqual([r[2] for r in self.runs_of("flaky")], ["1", "2", "3"])

    def test_command_always_failing_ends_dead_and_retry_runs_it_again(self):
        first = self.post("broken", '{"n": 2}', {"Authorization": TOKEN}, 202)
        event = self.d.wait_status(first["id"], "dead")
        self.assertEqual(event["attempts"], 3)
        self.assertIn("broken until", event["last_error"])
        self.assertIn("exited 1", event["last_error"])
        with open(self.fix, "w"):
            pass
        result = self.d.cli("retry", str(first["id"]))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.d.wait_status(first["id"], "done")
        self.assertEqual(len(self.runs_of("broken")), 4)

    def test_command_timeout_kills_its_children_and_ends_dead(self):
        first = self.post("hang", '{"n": 3}', {"Authorization": TOKEN}, 202)
        event = self.d.wait_status(first["id"], "dead")
        self.assertEqual(event["attempts"], 3)
        self.assertIn("timed out", event["last_error"])
        with open(self.runs + ".children") as f:
            children = [int(line) for line in f]
        self.assertEqual(len(children), 3)
        wait_until(lambda: not any(process_alive(pid) for pid in children), 5,
                   message="sleeping children to be gone")

    def test_forward_delivers_the_exact_bytes(self):
        body = b'{"k": "v", "bytes": "\xe2\x82\xac"}\n  '
        headers = {"Authorization": TOKEN, "Content-Type": "application/vnd.custom+json"}
        first = self.post("fwd", body, headers, 202)
        rec = self.up.wait_for_request()
        self.assertEqual((rec.path, rec.body, rec.headers["content-type"]),
                         ("/inbox", body, "application/vnd.custom+json"))
        self.assertEqual(rec.headers["x-hookd-event-id"], str(first["id"]))
        self.assertNotIn(TOKEN, json.dumps(rec.headers))
        self.d.wait_status(first["id"], "done")

    def test_teams_card_reaches_workflows(self):
        first = self.post("teams", '{"type": "build.failed"}', {"Authorization": TOKEN}, 202)
        self.d.wait_status(first["id"], "done")
        kind, doc = self.teams.cards[-1]
        facts = {f["title"]: f["value"] for f in doc["attachments"][0]["content"]["body"][-1]["facts"]}
        self.assertEqual((kind, facts["event"], facts["type"]),
                         ("adaptive", str(first["id"]), "build.failed"))

    def test_secrets_never_appear_in_the_log(self):
        self.post("tok", "z", {"Authorization": "Bearer " + TOKEN}, 202)
        self.post("tok", "z", {"Authorization": "Bearer " + TOKEN + "x"}, 401)
        log = self.d.log()
        for secret in (TOKEN, GH_SECRET, SHOP_SECRET, PRES_SECRET, SW_SECRET[6:]):
            self.assertNotIn(secret, log)


class UnsignedTest(unittest.TestCase):
    def test_verify_none_needs_allow_unsigned(self):
        d = Daemon("[hook:open]\nverify = none\n")
        self.addCleanup(shutil.rmtree, d.tmp, True)
        result = d.cli("check-config")
        self.assertEqual(result.returncode, 1)
        self.assertIn("[hook:open] verify = none", result.stdout + result.stderr)
        with self.assertRaises(AssertionError):
            d.start()
        self.assertEqual(d.proc.returncode, 1)

    def test_a_json_dedupe_key_with_a_lone_surrogate_is_stored_and_dedupes(self):
        # JSON may carry "\ud800", which no UTF-8 text holds: sqlite cannot bind such a key, and its
        # group's commit failed (503 for it and every request committed with it).
        d = Daemon("[hook:w]\nverify = none\nallow_unsigned = true\ndedupe = json:id\n").start()
        self.addCleanup(shutil.rmtree, d.tmp, True)
        self.addCleanup(d.stop)
        status, _, reply = d.post("/hooks/w", b'{"id": "\\ud800"}', {"Content-Type": "application/json"})
        self.assertEqual(status, 202, reply)
        first = json.loads(reply)["id"]
        status, _, reply = d.post("/hooks/w", b'{"id": "\\ud800", "again": 1}', {})
        self.assertEqual((status, json.loads(reply)["status"], json.loads(reply)["id"]), (200, "duplicate", first))
        status, _, reply = d.post("/hooks/w", b'{"id": "\\ud801"}', {})
        self.assertEqual((status, json.loads(reply)["status"]), (202, "queued"), reply)

    def test_verify_none_with_allow_unsigned_accepts_anything(self):
        d = Daemon("[hook:open]\nverify = none\nallow_unsigned = true\n").start()
        self.addCleanup(shutil.rmtree, d.tmp, True)
        self.addCleanup(d.stop)
        status, _, reply = d.post("/hooks/open", b"\xff\xfe binary",
                                  {"Content-Type": "application/octet-stream"})
        self.assertEqual(status, 202, reply)
        event = d.wait_status(json.loads(reply)["id"], "done")
        self.assertEqual(event["route"], "hook:open")
        status, _, _ = d.post("/hooks/other", b"{}", {})
        self.assertEqual(status, 404)

    def test_a_lone_surrogate_key_never_fails_its_group(self):
        """Innocent requests committed in one group with a lone-surrogate key are all stored."""
        from hookd_core.api import Headers, Request
        tmp = tempfile.mkdtemp(prefix="hookd-surrogate-")
        self.addCleanup(shutil.rmtree, tmp, True)
        app = app_from(tmp, "[hookd]\nstate_dir = %s\n[hook:w]\nverify = none\nallow_unsigned = true\n"
                            "dedupe = json:id\n" % os.path.join(tmp, "var"))
        store = app.open_store()
        self.addCleanup(store.close)
        integ = app.route_for("/hooks/w")

        def rows(body):
            req = Request("POST", "/hooks/w", {}, Headers([("Content-Type", "application/json")]), body,
                          ("127.0.0.1", 1))
            return app.event_rows(integ, req, integ.accept(req))
        held, go = threading.Event(), threading.Event()
        blocker = threading.Thread(target=store.write, args=(lambda conn: (held.set(), go.wait(10)),))
        blocker.start()
        held.wait(10)  # the writer is busy: what is submitted now commits as one group
        bodies = [b'{"id": "ok%d"}' % i for i in range(5)] + [b'{"id": "\\ud800"}']
        ops = [store.submit_events(integ.name, rows(body)) for body in bodies]
        go.set()
        blocker.join(10)
        results = [op.wait()[0] for op in ops]
        self.assertEqual([outcome for _, outcome in results], ["new"] * 6)
        self.assertEqual(store.add_events(integ.name, rows(bodies[-1]))[0], (results[-1][0], "duplicate"))

    def test_bad_filter_and_name_are_config_problems(self):
        d = Daemon("[hook:bad name]\nverify = token\nsecret = t\nfilter = action is opened\n")
        self.addCleanup(shutil.rmtree, d.tmp, True)
        result = d.cli("check-config")
        out = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1)
        self.assertIn("must be letters, digits", out)
        self.assertIn("filter 'action is opened'", out)


class RouteTest(unittest.TestCase):
    def test_the_first_integration_in_order_that_matches_takes_the_path(self):
        """route_for: routes of one path come from a table made per configuration, and an integration
        with a path pattern of its own is still asked first when it comes first, whatever the order."""
        from hookd_core.api import Integration

        class Pattern(Integration):
            def match(self, path):
                return path.startswith("/p/")

        def exact(name, route):
            integ = Integration(name, None, None)
            integ.route = route
            return integ
        tmp = tempfile.mkdtemp(prefix="hookd-routes-")
        self.addCleanup(shutil.rmtree, tmp, True)
        app = app_from(tmp, "[hookd]\nstate_dir = %s\n[hook:w]\nverify = none\nallow_unsigned = true\n"
                       % os.path.join(tmp, "var"))
        self.assertEqual(app.route_for("/hooks/w").name, "hook:w")
        pattern, a, b, again = Pattern("pattern", None, None), exact("a", "/p/a"), exact("b", "/b"), exact("again", "/b")
        app.integrations = [a, pattern, b, again]  # a reload replaces the list
        self.assertIs(app.route_for("/p/a"), a)
        self.assertIs(app.route_for("/p/z"), pattern)
        self.assertIs(app.route_for("/b"), b)
        self.assertIsNone(app.route_for("/hooks/w"))
        self.assertIsNone(app.route_for("/c"))
        app.integrations = [pattern, a, again, b]
        self.assertIs(app.route_for("/p/a"), pattern)
        self.assertIs(app.route_for("/b"), again)


class RequestJsonTest(unittest.TestCase):
    def test_the_body_parses_as_json_loads_parses_it(self):
        """Request.json reads a body that is one value end to end with the decoder's scanner and leaves
        everything else to json.loads: the same value, or a 400, for every kind of body."""
        from hookd_core.api import Headers, Request, Unparsable
        bodies = [b'{"a": [1, 2.5, "\\u00e9", null, true]}', b"[]", b"1", b'"x"', b" {}", b"{} ", b"\n[1]\r\n",
                  b"\xef\xbb\xbf{}", "{\"\u00e9\": 1}".encode(), b"{} {}", b"{}x", b"", b" ", b"{", b'{"a": }',
                  b"nul", b"-Infinity", b"\xff", b"{}\x0b", b"{}\xc2\xa0", b"1\t\n\r ", b"[" * 100000 + b"]" * 100000, b'{"a": 1, "a": 2}']
        for body in bodies:
            req = Request("POST", "/hooks/w", {}, Headers([]), body, ("127.0.0.1", 1))
            try:
                expected = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                expected = Unparsable
            with self.subTest(body=body[:20]):
                if expected is Unparsable:
                    self.assertRaises(Unparsable, req.json)
                else:
                    self.assertEqual(req.json(), expected)


if __name__ == "__main__":
    unittest.main()
