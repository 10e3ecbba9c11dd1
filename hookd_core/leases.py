"""The lease API on the admin listener: remote workers take due jobs, keep them alive and report how they ended.

Strategy (after Hookaido's pull mode and qhook's workers, with the store as the only truth): a lease is a
row in the store's ``leases`` table next to the event it covers, so a crash of this hookd loses no lease.
``POST /work/lease`` turns up to ``max`` due events of the asked routes into running events with a lease
each, in one transaction that skips any event whose serial key is running anywhere (local worker or
another lease), and waits up to ``wait`` seconds (long poll) when nothing is due. ``extend``, ``done``,
``retry`` and ``dead`` act on a held lease only; the same verb repeated is answered 200 again, anything
else on an ended, overdue or unknown lease is 409 and changes nothing. The scheduler calls ``sweep``
about once a second: an overdue lease ends as expired and its event goes back to the queue (its attempt
counted). ``handle(app, req)`` answers a ``/work/...`` path and returns None for any other path; the
admin dispatcher (``admin.dispatch``) asks it after checking the admin token. Routes with
``remote = true`` are left to remote workers by the pool.
"""

import json
import re
import time

from . import admin
from .actions import event_document
from .api import NotFound, Reject, Response
from .logs import EventLog
from .workers import after_failure, iso, make_context

PREFIX = "/work/"
VERBS = ("extend", "done", "retry", "dead")
DEFAULT_WAIT = 20        # seconds a lease call waits for work when nothing is due
MAX_WAIT = 60
DEFAULT_SECONDS = 30     # seconds a lease lasts unless extended
MAX_SECONDS = 3600
MAX_JOBS = 100           # events one lease call may take
MAX_TEXT = 1000          # characters of a note or error kept
POLL = 1.0               # seconds between looks at the queue while waiting (retries come due unannounced)
LEASE_ID = re.compile(r"[0-9a-f]{32}")
WORKER_NAME = re.compile(r"[A-Za-z0-9_.:@/+-]{1,100}")
CONFLICT = {"unknown": "no such lease", "ended": "lease already ended with another verb",
            "expired": "lease expired; the event went back to the queue"}


def handle(app, req):
    """Answer a ``/work/...`` request (the admin dispatcher checked the token); None for other paths.
    Refusals are raised as ``Reject`` (the listener answers them with one log line)."""
    if not req.path.startswith(PREFIX):
        return None
    admin.allow(req, "POST")
    admin.needs_json(req)
    body = req.json()
    if not isinstance(body, dict):
        raise Reject("the body must be a JSON object", status=422)
    parts = req.path[len(PREFIX):].split("/")
    if parts == ["lease"]:
        return lease(app, req, body)
    if len(parts) == 2 and parts[1] in VERBS and LEASE_ID.fullmatch(parts[0]):
        if parts[1] == "extend":
            return extend(app, parts[0], body)
        return end(app, parts[0], parts[1], body)
    raise NotFound("no such lease API path")


# -- POST /work/lease ---------------------------------------------------------------------------------

def lease(app, req, body):
    routes = body.get("routes")
    if not isinstance(routes, list) or not routes or len(routes) > 100 or not all(
            isinstance(r, str) and 0 < len(r) <= 200 for r in routes):
        raise Reject("routes must be a non-empty list of route names", status=422)
    max_jobs = _number(body, "max", 1, 1, MAX_JOBS, whole=True)
    seconds = _number(body, "lease_seconds", DEFAULT_SECONDS, 1, MAX_SECONDS)
    wait = _number(body, "wait", DEFAULT_WAIT, 0, MAX_WAIT)
    worker = body.get("worker", req.client)
    if not isinstance(worker, str) or not WORKER_NAME.fullmatch(worker):
        raise Reject("worker must be 1-100 characters of A-Z a-z 0-9 _ . : @ / + -", status=422)
    routes = list(dict.fromkeys(routes))
    deadline = time.monotonic() + wait
    got = app.store.lease(routes, max_jobs, seconds, worker, req.client)
    while not got and not app.stopping.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        app.pool.wait_for_work(min(left, POLL))
        if not req.connected():  # a worker killed while it waited must not be handed a job
            break
        if app.store.read(lambda c: _due(c, routes, time.time())):
            got = app.store.lease(routes, max_jobs, seconds, worker, req.client)
    out = []
    for held, row in got:
        integ = app.integration(row["route"])
        EventLog(app.log, {"event": row["id"]}).info(
            "leased (%s, attempt %d) to worker %s for %gs", row["route"], row["attempts"], worker, seconds)
        progress = row.get("progress")
        out.append({"id": row["id"], "route": row["route"], "attempt": row["attempts"],
                    "lease_id": held["lease_id"], "lease_until": iso(held["lease_until"]),
                    "event": event_document(make_context(app, integ, row, None)),
                    "progress": _json_object(progress)})
    return Response(200, out)


def _due(conn, routes, now):
    for route in routes:
        if conn.execute("SELECT 1 FROM events WHERE status <> 'done' AND status IN ('queued','retry')"
                        " AND next_at <= ? AND route=? LIMIT 1", (now, route)).fetchone():
            return True
    return False


# -- POST /work/{lease_id}/extend|done|retry|dead -------------------------------------------------------

def extend(app, lease_id, body):
    seconds = _number(body, "lease_seconds", DEFAULT_SECONDS, 1, MAX_SECONDS)
    progress = body.get("progress")
    if progress is not None and not isinstance(progress, dict):
        raise Reject("progress must be a JSON object", status=422)
    outcome, held = app.store.extend_lease(lease_id, seconds, progress)
    if outcome != "ok":
        raise Reject(CONFLICT[outcome], status=409)
    return Response(200, {"lease_id": lease_id, "id": held["event_id"], "lease_until": iso(held["lease_until"])})


def end(app, lease_id, verb, body):
    text = _text(body, "note" if verb == "done" else "error")
    progress = body.get("progress")
    if progress is not None and not isinstance(progress, dict):
        raise Reject("progress must be a JSON object", status=422)
    after = None
    if verb == "retry" and body.get("retry_after") is not None:
        after = _number(body, "retry_after", None, 0, 86400)

    def decide(held):
        if verb == "done":
            return "done", None, text, 0.0
        if verb == "dead":
            return "dead", text or "given up by worker %s" % held["worker"], None, 0.0
        status, error, next_at = after_failure(app.settings, held["attempt"], text or "retry asked by worker",
                                               after)
        return status, error, None, next_at
    outcome, held = app.store.end_lease(lease_id, verb, decide, progress)
    if outcome not in ("ok", "again"):
        raise Reject(CONFLICT[outcome], status=409)
    if outcome == "ok":
        log = EventLog(app.log, {"event": held["event_id"]})
        line = "%s (%s, attempt %d) by worker %s%s" % (held["status"], held["route"], held["attempt"],
                                                       held["worker"], ": %s" % text if text else "")
        (log.info if held["status"] == "done" else log.warning)("%s", line)
        app.pool.work_changed()
        app.pool.wake_at(time.time())  # its serial key is free: local workers may take the next one
    return Response(200, {"lease_id": lease_id, "id": held["event_id"], "ended": verb})


# -- expiry ---------------------------------------------------------------------------------------------

def sweep(app, now=None):
    """End every overdue lease (scheduler thread, about once a second); returns how many ended."""
    expired = app.store.expire_leases(app.settings.int("retry.max_attempts"), now)
    for held in expired:
        app.metrics.lease_expired(held["route"])
        EventLog(app.log, {"event": held["event_id"]}).warning(
            "lease of worker %s expired (%s, attempt %d): %s", held["worker"], held["route"], held["attempt"],
            "dead, no attempts left" if held["status"] == "dead" else "back in the queue")
    if expired:
        app.pool.work_changed()
        app.pool.wake_at(time.time())
    return len(expired)


# -- small parsers --------------------------------------------------------------------------------------

def _number(body, key, default, low, high, whole=False):
    value = body.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and value != int(value)) \
            or not low <= value <= high:
        raise Reject("%s must be a number from %g to %g" % (key, low, high), status=422)
    return int(value) if whole else float(value)


def _text(body, key):
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise Reject("%s must be a string" % key, status=422)
    return value[:MAX_TEXT] if value else None


def _json_object(text):
    value = json.loads(text) if text else {}
    return value if isinstance(value, dict) else {}
