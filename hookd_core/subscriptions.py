"""Upstream subscriptions: create, list and delete the Preservica subscriptions and iconik webhooks
that send hookd its events, and watch them while the daemon runs.

Strategy: one small class per upstream with the same calls, ``listing()`` and ``delete(id)``, plus its own
way to ``subscribe`` (Preservica: one trigger; iconik: the webhooks the analysis flow needs), built on
the integration's own API client (its login, token and allowed host). A listing is a list of ``Sub``.
What hookd knows lives in the ``subscriptions`` table: every subscription it created or listed, with
``up`` (1 healthy, 0 not). ``observe()`` compares one upstream's listing with that table inside one
transaction: a known subscription that is gone, ``FAILING`` or ``DELETED`` turns ``up`` to 0, one listed
healthy again turns it back to 1, and each flip queues one alert in the same transaction
(``alerts.queue``), so the CLI and the daemon may both observe and nobody alerts twice. The daemon's
``Watcher`` thread observes every ``subscriptions.check_interval`` seconds (fractions allowed, at least
``MIN_INTERVAL``; 0 is off); ``hookd_subscription_up`` is read from the table at scrape time. A listing
that fails (upstream down, login refused) changes nothing: it says nothing about the subscriptions.
Wire formats: Preservica ``/api/webhook/subscriptions`` (pyPreservica ``webHooksAPI.py``), iconik
``/API/notifications/v1/webhooks/`` (iconik OpenAPI ``WebhookCreateSchema``).
"""

import json
import threading
import time
import urllib.parse

from . import alerts, client
from .api import Fail, Retry

SCHEMA = """
CREATE TABLE IF NOT EXISTS subscriptions (
  route TEXT NOT NULL,
  id TEXT NOT NULL,
  filter TEXT,                  -- Preservica: the trigger type, iconik: event_type/realm/operation
  url TEXT,
  status TEXT NOT NULL,         -- what the upstream says (iconik ENABLED/DISABLED/FAILING/DELETED, Preservica present),
                                -- or missing, or unsubscribed (deleted by hookd: never watched again)
  up INTEGER NOT NULL,          -- 1 healthy, 0 gone or failing
  seen_at REAL NOT NULL,        -- last listed by the upstream
  changed_at REAL NOT NULL,     -- when up last changed
  PRIMARY KEY (route, id)
);
"""

MIN_INTERVAL = 0.5     # seconds; subscriptions.check_interval is 0 (off) or at least this
UNHEALTHY = ("FAILING", "DELETED")
MISSING = "missing"    # the status of a known subscription the upstream no longer lists
UNSUBSCRIBED = "unsubscribed"  # deleted through hookd: a check that listed it just before is not news
MAX_PAGES = 50         # iconik listing pages followed (100 webhooks each)
MAX_ID = 200           # characters; a longer id (or one with control characters) is not something we keep
PRESERVICA_TRIGGERS = ("FULL_TEXT_INDEXED", "MOVED", "INGEST_FAILED", "CHANGED_SECURITY_DESCRIPTOR",
                       "CHANGE_ASSET_VISIBILITY")
# The iconik webhooks the analysis flow needs: (event_type, realm, operation); None: every operation
# (the handler takes proxies created and updated).
ICONIK_NEEDED = (("assets", "entity", "create"), ("assets", "proxies", None))


class UpstreamError(Exception):
    """No upstream hookd can manage subscriptions of for a route (not configured, no credentials)."""


class Sub:
    """One upstream subscription: route, id, filter, url, status."""

    def __init__(self, route, sub_id, filter_, url, status):
        self.route, self.id, self.filter, self.url, self.status = route, sub_id, filter_, url, status
        self.up = self.seen_at = None  # what hookd last recorded, and when (known() sets them)

    @property
    def healthy(self):
        return self.status not in UNHEALTHY and self.status != MISSING

    def as_dict(self):
        return {"route": self.route, "id": self.id, "filter": self.filter, "url": self.url,
                "status": self.status}


def usable(doc):
    """True when ``doc`` is a listed object with an id hookd can keep, show and put in a metric label."""
    sub_id = doc.get("id") if isinstance(doc, dict) else None
    if isinstance(sub_id, int) and not isinstance(sub_id, bool):
        return True
    return isinstance(sub_id, str) and 0 < len(sub_id) <= MAX_ID and sub_id.isprintable()


def points_at(url, public_url):
    """True when ``url`` is below ``public_url`` (same scheme, host and port; path underneath)."""
    if not public_url or not isinstance(url, str):
        return False
    base = public_url.rstrip("/")
    return url == base or url.startswith(base + "/")


# -- the upstreams -----------------------------------------------------------------------------------------

class Upstream:
    """What both upstream clients share: the route, the URL they subscribe (public_url + the route's path),
    create with one POST, delete with one DELETE. A subclass sets NAME, PATH, TRIGGERS and ``call``."""

    NAME = PATH = REFUSED = ""
    TRIGGERS = ()  # the triggers ``subscribe`` takes; empty: it takes none

    def __init__(self, integ, public_url):
        self.integ, self.public_url = integ, public_url
        self.route = integ.name

    def target(self):
        return self.public_url.rstrip("/") + self.integ.route

    def call(self, method, path, body=None):
        raise NotImplementedError

    def post(self, doc):
        """POST ``doc`` to PATH; the created object (with an id), or Fail/Retry quoting the answer."""
        reply = client.check(self.call("POST", self.PATH, json.dumps(doc).encode("utf-8")), self.NAME,
                             self.REFUSED)
        created = reply.json()
        if not usable(created):
            raise Fail("%s answered %d without an id: %s" % (self.NAME, reply.status, client.excerpt(reply.body)))
        return created

    def delete(self, sub_id):
        """True when deleted (2xx: 204), False when the upstream does not know it (404)."""
        reply = self.call("DELETE", self.item_path(urllib.parse.quote(sub_id, safe="")))
        if reply.status == 404:
            return False
        client.check(reply, self.NAME, self.REFUSED)
        return True

    def item_path(self, quoted_id):
        return "%s/%s" % (self.PATH, quoted_id)


class PreservicaSubscriptions(Upstream):
    """``/api/webhook/subscriptions`` with the ``[preservica]`` login (Preservica-Access-Token)."""

    NAME = "Preservica"
    PATH = "/api/webhook/subscriptions"
    REFUSED = "[preservica] username and password (a user with ROLE_SDB_MANAGER_USER)"
    TRIGGERS = PRESERVICA_TRIGGERS

    def call(self, method, path, body=None):
        return self.integ.api.request(method, path, body=body)

    def listing(self):
        doc = client.check(self.call("GET", self.PATH), self.NAME, self.REFUSED).json()
        if not isinstance(doc, list):
            raise Fail("Preservica listed subscriptions as %s, not a list" % type(doc).__name__)
        return [self.sub(s) for s in doc if usable(s)]

    def sub(self, doc):
        return Sub(self.route, str(doc["id"]), str(doc.get("triggerType") or ""), doc.get("url"), "present")

    def subscribe(self, trigger):
        """(created, skipped): one new subscription of ``trigger`` to public_url + /preservica. Preservica
        runs the challenge against that URL while this POST waits; 200 is success."""
        body = {"url": self.target(), "triggerType": trigger, "secret": self.integ.conf.get("secret.key"),
                "includeIdentifiers": "true"}
        created = self.post(body)
        return [self.sub(dict({"url": body["url"], "triggerType": trigger}, **created))], []


class IconikWebhooks(Upstream):
    """``/API/notifications/v1/webhooks/`` with the ``[iconik]`` application token."""

    NAME = "iconik"
    PATH = "/API/notifications/v1/webhooks/"
    REFUSED = "[iconik] app_id and auth_token (the token's user needs the webhook roles)"

    def call(self, method, path, body=None):
        return self.integ.api.call(method, path, body=body)

    def item_path(self, quoted_id):
        return "%s%s/" % (self.PATH, quoted_id)

    def listing(self):
        out, path = [], self.PATH + "?per_page=100"
        for _ in range(MAX_PAGES):
            doc = client.check(self.call("GET", path), self.NAME, self.REFUSED).json()
            objects = doc.get("objects") if isinstance(doc, dict) else None
            if not isinstance(objects, list):
                raise Fail("iconik listed webhooks without an objects list")
            out += [self.sub(o) for o in objects if usable(o)]
            path = self.next_path(doc.get("next_url"))
            if path is None:
                break
        return out

    def next_path(self, next_url):
        """The path of ``next_url`` (relative to the host), or None at the end or if it leaves the host."""
        if not isinstance(next_url, str) or not next_url:
            return None
        parts = urllib.parse.urlsplit(next_url)
        if parts.netloc and parts.hostname != urllib.parse.urlsplit(self.integ.conf.get("url")).hostname:
            return None
        if not parts.path.startswith(self.PATH):
            return None
        return parts.path + ("?" + parts.query if parts.query else "")

    def sub(self, doc):
        return Sub(self.route, str(doc["id"]), event_filter(doc.get("event_type"), doc.get("realm"),
                                                            doc.get("operation")),
                   doc.get("url"), str(doc.get("status") or "?"))

    def subscribe(self, trigger=None):
        """(created, skipped): each webhook of ICONIK_NEEDED to public_url + /iconik, with the secret header,
        unless one with the same url, event_type, realm and operation exists (whatever its status)."""
        target = self.target()
        existing = {}
        for sub in self.listing():
            if sub.url == target:
                existing.setdefault(sub.filter, sub)
        created, skipped = [], []
        for event_type, realm, operation in ICONIK_NEEDED:
            name = event_filter(event_type, realm, operation)
            if name in existing:
                skipped.append(existing[name])
                continue
            body = {"name": "hookd %s" % name, "description": "created by hookd subscribe iconik",
                    "event_type": event_type, "realm": realm, "url": target, "status": "ENABLED",
                    "headers": {self.integ.conf.get("secret.header"): self.integ.conf.get("secret.key")}}
            if operation:
                body["operation"] = operation
            created.append(self.sub(dict(body, **self.post(body))))
        return created, skipped


def event_filter(event_type, realm, operation):
    """iconik's event filter as one word: event_type/realm/operation, ``*`` for a field left empty."""
    return "/".join(str(v) if v else "*" for v in (event_type, realm, operation))


def upstreams(app):
    """{route: client} for every configured integration whose subscriptions hookd can manage."""
    public_url = app.settings.get("public_url") or ""
    out = {}
    for integ in app.integrations:
        if integ.SECTION == "preservica" and all(integ.conf.get(k) for k in ("server", "username", "password")):
            out[integ.name] = PreservicaSubscriptions(integ, public_url)
        elif integ.SECTION == "iconik":
            out[integ.name] = IconikWebhooks(integ, public_url)
    return out


def upstream_for(app, route):
    """The client for ``route``, or UpstreamError saying why there is none."""
    found = upstreams(app).get(route)
    if found is None:
        if app.integration(route) is None:
            raise UpstreamError("no [%s] section is configured" % route)
        raise UpstreamError("[%s] has no subscription API hookd can use (Preservica needs server, username "
                            "and password)" % route)
    return found


# -- what hookd knows (each function runs inside one store.write transaction) ------------------------------

def known(conn, route=None):
    """{(route, id): Sub} of every subscription hookd created or listed (and did not unsubscribe), with
    its ``up`` and ``seen_at``."""
    sql = "SELECT route, id, filter, url, status, up, seen_at FROM subscriptions WHERE status != ?"
    args = (UNSUBSCRIBED,)
    if route is not None:
        sql, args = sql + " AND route = ?", args + (route,)
    out = {}
    for r, i, f, u, s, up, seen_at in conn.execute(sql + " ORDER BY route, id", args):
        sub = Sub(r, i, f, u, s)
        sub.up, sub.seen_at = bool(up), seen_at
        out[(r, i)] = sub
    return out


def observe(conn, settings, route, listed, complete=True, now=None):
    """Record ``listed`` (one upstream's subscriptions that point at hookd or are known) for ``route``, as
    the upstream listed them at ``now`` (when the listing was asked for). With ``complete``, known ones
    not in ``listed`` are missing. A subscription recorded after ``now`` (a ``subscribe`` or another look
    that finished meanwhile) is left as it is: this listing is older news. Every change of health queues
    one alert; returns the number of changes."""
    now = time.time() if now is None else now
    before = known(conn, route)
    gone = set(i for (i,) in conn.execute("SELECT id FROM subscriptions WHERE route=? AND status=?",
                                          (route, UNSUBSCRIBED)))
    changes = 0
    for sub in listed:
        if sub.id in gone:
            continue
        old = before.pop((route, sub.id), None)
        if old is not None and old.seen_at > now:
            continue
        up = 1 if sub.healthy else 0
        if old is None:
            conn.execute("INSERT INTO subscriptions(route, id, filter, url, status, up, seen_at, changed_at)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (route, sub.id, sub.filter, sub.url, sub.status, up, now, now))
            flipped = not up  # first seen unhealthy: worth telling; first seen healthy: nothing changed
        else:
            flipped = bool(up) != old.up
            conn.execute("UPDATE subscriptions SET filter=?, url=?, status=?, up=?, seen_at=?,"
                         " changed_at=CASE WHEN ? THEN ? ELSE changed_at END WHERE route=? AND id=?",
                         (sub.filter, sub.url, sub.status, up, now, flipped, now, route, sub.id))
        if flipped:
            changes += 1
            reason = "status %s" % sub.status if not up else "listed again with status %s" % sub.status
            alerts.queue(conn, settings, alerts.subscription_health(route, sub.id, up, sub.status, sub.url,
                                                                    reason, now), now)
    if complete:
        for old in before.values():
            if old.status == MISSING or old.seen_at > now:
                continue
            conn.execute("UPDATE subscriptions SET status=?, up=0, changed_at=CASE WHEN up=1 THEN ? ELSE"
                         " changed_at END WHERE route=? AND id=?", (MISSING, now, route, old.id))
            if old.up:
                changes += 1
                alerts.queue(conn, settings, alerts.subscription_health(
                    route, old.id, False, MISSING, old.url, "no longer listed by %s" % route, now), now)
    return changes


def forget(conn, route, sub_id, now=None):
    """Mark a subscription deleted through hookd: no longer shown, watched or in the metric, also when a
    check that listed it just before the delete records its listing after this."""
    now = time.time() if now is None else now
    conn.execute("DELETE FROM subscriptions WHERE route=? AND id=?", (route, sub_id))
    conn.execute("INSERT INTO subscriptions(route, id, status, up, seen_at, changed_at) VALUES (?, ?, ?, 0, ?, ?)",
                 (route, sub_id, UNSUBSCRIBED, now, now))


def health(conn):
    """[(route, id, up)] for the metric."""
    return conn.execute("SELECT route, id, up FROM subscriptions WHERE status != ? ORDER BY route, id",
                        (UNSUBSCRIBED,)).fetchall()


# -- one look at one upstream (the CLI and the daemon) ----------------------------------------------------

def check(app, route, upstream):
    """List ``route``'s subscriptions, keep those that point at public_url or are known, observe them.
    Returns the number of health changes. Raises Retry or Fail when the listing fails."""
    asked = time.time()
    listed = upstream.listing()
    ids = set(sub_id for (_, sub_id) in app.store.read(lambda c: known(c, route)))
    ours = [s for s in listed if points_at(s.url, upstream.public_url) or s.id in ids]
    changes = app.store.write(lambda c: observe(c, app.settings, route, ours, now=asked))
    if changes and getattr(app, "alerts", None) is not None:
        app.alerts.wake.set()
    return changes


def worth_checking(app, route):
    """Only upstreams that can have a subscription of ours: public_url is set, or hookd knows one."""
    if app.settings.get("public_url"):
        return True
    return bool(app.store.read(lambda c: known(c, route)))


class Watcher:
    """The daemon's thread that checks the subscriptions every ``subscriptions.check_interval`` seconds
    (read again every second, so a SIGHUP that changes it takes effect at once). ``check_all()`` is one
    round (tests call it)."""

    def __init__(self, app):
        self.app = app

    def start(self):
        t = threading.Thread(target=self._run, name="hookd-subscriptions", daemon=True)
        t.start()
        return t

    def _run(self):
        last = time.monotonic()
        while True:
            interval = self.app.settings.float("subscriptions.check_interval")
            if self.app.stopping.wait(min(interval, 1.0) if interval > 0 else 1.0):
                return
            if interval > 0 and time.monotonic() - last >= interval:
                last = time.monotonic()
                self.check_all()

    def check_all(self):
        """Check every upstream once; a failing one is logged and changes nothing."""
        log = self.app.log
        for route, upstream in upstreams(self.app).items():
            if self.app.stopping.is_set() or not worth_checking(self.app, route):
                continue
            try:
                changes = check(self.app, route, upstream)
            except (Retry, Fail) as e:
                log.warning("subscriptions: listing %s failed; health unchanged: %s", route, e)
                continue
            except Exception:
                log.exception("subscriptions: checking %s failed", route)
                continue
            if changes:
                log.warning("subscriptions: %d change(s) of health on %s (see hookd_subscription_up)",
                            changes, route)
