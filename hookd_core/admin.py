"""The admin API, served on its own listener (``admin.listen``), never on the webhook port.

Strategy: ``dispatch(app, req)`` takes an ``api.Request`` read by the server's request reader and returns
an ``api.Response`` (or raises ``Reject``). The console (``/``, ``/ui/...``) is asked first: it applies
the same token rule itself, also through its login session. For everything else the bearer token is
checked first (when ``admin.token`` is set, every request needs it, loopback included: behind a reverse
proxy on the same host every peer is loopback), then each ``handle(app, req)`` is asked in turn; a
handle answers for the paths it owns and returns None for the rest. The core's own: /healthz, /readyz,
/metrics, /events, /events/{id}, POST /events/{id}/retry|replay; the lease API for remote workers
(``leases.handle``, /work/...); then each integration's ``admin_get``.
A path served for other methods only is 405 with ``Allow``; API POSTs need ``Content-Type:
application/json`` (415), so a cross-site HTML form can never send one. ``listen_address`` parses ``admin.listen`` and
``check`` says what check-config refuses (no token on a non-loopback listener).
"""

import base64
import hmac
import ipaddress
import json
import re
import time

from . import console, leases
from .api import NotFound, Reject, Response, stored_payload
from .config import ConfigError, parse_hostport
from .store import STATUSES, list_events, row_dict
from .workers import iso

DEFAULT_LIMIT, MAX_LIMIT = 100, 10000  # /events?limit=: more than MAX_LIMIT is cut to it
_EVENT = re.compile(r"/events/([0-9]{1,18})")
_EVENT_ACTION = re.compile(r"/events/([0-9]{1,18})/(retry|replay)")


def listen_address(text):
    """``admin.listen`` as None (no admin API), a unix socket path (str), or (host, port).
    Raises ConfigError."""
    text = (text or "").strip()
    if not text:
        return None
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ConfigError("[hookd] admin.listen = unix:PATH needs an absolute path")
        return path
    return parse_hostport(text, "[hookd] admin.listen")


def check(settings):
    """check-config's problems with the admin settings, one string each."""
    try:
        where = listen_address(settings.get("admin.listen"))
    except ConfigError as e:
        return [str(e)]
    if isinstance(where, tuple) and not settings.get("admin.token") and not _loopback(where[0]):
        return ["[hookd] admin.listen = %s is not loopback: set admin.token, or listen on 127.0.0.1 or "
                "unix:/path" % settings.get("admin.listen")]
    return []


def _loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authorised(token, req):
    """True when no token is configured (the listener is loopback or a unix socket, check() saw to
    it), or the request carries ``Authorization: Bearer <token>`` (compared in constant time)."""
    if not token:
        return True
    auth = req.headers.get("Authorization") or ""
    return auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip(" \t").encode(), token.encode())


def dispatch(app, req):
    """The answer to one admin request: a Response, or Reject raised. The console comes first: it checks
    the token itself, so that a browser without it gets a login form rather than a bare 401."""
    r = console.handle(app, req)
    if r is not None:
        return r
    if not authorised(app.settings.get("admin.token"), req):
        raise Reject("admin API needs the admin token", status=401, headers=[("WWW-Authenticate", "Bearer")])
    for handle in (handle_core, leases.handle, handle_integrations):
        r = handle(app, req)
        if r is not None:
            return r
    raise NotFound("no admin route for %s" % req.path[:200])


def allow(req, *methods):
    """Refuse (405 with Allow) a request whose method is not one of ``methods``."""
    if req.method not in methods:
        raise Reject("method not allowed", status=405, headers=[("Allow", ", ".join(methods))])


def needs_json(req):
    """API POSTs carry JSON (415 otherwise): an HTML form cannot send that content type cross-site."""
    kind = (req.headers.get("Content-Type") or "").split(";")[0].strip(" \t").lower()
    if kind != "application/json":
        raise Reject("Content-Type must be application/json", status=415)


def readyz(app):
    """The /readyz answer, on both listeners: 503 only when this instance cannot take webhooks."""
    status, why = app.ready()
    return Response(503 if status == "unavailable" else 200, {"status": status, "reason": why})


def handle_core(app, req):
    path = req.path
    if path == "/healthz":
        allow(req, "GET")
        return Response(200, {"status": "ok"})
    if path == "/readyz":
        allow(req, "GET")
        return readyz(app)
    if path == "/metrics":
        allow(req, "GET")
        return Response(200, app.metrics.render(app.store).encode(), "text/plain; version=0.0.4")
    if path == "/events":
        allow(req, "GET")
        status, route, limit = events_query(req)
        rows = app.store.read(lambda c: list_events(c, status, route, limit))
        return Response(200, [public_event(r) for r in rows])
    m = _EVENT.fullmatch(path)
    if m:
        allow(req, "GET")
        row = app.store.read(lambda c: row_dict(c, int(m.group(1)), with_body=True))
        if row is None:
            raise NotFound("no event %s" % m.group(1))
        return Response(200, public_event(row, full=True))
    m = _EVENT_ACTION.fullmatch(path)
    if m:
        allow(req, "POST")
        needs_json(req)
        event_id = int(m.group(1))
        if m.group(2) == "retry":
            ids = app.store.retry(event_id)
            if not ids:
                raise Reject("event %d is not dead or retrying" % event_id, status=409)
            app.pool.wake_at(time.time())
            return Response(200, {"ids": ids, "status": "queued"})
        new_id = app.store.replay(event_id)
        if new_id is None:
            raise NotFound("no event %d" % event_id)
        app.pool.wake_at(time.time())
        return Response(202, {"id": new_id, "status": "queued"})
    return None


def events_query(req):
    """(status, route, limit) from /events?status=&route=&limit=; a bad value is 400 with its reason."""
    status = req.query1("status") or None
    if status is not None and status not in STATUSES:
        raise Reject("status must be one of %s" % ", ".join(STATUSES), status=400)
    limit = req.query1("limit") or str(DEFAULT_LIMIT)
    if not re.fullmatch(r"[0-9]{1,9}", limit) or int(limit) < 1:
        raise Reject("limit must be a whole number from 1 (at most %d are returned)" % MAX_LIMIT, status=400)
    return status, req.query1("route") or None, min(int(limit), MAX_LIMIT)


def handle_integrations(app, req):
    """An integration's admin paths (``admin_get``), GET only."""
    for integ in app.integrations:
        r = integ.admin_get(req)
        if r is not None:
            allow(req, "GET")
            return r
    return None


def public_event(row, full=False):
    """An event as the CLI and the admin API show it."""
    out = {"id": row["id"], "route": row["route"], "status": row["status"], "attempts": row["attempts"],
           "received_at": iso(row["received_at"]), "updated_at": iso(row["updated_at"]),
           "next_attempt_at": iso(row["next_at"]) if row["status"] == "retry" else None,
           "last_error": row["last_error"], "note": row["note"]}
    if full:
        out["duplicate_of"] = row.get("duplicate_of")
        out["headers"] = json.loads(row["headers"]) if row.get("headers") else {}
        out["content_type"] = row.get("content_type")
        body = row.get("body") or b""
        out["payload"] = stored_payload(row.get("payload"), body, row.get("element"))
        try:
            out["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            out["body_base64"] = base64.b64encode(body).decode()
    return out
