"""Upstream subscriptions (SPEC §8): subscribe, subscriptions, unsubscribe, and the daemon's watch with
``hookd_subscription_up{route,id}`` and one alert per change of health.

End to end: the real daemon, FakePreservica (whose subscribe call runs the challenge against the daemon
during the POST, as Preservica does), FakeIconik's webhook definitions API, FakeTeams and a recording
``alert.command``. ``observe()`` (the health bookkeeping) is also driven directly on a real sqlite file.
"""

import json
import os
import re
import signal
import sqlite3
import tempfile
import time
import unittest

from hookd_core import alerts, config, subscriptions
from hookd_core.api import Fail
from tests import fake_iconik as fi
from tests import fake_preservica as fp
from tests import support
from tests.fake_teams import FakeTeams
from tests.test_alerts import recorded, recorder

SECRET = "subs-shared-secret"
PASSWORD = "pw-for-subs"
INTERVAL = 0.5  # subscriptions.check_interval in these tests (the smallest allowed)


def metric(d, route, sub_id):
    """The value of hookd_subscription_up for (route, id), or None when the line is absent."""
    _, _, text = d.admin("GET", "/metrics")
    m = re.search(r'^hookd_subscription_up\{route="%s",id="%s"\} (\d+)$' % (re.escape(route), re.escape(sub_id)),
                  text.decode(), re.M)
    return int(m.group(1)) if m else None


def set_public_url(d):
    """public_url is the daemon's own address, known only once it listens: write it in and reload."""
    with open(d.config_path) as f:
        text = f.read()
    with open(d.config_path, "w") as f:
        f.write(text.replace("[hookd]\n", "[hookd]\npublic_url = %s\n" % d.url, 1))
    d.signal(signal.SIGHUP)
    d.wait_log("configuration reloaded")


class Watched(unittest.TestCase):
    """A daemon with alerts to FakeTeams and a recording command, checking every INTERVAL seconds."""

    SECTION = ""

    def start(self, section, interval=INTERVAL):
        tmp = tempfile.mkdtemp(prefix="hookd-subs-")
        self.teams = FakeTeams()
        self.addCleanup(self.teams.close)
        command, self.folder = recorder(tmp)
        self.d = support.Daemon("[hookd]\nsubscriptions.check_interval = %s\nalert.teams.url = %s\n"
                                "alert.command = %s\n%s" % (interval, self.teams.workflow_url, command, section),
                                tmpdir=tmp)
        self.d.start()
        self.addCleanup(self.d.stop)
        set_public_url(self.d)

    def alerts_told(self, kind=None):
        """(cards, commands) told so far, commands filtered by ``kind``."""
        told = [t["stdin"] for t in recorded(self.folder)]
        return [c for c in self.teams.cards], [t for t in told if kind is None or t["kind"] == kind]

    def wait_alerts(self, n):
        support.wait_until(lambda: len(self.teams.cards) >= n and len(recorded(self.folder)) >= n, 20,
                           message="%d alerts" % n)

    def wait_metric(self, route, sub_id, value):
        support.wait_until(lambda: metric(self.d, route, sub_id) == value, 20,
                           message="hookd_subscription_up %s %s = %s" % (route, sub_id, value))

    def quiet_for(self, fake_count, rounds=3):
        """Let the watcher list the upstream ``rounds`` more times (nothing should change meanwhile)."""
        start = fake_count()
        support.wait_until(lambda: fake_count() >= start + rounds, 20, message="%d more checks" % rounds)

    def cli(self, *args):
        return self.d.cli(*args)


class PreservicaSubscriptionTest(Watched):
    def setUp(self):
        self.fake = fp.FakePreservica(username="hookd", password=PASSWORD, tenant="DEMO")
        self.addCleanup(self.fake.close)
        self.start("[preservica]\nsecret.key = %s\nserver = %s\nusername = hookd\npassword = %s\ntenant = DEMO\n"
                   % (SECRET, self.fake.url, PASSWORD))

    def listings(self):
        return sum(1 for r in self.fake.upstream.seen if r.method == "GET" and r.path == "/api/webhook/subscriptions")

    def test_subscribe_watch_drop_recover_unsubscribe(self):
        r = self.cli("subscribe", "preservica", "FULL_TEXT_INDEXED")
        self.assertEqual(r.returncode, 0, r.stderr)
        sub_id = r.stdout.strip()
        self.assertIn(sub_id, self.fake.subscriptions, "the fake ran the challenge against the daemon and kept it")
        self.assertEqual(self.fake.subscriptions[sub_id]["url"], self.d.url + "/preservica")
        [post] = [x for x in self.fake.upstream.seen if x.method == "POST" and x.path == "/api/webhook/subscriptions"]
        self.assertEqual(post.json(), {"url": self.d.url + "/preservica", "triggerType": "FULL_TEXT_INDEXED",
                                       "secret": SECRET, "includeIdentifiers": "true"})
        _, _, text = self.d.admin("GET", "/metrics")
        self.assertIn('hookd_requests_total{route="preservica",code="200"} 1', text.decode(),
                      "the challenge reached the daemon")

        r = self.cli("subscriptions", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout), [{"route": "preservica", "id": sub_id, "filter": "FULL_TEXT_INDEXED",
                                                 "url": self.d.url + "/preservica", "status": "present",
                                                 "up": True}])
        r = self.cli("subscriptions")
        self.assertIn(sub_id, r.stdout)
        self.wait_metric("preservica", sub_id, 1)

        self.fake.drop(sub_id)
        self.wait_metric("preservica", sub_id, 0)
        self.wait_alerts(1)
        self.quiet_for(self.listings)
        cards, told = self.alerts_told()
        self.assertEqual(len(cards), 1, "one alert for one subscription gone: %s\n%s" % (
            json.dumps(cards), self.d.log()[-3000:]))
        self.assertEqual([(t["kind"], t["id"], t["status"]) for t in told],
                         [("subscription_down", sub_id, "missing")])
        self.assertIn(sub_id, json.dumps(cards[0][1]))

        with self.fake._lock:  # Preservica has it again (same id): recovery
            self.fake.subscriptions[sub_id] = {"id": sub_id, "url": self.d.url + "/preservica",
                                               "triggerType": "FULL_TEXT_INDEXED", "includeIdentifiers": True}
        self.wait_metric("preservica", sub_id, 1)
        self.wait_alerts(2)
        self.quiet_for(self.listings)
        cards, told = self.alerts_told()
        self.assertEqual(len(cards), 2)
        self.assertEqual([t["kind"] for t in told], ["subscription_down", "subscription_up"])

        r = self.cli("unsubscribe", "preservica", sub_id)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn(sub_id, self.fake.subscriptions)
        self.wait_metric("preservica", sub_id, None)
        self.quiet_for(self.listings)
        self.assertEqual(len(self.teams.cards), 2, "an unsubscribed subscription is not missed")
        r = self.cli("unsubscribe", "preservica", sub_id)
        self.assertEqual(r.returncode, 1)
        self.assertIn("no subscription", r.stderr)

    def test_subscribe_fails_with_preservicas_answer_when_the_challenge_fails(self):
        with open(self.d.config_path) as f:
            text = f.read()
        with open(self.d.config_path, "w") as f:  # the CLI offers another secret than the daemon answers with
            f.write(text.replace("secret.key = %s" % SECRET, "secret.key = not-the-daemons"))
        r = self.cli("subscribe", "preservica", "MOVED")
        self.assertEqual(r.returncode, 1)
        self.assertIn("Preservica answered 400", r.stderr)
        self.assertIn("challenge failed", r.stderr)
        self.assertEqual(self.fake.subscriptions, {})

    def test_usage(self):
        r = self.cli("subscribe", "preservica", "NOT_A_TRIGGER")
        self.assertEqual(r.returncode, 2)
        self.assertIn("FULL_TEXT_INDEXED", r.stderr)
        r = self.cli("subscribe", "zencoder")
        self.assertEqual(r.returncode, 1)
        self.assertIn("no [zencoder] section", r.stderr)


class ReloadTest(Watched):
    def test_a_reload_that_shortens_the_check_interval_takes_effect_at_once(self):
        fake = fp.FakePreservica(username="hookd", password=PASSWORD, tenant="DEMO")
        self.addCleanup(fake.close)
        self.start("[preservica]\nsecret.key = %s\nserver = %s\nusername = hookd\npassword = %s\n"
                   % (SECRET, fake.url, PASSWORD), interval=900)
        r = self.cli("subscribe", "preservica", "MOVED")
        self.assertEqual(r.returncode, 0, r.stderr)
        sub_id = r.stdout.strip()
        with open(self.d.config_path) as f:
            text = f.read()
        with open(self.d.config_path, "w") as f:
            f.write(text.replace("subscriptions.check_interval = 900", "subscriptions.check_interval = %s" % INTERVAL))
        self.d.signal(signal.SIGHUP)
        support.wait_until(lambda: self.d.log().count("configuration reloaded") >= 2, 10, message="second reload")
        fake.drop(sub_id)
        self.wait_metric("preservica", sub_id, 0)


class IconikSubscriptionTest(Watched):
    def setUp(self):
        self.fake = fi.FakeIconik(app_id="app-1", auth_token="tok-1")
        self.addCleanup(self.fake.close)
        self.start("[iconik]\nurl = %s\napp_id = app-1\nauth_token = tok-1\nsecret.key = %s\n"
                   % (self.fake.url, SECRET))

    def listings(self):
        return self.fake.count("/API/notifications/v1/webhooks/?")

    def add_webhook(self, **fields):
        doc = dict({"event_type": "assets", "status": "ENABLED", "url": "https://elsewhere.example/hook"}, **fields)
        status, _, body = support.request("POST", self.fake.url + "/API/notifications/v1/webhooks/",
                                          json.dumps(doc).encode(), {"App-ID": "app-1", "Auth-Token": "tok-1",
                                                                     "Content-Type": "application/json"})
        self.assertEqual(status, 201, body)
        return json.loads(body)

    def test_subscribe_skips_existing_watch_failing_recover_unsubscribe(self):
        for i in range(120):  # someone else's webhooks: ours end up on the second page of the listing
            self.add_webhook(realm="entity", operation="update", name="other %d" % i)
        existing = self.add_webhook(realm="entity", operation="create", url=self.d.url + "/iconik")
        r = self.cli("subscribe", "iconik")
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = r.stdout.splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertRegex(lines[0], r"^created \S+ assets/proxies/\*$")
        self.assertEqual(lines[1], "exists  %s assets/entity/create (ENABLED)" % existing["id"])
        created_id = lines[0].split()[1]
        hook = self.fake.webhooks[created_id]
        self.assertEqual((hook["event_type"], hook["realm"], hook["operation"], hook["url"], hook["status"]),
                         ("assets", "proxies", None, self.d.url + "/iconik", "ENABLED"))
        self.assertEqual(hook["headers"], {"X-Hookd-Secret": SECRET})
        r = self.cli("subscribe", "iconik")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual([ln.split()[0] for ln in r.stdout.splitlines()], ["exists", "exists"])
        self.assertEqual(len(self.fake.webhooks), 122)

        # what iconik sends with the definition's headers gets in
        asset = self.fake.add_asset()
        status, _, _ = fi.deliver(hook["url"], fi.asset_created(asset), headers=hook["headers"])
        self.assertEqual(status, 202)

        r = self.cli("subscriptions", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        listed = {s["id"]: s for s in json.loads(r.stdout)}
        self.assertEqual(set(listed), {created_id, existing["id"]}, "only webhooks to public_url")
        self.assertEqual(listed[created_id]["filter"], "assets/proxies/*")
        self.wait_metric("iconik", created_id, 1)
        self.wait_metric("iconik", existing["id"], 1)

        self.fake.set_webhook_status(created_id, "FAILING")
        self.wait_metric("iconik", created_id, 0)
        self.wait_alerts(1)
        self.quiet_for(self.listings)
        cards, told = self.alerts_told()
        self.assertEqual(len(cards), 1)
        self.assertEqual([(t["kind"], t["id"], t["status"]) for t in told],
                         [("subscription_down", created_id, "FAILING")])
        self.assertEqual(metric(self.d, "iconik", existing["id"]), 1)

        self.fake.set_webhook_status(created_id, "ENABLED")
        self.wait_metric("iconik", created_id, 1)
        self.wait_alerts(2)
        self.quiet_for(self.listings)
        self.assertEqual([t["kind"] for t in self.alerts_told()[1]], ["subscription_down", "subscription_up"])
        self.assertEqual(len(self.teams.cards), 2)

        r = self.cli("unsubscribe", "iconik", created_id)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn(created_id, self.fake.webhooks)
        self.wait_metric("iconik", created_id, None)

        self.fake.drop_webhook(existing["id"])  # one that was listed, not created, and then deleted upstream
        self.wait_metric("iconik", existing["id"], 0)
        self.wait_alerts(3)
        self.assertEqual(self.alerts_told()[1][-1]["status"], "missing")


class ReadmeExampleTest(Watched):
    """The README's subscription commands, pasted as they are, work against the fakes."""

    def test_readme_commands(self):
        with open(os.path.join(support.ROOT, "README.md")) as f:
            readme = f.read()
        section = readme[readme.index("## Upstream subscriptions"):]
        block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
        commands = [line.split("#")[0].split() for line in block.splitlines() if line.strip()]
        self.assertEqual([c[2] for c in commands], ["subscribe", "subscribe", "subscriptions", "subscriptions",
                                                    "unsubscribe"])
        pv = fp.FakePreservica(username="hookd", password=PASSWORD, tenant="DEMO")
        self.addCleanup(pv.close)
        ik = fi.FakeIconik(app_id="app-1", auth_token="tok-1")
        self.addCleanup(ik.close)
        self.start("[preservica]\nsecret.key = %s\nserver = %s\nusername = hookd\npassword = %s\n"
                   "[iconik]\nurl = %s\napp_id = app-1\nauth_token = tok-1\nsecret.key = %s\n"
                   % (SECRET, pv.url, PASSWORD, ik.url, SECRET))
        outputs = []
        for argv in commands:
            self.assertEqual(argv[:2], ["python3", "hookd.py"])
            if argv[2] == "unsubscribe":  # the README's id is an example: use the one just created
                argv = argv[:4] + [outputs[0].strip()]
            r = self.cli(*argv[2:])
            self.assertEqual(r.returncode, 0, (argv, r.stderr))
            outputs.append(r.stdout)
        self.assertEqual(len(ik.webhooks), 2)
        self.assertEqual(len(json.loads(outputs[3])), 3)
        self.assertEqual(pv.subscriptions, {})


class ObserveTest(unittest.TestCase):
    """The health bookkeeping, one transaction at a time on a real sqlite file."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.conn = sqlite3.connect(os.path.join(tmp.name, "db"))
        self.addCleanup(self.conn.close)
        self.conn.executescript(alerts.SCHEMA + subscriptions.SCHEMA)
        self.settings = config.Section("hookd", {"alert.command": "/bin/true"}, config.HOOKD_KEYS)

    def see(self, *subs, complete=True, asked=None):
        listed = [subscriptions.Sub("iconik", i, "assets/*/*", "https://h/iconik", s) for i, s in subs]
        return subscriptions.observe(self.conn, self.settings, "iconik", listed, complete, now=asked)

    def state(self):
        return {i: (s, up) for _, i, _, _, s, up in self.conn.execute(
            "SELECT route, id, filter, url, status, up FROM subscriptions")}

    def told(self):
        return [(d["kind"], d["id"]) for (d,) in
                ((json.loads(t),) for (t,) in self.conn.execute("SELECT doc FROM alerts ORDER BY id"))]

    def test_each_change_of_health_is_told_once(self):
        self.assertEqual(self.see(("a", "ENABLED"), ("b", "DISABLED")), 0)
        self.assertEqual(self.see(("a", "FAILING"), ("b", "DISABLED")), 1)
        self.assertEqual(self.see(("a", "FAILING"), ("b", "DISABLED")), 0)
        self.assertEqual(self.see(("a", "FAILING")), 1)   # b disappeared
        self.assertEqual(self.see(("a", "FAILING")), 0)
        self.assertEqual(self.see(("a", "ENABLED"), ("b", "ENABLED")), 2)
        self.assertEqual(self.see(("a", "DELETED"), ("b", "ENABLED")), 1)
        self.assertEqual(self.told(), [("subscription_down", "a"), ("subscription_down", "b"),
                                       ("subscription_up", "a"), ("subscription_up", "b"),
                                       ("subscription_down", "a")])
        self.assertEqual(self.state(), {"a": ("DELETED", 0), "b": ("ENABLED", 1)})

    def test_unsubscribed_is_not_learned_again_from_a_listing_taken_before_the_delete(self):
        self.see(("a", "ENABLED"), ("b", "ENABLED"))
        subscriptions.forget(self.conn, "iconik", "a")
        self.assertEqual(self.see(("a", "ENABLED"), ("b", "ENABLED")), 0)
        self.assertEqual(self.see(("b", "ENABLED")), 0)
        self.assertEqual(self.told(), [])
        self.assertEqual(subscriptions.health(self.conn), [("iconik", "b", 1)])

    def test_a_listing_asked_for_before_a_subscribe_does_not_miss_it(self):
        asked = time.time() - 1  # the daemon asked for a listing, then `subscribe` recorded "a"
        self.see(("a", "ENABLED"), complete=False)
        self.assertEqual(self.see(asked=asked), 0)
        self.assertEqual(self.see(("a", "FAILING"), asked=asked), 0)
        self.assertEqual(self.state(), {"a": ("ENABLED", 1)})
        self.assertEqual(self.told(), [])
        self.assertEqual(self.see(), 1)  # a listing asked for later does
        self.assertEqual(self.told(), [("subscription_down", "a")])

    def test_first_seen_failing_is_told_and_partial_listings_miss_nothing(self):
        self.assertEqual(self.see(("a", "FAILING")), 1)
        self.assertEqual(self.see(("b", "ENABLED"), complete=False), 0)
        self.assertEqual(self.state(), {"a": ("FAILING", 0), "b": ("ENABLED", 1)})
        self.assertEqual(self.told(), [("subscription_down", "a")])


class WatcherTest(unittest.TestCase):
    """The daemon's check, one round at a time (``Watcher.check_all``), on a real App and FakeIconik."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.fake = fi.FakeIconik(app_id="app-1", auth_token="tok-1")
        self.addCleanup(self.fake.close)

    def app(self, token="tok-1"):
        app = support.app_from(self.tmp.name,
                       "[hookd]\nstate_dir = %s\npublic_url = https://hooks.example.org\nalert.command = /bin/true\n"
                       "[iconik]\nurl = %s\napp_id = app-1\nauth_token = %s\nsecret.key = %s\n"
                       % (self.tmp.name, self.fake.url, token, SECRET))
        self.assertEqual(app.problems, [])
        app.open_store()
        self.addCleanup(app.store.close)
        return app

    def state(self, app):
        return [(s.id, s.status, s.up) for s in app.store.read(subscriptions.known).values()]

    def outbox(self, app):
        return app.store.read(lambda c: c.execute("SELECT count(*) FROM alerts").fetchone()[0])

    def test_a_failing_listing_changes_nothing(self):
        app = self.app()
        created, _ = subscriptions.upstream_for(app, "iconik").subscribe()
        watcher = subscriptions.Watcher(app)
        watcher.check_all()
        ids = sorted(s.id for s in created)
        self.assertEqual(sorted(self.state(app)), sorted((i, "ENABLED", True) for i in ids))
        self.fake.close()  # iconik unreachable: nothing is known to be wrong with the webhooks
        watcher.check_all()
        self.assertEqual(sorted(self.state(app)), sorted((i, "ENABLED", True) for i in ids))
        self.assertEqual(self.outbox(app), 0)

    def test_unusable_ids_are_not_kept(self):
        app = self.app()
        for bad in ("x" * 5000, "a\nb", ""):
            self.fake.webhooks[bad] = {"id": bad, "event_type": "assets", "realm": "entity", "operation": None,
                                       "url": "https://hooks.example.org/iconik", "status": "ENABLED"}
        self.fake.webhooks["ok-1"] = dict(self.fake.webhooks["a\nb"], id="ok-1")
        subscriptions.Watcher(app).check_all()
        self.assertEqual(self.state(app), [("ok-1", "ENABLED", True)])

    def test_refused_credentials_say_which_keys(self):
        app = self.app(token="wrong")
        with self.assertRaises(Fail) as caught:
            subscriptions.upstream_for(app, "iconik").listing()
        self.assertIn("app_id and auth_token", str(caught.exception))
        subscriptions.Watcher(app).check_all()  # logged, not raised
        self.assertEqual(self.state(app), [])


class ConfigTest(unittest.TestCase):
    def problems(self, text):
        with tempfile.TemporaryDirectory() as tmp:
            return support.app_from(tmp, "[hookd]\nstate_dir = %s\n%s" % (tmp, text)).problems

    def test_check_interval_and_public_url(self):
        self.assertEqual(self.problems("subscriptions.check_interval = 0\npublic_url = https://h.example\n"), [])
        self.assertEqual(self.problems("subscriptions.check_interval = 0.5\n"), [])
        for bad in ("subscriptions.check_interval = 0.1", "subscriptions.check_interval = -1",
                    "subscriptions.check_interval = soon", "public_url = hooks.example.org",
                    "public_url = https://h.example/?x=1"):
            self.assertEqual(len(self.problems(bad + "\n")), 1, bad)


if __name__ == "__main__":
    unittest.main()
