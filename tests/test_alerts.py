"""Alerts (SPEC §7): an event that goes dead is told once to alert.teams.url and alert.command, with its
route, id, attempts, last error and the CLI line that retries it; a failing alert is retried durably,
gives up after a bound, and never touches the event.

The outbox is driven by hand here (``Worker.loop()`` and ``Sender.send_due()`` on a real App, store,
FakeTeams and recording command), then once end to end through the real daemon.
"""

import glob
import json
import os
import sys
import tempfile
import textwrap
import unittest

from hookd_core import alerts
from hookd_core.app import App
from hookd_core.workers import Pool
from tests import support
from tests.fake_teams import FakeTeams

# alert.command: record stdin and the HOOKD_* environment into DIR/<n>.json, exit with DIR/exit (default 0)
RECORDER = textwrap.dedent("""\
    import json, os, sys
    folder = sys.argv[1]
    n = len([p for p in os.listdir(folder) if p.endswith(".json")])
    doc = {"stdin": json.loads(sys.stdin.read()),
           "env": {k: v for k, v in os.environ.items() if k.startswith("HOOKD_")}, "names": sorted(os.environ)}
    with open(os.path.join(folder, "%d.tmp" % n), "w") as f:
        json.dump(doc, f)
    os.replace(os.path.join(folder, "%d.tmp" % n), os.path.join(folder, "%d.json" % n))  # seen whole or not at all
    code = os.path.join(folder, "exit")
    sys.exit(int(open(code).read()) if os.path.exists(code) else 0)
""")


def recorder(tmp):
    """(command line, folder) of a recording alert.command in ``tmp``."""
    script = os.path.join(tmp, "alert.py")
    with open(script, "w") as f:
        f.write(RECORDER)
    folder = os.path.join(tmp, "alerts")
    os.makedirs(folder)
    return "%s %s %s" % (sys.executable, script, folder), folder


def recorded(folder):
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json")), key=lambda p: int(os.path.basename(p)[:-5])):
        with open(path) as f:
            out.append(json.load(f))
    return out


def card_text(doc):
    """Every string of a Teams card, joined (to look for the retry line wherever the card puts it)."""
    return json.dumps(doc)


class OutboxTest(unittest.TestCase):
    """The worker path and the sender, one step at a time."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.teams = FakeTeams()
        self.addCleanup(self.teams.close)
        self.command, self.folder = recorder(self.tmp.name)
        self.app = self.make_app(self.teams.workflow_url, self.command)

    def make_app(self, teams_url, command):
        app = support.app_from(self.tmp.name,
                       "[hookd]\nstate_dir = %s\nretry.max_attempts = 2\nretry.base_delay = 0\n"
                       "alert.teams.url = %s\nalert.command = %s\n"
                       "[hook:w]\nverify = none\nallow_unsigned = true\ndedupe = none\n"
                       "command = %s -c \"import sys; sys.exit('upstream said no')\"\n"
                       % (self.tmp.name, teams_url, command, sys.executable))
        self.assertEqual(app.problems, [])
        app.open_store()
        self.addCleanup(app.store.close)
        self.pool = Pool(app, 1)
        return app

    def dead_event(self):
        """Store an event whose command always fails and run it until it is dead; returns its id."""
        row = {"dedupe_key": None, "serial_key": None, "headers": "{}", "content_type": "application/json",
               "body": b'{"x": 1}', "payload": None}
        [(eid, _)] = self.app.store.add_events("hook:w", [row])
        self.assertEqual(self.attempts(), ["retry", "dead"])
        return eid

    def attempts(self):
        """Run the event twice, each outcome committed before the next look at the queue."""
        outcomes = []
        for _ in range(2):
            self.pool.schedule_once(now=1e12)
            outcomes.append(self.pool.workers[0].loop(timeout=0))
            self.app.store.write(lambda conn: None)  # writes commit in order: the outcome is stored
        return outcomes

    def outbox(self):
        return self.app.store.read(lambda c: c.execute(
            "SELECT target, status, attempts FROM alerts ORDER BY id").fetchall())

    def test_dead_event_is_told_once_to_teams_and_command(self):
        eid = self.dead_event()
        sender = alerts.Sender(self.app)
        self.assertEqual(sender.send_due(), 2)
        self.assertEqual(sender.send_due(), 0, "an alert is told once")
        self.assertEqual(len(self.teams.cards), 1)
        kind, card = self.teams.cards[0]
        self.assertEqual(kind, "adaptive")
        text = card_text(card)
        for part in ("hook:w", str(eid), "upstream said no", "python3 hookd.py retry %d" % eid):
            self.assertIn(part, text)
        [told] = recorded(self.folder)
        doc = told["stdin"]
        self.assertEqual((doc["kind"], doc["route"], doc["id"], doc["attempts"]), ("event_dead", "hook:w", eid, 2))
        self.assertIn("upstream said no", doc["last_error"])
        self.assertEqual(doc["retry"], "python3 hookd.py retry %d" % eid)
        self.assertEqual(told["env"]["HOOKD_ALERT"], "event_dead")
        self.assertEqual(told["env"]["HOOKD_EVENT_ID"], str(eid))
        self.assertIn('hookd_dead_events_total{route="hook:w"} 1', self.app.metrics.render(self.app.store))

    def test_alert_command_gets_a_clean_environment(self):
        os.environ["ALERTS_TEST_SECRET"] = "s3cret-in-hookds-environment"
        self.addCleanup(os.environ.pop, "ALERTS_TEST_SECRET")
        self.dead_event()
        alerts.Sender(self.app).send_due()
        [told] = recorded(self.folder)
        allowed = {"PATH", "LANG", "TZ", "HOME", "HOOKD_ALERT", "HOOKD_ROUTE", "HOOKD_EVENT_ID", "HOOKD_JOB"}
        self.assertEqual([n for n in told["names"] if n not in allowed and not n.startswith("LC_")], [])

    def leased_event(self):
        row = {"dedupe_key": None, "serial_key": None, "headers": "{}", "content_type": "application/json",
               "body": b'{"x": 2}', "payload": None}
        [(eid, _)] = self.app.store.add_events("hook:w", [row])
        [(lease, _)] = self.app.store.lease(["hook:w"], 1, 30, "remote-1")
        return eid, lease["lease_id"]

    def test_remote_worker_giving_up_is_told_once(self):
        eid, lease_id = self.leased_event()
        for _ in range(2):  # the same verb repeated changes nothing
            self.app.store.end_lease(lease_id, "dead", lambda held: ("dead", "camera unreachable", None, 0.0))
        self.assertEqual(alerts.Sender(self.app).send_due(), 2)
        [told] = recorded(self.folder)
        self.assertEqual((told["stdin"]["id"], told["stdin"]["last_error"]), (eid, "camera unreachable"))
        self.assertEqual(len(self.teams.cards), 1)

    def test_last_lease_expiring_is_told_once(self):
        eid, _ = self.leased_event()
        self.app.store.expire_leases(max_attempts=1, now=1e12)
        self.app.store.expire_leases(max_attempts=1, now=1e12)
        alerts.Sender(self.app).send_due()
        [told] = recorded(self.folder)
        self.assertEqual(told["stdin"]["id"], eid)
        self.assertIn("expired", told["stdin"]["last_error"])
        self.assertIn('hookd_dead_events_total{route="hook:w"} 1', self.app.metrics.render(self.app.store))

    def test_retried_by_hand_and_dead_again_is_a_new_alert(self):
        eid = self.dead_event()
        self.assertEqual(self.app.store.retry(eid), [eid])
        self.assertEqual(self.attempts(), ["retry", "dead"])
        self.assertEqual(alerts.Sender(self.app).send_due(), 4)
        self.assertEqual(len(self.teams.cards), 2)
        self.assertIn('hookd_dead_events_total{route="hook:w"} 2', self.app.metrics.render(self.app.store))

    def test_failing_alert_is_retried_then_given_up_and_the_event_stays_dead(self):
        eid = self.dead_event()
        self.teams.status = 500
        with open(os.path.join(self.folder, "exit"), "w") as f:
            f.write("3")
        sender = alerts.Sender(self.app)
        self.assertEqual(sender.send_due(), 0)
        self.assertEqual(self.outbox(), [("teams", "pending", 1), ("command", "pending", 1)])
        self.assertEqual(sender.send_due(), 0, "not due again before its backoff")
        for _ in range(alerts.MAX_ATTEMPTS + 3):
            sender.send_due(now=1e12)
        self.assertEqual(self.outbox(), [("teams", "failed", alerts.MAX_ATTEMPTS),
                                         ("command", "failed", alerts.MAX_ATTEMPTS)])
        self.assertEqual(len(recorded(self.folder)), alerts.MAX_ATTEMPTS)
        self.assertEqual(self.teams.count("/workflow/"), alerts.MAX_ATTEMPTS)
        status = self.app.store.read(lambda c: c.execute("SELECT status FROM events WHERE id=?", (eid,)).fetchone())
        self.assertEqual(status[0], "dead")
        self.assertEqual(self.app.store.read(lambda c: c.execute("SELECT count(*) FROM events").fetchone())[0], 1,
                         "an alert never becomes an event")

    def test_alert_that_recovers_is_sent_once(self):
        self.dead_event()
        self.teams.status = 503
        sender = alerts.Sender(self.app)
        sender.send_due()
        self.teams.status = None
        self.assertEqual(sender.send_due(now=1e12), 1)
        self.assertEqual(sender.send_due(now=1e12), 0)
        self.assertEqual(len(self.teams.cards), 1)

    def test_refused_card_gives_up_at_once(self):
        self.app = self.make_app(self.teams.url + "/nowhere", "")
        self.dead_event()
        alerts.Sender(self.app).send_due()
        self.assertEqual(self.outbox(), [("teams", "failed", 1)])

    def test_no_target_no_outbox_but_the_metric_counts(self):
        self.app = self.make_app("", "")
        self.dead_event()
        self.assertEqual(self.outbox(), [])
        self.assertIn('hookd_dead_events_total{route="hook:w"} 1', self.app.metrics.render(self.app.store))

    def test_target_removed_before_delivery_is_dropped(self):
        self.dead_event()
        self.app = self.make_app("", self.command)  # a reload took alert.teams.url away
        self.assertEqual(alerts.Sender(self.app).send_due(), 1)
        self.assertEqual(self.outbox(), [("teams", "dropped", 0), ("command", "sent", 1)])

    def test_check_config_refuses_bad_alert_keys(self):
        path = os.path.join(self.tmp.name, "bad.properties")
        with open(path, "w") as f:
            f.write("[hookd]\nstate_dir = %s\nalert.teams.url = ftp://x\nalert.command = 'unclosed\n" % self.tmp.name)
        problems = App(path).problems
        self.assertTrue(any("alert.teams.url" in p for p in problems), problems)
        self.assertTrue(any("alert.command" in p for p in problems), problems)


class DaemonAlertTest(unittest.TestCase):
    """End to end: the real daemon, a FakeTeams, a recording command; one dead event, one alert each."""

    def test_dead_event_alerts_once(self):
        tmp = tempfile.mkdtemp(prefix="hookd-alerts-")
        teams = FakeTeams()
        self.addCleanup(teams.close)
        command, folder = recorder(tmp)
        d = support.Daemon("[hookd]\nretry.max_attempts = 2\nretry.base_delay = 0.05\nretry.max_delay = 0.1\n"
                           "alert.teams.url = %s\nalert.command = %s\n"
                           "[hook:w]\nverify = none\nallow_unsigned = true\n"
                           "forward = %s/refuses\nforward.timeout = 5\n"
                           % (teams.workflow_url, command, teams.url), tmpdir=tmp)
        d.start()
        self.addCleanup(d.stop)
        status, _, body = d.post("/hooks/w", b'{"n": 1}', {"Content-Type": "application/json"})
        self.assertEqual(status, 202)
        eid = json.loads(body)["id"]
        d.wait_status(eid, "dead")
        support.wait_until(lambda: teams.cards and recorded(folder), 15, message="both alerts")
        [(kind, card)] = teams.cards
        self.assertIn("python3 hookd.py retry %d" % eid, card_text(card))
        [told] = recorded(folder)
        self.assertEqual((told["stdin"]["id"], told["stdin"]["route"]), (eid, "hook:w"))
        self.assertIn("404", told["stdin"]["last_error"])
        _, _, text = d.admin("GET", "/metrics")
        self.assertIn('hookd_dead_events_total{route="hook:w"} 1', text.decode())
        d.stop()
        d.start()  # a restart tells the next dead event, and not the first one again
        status, _, body = d.post("/hooks/w", b'{"n": 2}', {"Content-Type": "application/json"})
        second = json.loads(body)["id"]
        d.wait_status(second, "dead")
        support.wait_until(lambda: len(teams.cards) == 2 and len(recorded(folder)) == 2, 15,
                           message="the second event's alerts")
        self.assertIn("python3 hookd.py retry %d" % second, card_text(teams.cards[1][1]))
        self.assertEqual([t["stdin"]["id"] for t in recorded(folder)], [eid, second])

if __name__ == "__main__":
    unittest.main()
