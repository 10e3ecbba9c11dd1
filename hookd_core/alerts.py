"""Alerts: tell a person once when an event goes dead, and when an upstream subscription turns unhealthy
or recovers, through ``alert.teams.url`` and/or ``alert.command`` ([hookd] keys).

Strategy: an outbox in sqlite. The transition that calls for an alert (an event's running -> dead, a
subscription's health flipping) writes one ``alerts`` row per configured target in the same transaction,
so a crash can neither lose the alert nor tell it twice for one transition. The daemon's ``Sender``
thread delivers the due rows: the Teams card through ``actions.post_teams`` (Workflows Adaptive Card),
the command through ``actions.run_command`` with the alert JSON on stdin. A failed delivery is retried
with the workers' backoff, durably (a restart carries on), at most ``MAX_ATTEMPTS`` times, then marked
``failed`` with one ERROR log line. An alert never creates an event and its failure never touches the
event's row, so it can neither loop nor undo the dead state. Sent and failed rows are pruned with the
events (``retention.days``).
"""

import json
import threading
import time

from . import actions, proc, workers
from .api import Fail, Retry

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
  id INTEGER PRIMARY KEY,
  target TEXT NOT NULL,                     -- teams | command
  doc TEXT NOT NULL,                        -- the alert as JSON (what the command gets on stdin)
  created_at REAL NOT NULL,
  status TEXT NOT NULL DEFAULT 'pending',   -- pending | sent | failed | dropped (target no longer set)
  attempts INTEGER NOT NULL DEFAULT 0,
  next_at REAL NOT NULL DEFAULT 0,
  last_error TEXT
);
CREATE INDEX IF NOT EXISTS alerts_due ON alerts(status, next_at);
"""

TARGETS = {"teams": "alert.teams.url", "command": "alert.command"}
MAX_ATTEMPTS = 10        # deliveries tried per alert and target (about 1.5 hours with the backoff below)
BASE_DELAY = 5           # seconds before the second try; doubled each time (with jitter) ...
MAX_DELAY = 900          # ... up to this
COMMAND_TIMEOUT = 60     # seconds alert.command may run; then its process group is killed (and retried)
POLL = 1.0               # seconds between looks at the outbox (the CLI may queue alerts too)


# -- what an alert says ----------------------------------------------------------------------------------

def dead_event(row, error, now=None):
    """The alert for event ``row`` (a store row dict, its ``attempts`` counted) that just went dead."""
    return {"kind": "event_dead", "route": row["route"], "id": row["id"], "attempts": row["attempts"],
            "last_error": error, "retry": "python3 hookd.py retry %d" % row["id"],
            "at": workers.iso(time.time() if now is None else now)}


def subscription_health(route, sub_id, up, status, url, reason, now=None):
    """The alert for a subscription that turned unhealthy (``up`` False) or recovered."""
    return {"kind": "subscription_up" if up else "subscription_down", "route": route, "id": sub_id,
            "status": status, "url": url, "reason": reason,
            "at": workers.iso(time.time() if now is None else now)}


def card(doc):
    """The Teams card ({"title", "facts", "text"}) of an alert."""
    if doc["kind"] == "event_dead":
        return {"title": "hookd: event %s (%s) is dead" % (doc["id"], doc["route"]),
                "text": "Retry it with: %s" % doc["retry"],
                "facts": [("Route", doc["route"]), ("Event", doc["id"]), ("Attempts", doc["attempts"]),
                          ("Last error", doc["last_error"] or ""), ("Retry", doc["retry"])]}
    what = "recovered" if doc["kind"] == "subscription_up" else "is unhealthy"
    return {"title": "hookd: %s subscription %s %s" % (doc["route"], doc["id"], what),
            "text": doc["reason"] or "",
            "facts": [("Route", doc["route"]), ("Subscription", doc["id"]), ("Status", doc["status"]),
                      ("URL", doc["url"] or "")]}


# -- writing them (inside the transaction of the transition) ----------------------------------------------

def queue(conn, settings, doc, now=None):
    """Add ``doc`` to the outbox once per configured target; returns how many rows were added."""
    now = time.time() if now is None else now
    text = json.dumps(doc)
    n = 0
    for target, key in TARGETS.items():
        if settings.get(key):
            conn.execute("INSERT INTO alerts(target, doc, created_at) VALUES (?, ?, ?)", (target, text, now))
            n += 1
    return n


def dead_hook(app):
    """The store's ``on_dead``: inside the transaction that makes an event dead (a worker's last attempt,
    a remote worker's dead, an expired last lease), queue its alert, count it and wake the sender. The
    alert rows go in under their own savepoint: if they cannot be written, the event is dead all the
    same (one ERROR line says the alert was lost)."""
    def went_dead(conn, event_id, error):
        route, attempts = conn.execute("SELECT route, attempts FROM events WHERE id=?", (event_id,)).fetchone()
        conn.execute("SAVEPOINT alert")
        try:
            queue(conn, app.settings, dead_event({"id": event_id, "route": route, "attempts": attempts}, error))
        except Exception:
            conn.execute("ROLLBACK TO alert")
            app.log.exception("the alert for dead event %s could not be stored", event_id)
        conn.execute("RELEASE alert")
        app.metrics.dead(route)
        if app.alerts is not None:
            app.alerts.wake.set()  # before the commit: a sender that looks too early looks again within POLL
    return went_dead


def prune(conn, cutoff):
    """Delete delivered, failed and dropped alerts created before ``cutoff`` (epoch seconds)."""
    return conn.execute("DELETE FROM alerts WHERE status != 'pending' AND created_at < ?", (cutoff,)).rowcount


# -- delivering them -------------------------------------------------------------------------------------

class Sender:
    """The daemon's alert thread. ``send_due()`` is one pass over the due rows (tests call it)."""

    def __init__(self, app):
        self.app = app
        self.wake = threading.Event()

    def start(self):
        t = threading.Thread(target=self._run, name="hookd-alerts", daemon=True)
        t.start()
        return t

    def _run(self):
        while not self.app.stopping.is_set():
            try:
                self.send_due()
            except Exception:
                self.app.log.exception("alert delivery pass failed")
            self.wake.wait(POLL)
            self.wake.clear()

    def send_due(self, now=None):
        """Deliver every due pending alert once; returns the number delivered."""
        now = time.time() if now is None else now
        rows = self.app.store.read(lambda c: c.execute(
            "SELECT id, target, doc, attempts FROM alerts WHERE status='pending' AND next_at <= ?"
            " ORDER BY id LIMIT 100", (now,)).fetchall())
        sent = 0
        for alert_id, target, text, attempts in rows:
            if self.app.stopping.is_set():
                break
            sent += self._deliver(alert_id, target, json.loads(text), attempts + 1)
        return sent

    def _deliver(self, alert_id, target, doc, attempt):
        settings, log = self.app.settings, self.app.log
        where = settings.get(TARGETS[target])
        if not where:
            self._set(alert_id, "dropped", attempt - 1, "alert.%s is no longer set" % target)
            return 0
        try:
            if target == "teams":
                note = actions.post_teams(where, "adaptive", card(doc))
            else:
                env = {"HOOKD_ALERT": doc["kind"], "HOOKD_ROUTE": str(doc["route"])}
                if doc["kind"] == "event_dead":
                    env["HOOKD_EVENT_ID"] = str(doc["id"])
                secrets = self.app.secrets()
                with self.app.children.job("alert %d" % alert_id):  # never outlives hookd (hookd_core/children.py)
                    note = actions.run_command(where, doc, COMMAND_TIMEOUT, proc.child_env(env, (), secrets),
                                               secrets)
        except Fail as e:
            log.error("alert %d (%s) not delivered to %s, giving up: %s", alert_id, doc["kind"], target, e)
            self._set(alert_id, "failed", attempt, str(e))
            return 0
        except Exception as e:  # Retry, or anything unexpected: tried again later
            reason = str(e) if isinstance(e, Retry) else "%s: %s" % (e.__class__.__name__, e)
            if attempt >= MAX_ATTEMPTS:
                log.error("alert %d (%s) not delivered to %s after %d attempts, giving up: %s", alert_id,
                          doc["kind"], target, attempt, reason)
                self._set(alert_id, "failed", attempt, reason)
                return 0
            delay = workers.backoff(attempt, BASE_DELAY, MAX_DELAY)
            if isinstance(e, Retry) and e.after is not None:
                delay = min(float(e.after), MAX_DELAY)
            log.warning("alert %d (%s) to %s failed (attempt %d), again in %.0fs: %s", alert_id, doc["kind"],
                        target, attempt, delay, reason)
            self._set(alert_id, "pending", attempt, reason, time.time() + delay)
            return 0
        log.info("alert %d (%s %s %s) sent to %s: %s", alert_id, doc["kind"], doc["route"], doc["id"], target,
                 note)
        self._set(alert_id, "sent", attempt, None)
        return 1

    def _set(self, alert_id, status, attempts, error, next_at=0.0):
        self.app.store.write(lambda c: c.execute(
            "UPDATE alerts SET status=?, attempts=?, last_error=?, next_at=? WHERE id=?",
            (status, attempts, error, next_at, alert_id)))
