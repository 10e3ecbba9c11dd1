"""The operator console: ``GET /`` on the admin listener, plain HTML for the person on call.

Strategy: ``handle(app, req)`` owns ``/`` and ``/ui/...`` and returns an ``api.Response`` (None for any
other path). Pages are rendered on the server from the string templates below, every value passing
through ``html.escape``; one stylesheet and one small script (auto-refresh of the overview) are files in
``hookd_core/static/``, served from a fixed table of names. GET changes nothing; Retry, Replay, login and
logout are POST forms to ``/ui/...`` carrying a CSRF token, refused with 403 without it. Sessions are
stateless: the cookie is ``expiry.auth.nonce.mac``, signed with a key drawn when hookd starts and bound to
``admin.token``, so a restart or a new token ends every session; the CSRF token is a MAC of the nonce.
With ``admin.token`` set a request needs the bearer header or a session that logged in with the token
(the login form, shown with a 401); without it the admin listener's own rule is the gate. Files are
served only through the ``products`` records jobs wrote, and only from under a directory the
configuration names (``state_dir``, ``*.dir`` keys). The event list is a LIKE over payloads and bodies
that no index helps, so what one listing may cost is bounded (``_bounded``): at most ``MAX_SEARCH``
characters of text, and sqlite stops the query after ``SEARCH_STEPS`` virtual-machine steps or
``SEARCH_SECONDS`` and the event it is on, whichever comes first; the page then says so instead of listing.
"""

import hashlib
import hmac
import html
import json
import os
import re
import secrets
import sqlite3
import string
import threading
import time
import urllib.parse

from . import admin, subscriptions
from .api import Response
from .store import (STATUSES, counts, list_events, list_workers, oldest_queued, product_path, products,
                    row_dict)
from .workers import iso

PREFIX = "/ui/"
COOKIE = "hookd_session"
SESSION_SECONDS = 12 * 3600
PAGE_SIZE = 50
MAX_SEARCH = 200          # characters of free text searched for; a longer text is refused
SEARCH_STEPS = 20_000_000  # sqlite VM steps one event listing may take ...
SEARCH_SECONDS = 2.0      # ... and seconds, and the event it is on (a LIKE over one body is one step)
STEPS_PER_EVENT = 16      # sqlite VM steps a text search takes per event it looks at (measured, no match)
CHECK_EVERY = 1000        # steps between two looks at those bounds (a timer interrupts a slow step's query)
MAX_SHOWN = 256 << 10     # characters of a payload shown on an event's page
MAX_CHUNK = 4 << 20       # bytes in one answer to a Range request (a <video> asks for ranges)
MAX_WHOLE = 256 << 20     # bytes of a file served whole; bigger files only in ranges
CSP = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
SECURITY_HEADERS = (("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
                    ("Referrer-Policy", "no-referrer"), ("X-Frame-Options", "DENY"),
                    ("Cache-Control", "no-store"))
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
FILE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".mp4": "video/mp4"}
NOTICES = {"retried": "Queued again; a worker takes it within a second or two.",
           "replayed": "Stored as a new event with the same payload."}
_KEY = secrets.token_bytes(32)  # signs sessions; drawn anew at every start

LAYOUT = string.Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title · hookd</title>
<link rel="stylesheet" href="/ui/static/console.css">
<script src="/ui/static/console.js" defer></script>
</head>
<body$attrs>
<header><a class="brand" href="/">hookd</a>$nav</header>
<main>
$body
</main>
</body>
</html>
""")
NAV = ('<nav><a href="/">Overview</a><a href="/ui/events">Events</a><a href="/ui/events?status=dead">Dead</a>'
       '</nav>$logout')
LOGOUT = string.Template('<form class="logout" method="post" action="/ui/logout">'
                         '<input type="hidden" name="csrf" value="$csrf"><button>Log out</button></form>')
LOGIN = string.Template("""<h1>Log in</h1>
<p>This console needs the admin token (<code>admin.token</code> in the configuration).</p>
$error<form class="login" method="post" action="/ui/login">
<input type="hidden" name="csrf" value="$csrf">
<input type="hidden" name="next" value="$next">
<label>Admin token <input type="password" name="token" autocomplete="current-password" required autofocus></label>
<button>Log in</button>
</form>""")
ACTION = string.Template('<form method="post" action="/ui/events/$id/$verb">'
                         '<input type="hidden" name="csrf" value="$csrf"><button class="$verb">$label</button></form>')


class Session:
    """A signed session cookie's content: ``auth`` is True after a login with the admin token."""

    def __init__(self, expires, auth, nonce):
        self.expires, self.auth, self.nonce = expires, auth, nonce

    def value(self, app):
        text = "%d.%d.%s" % (self.expires, self.auth, self.nonce)
        return text + "." + _mac(app, text)

    def csrf(self, app):
        return _mac(app, "csrf." + self.nonce)


def _mac(app, text):
    token = app.settings.get("admin.token") or ""
    return hmac.new(_KEY, (token + "\0" + text).encode("utf-8"), hashlib.sha256).hexdigest()


def new_session(auth=False):
    return Session(int(time.time()) + SESSION_SECONDS, auth, secrets.token_urlsafe(18))


def read_session(app, req):
    """The request's valid, unexpired session, or None."""
    for header in req.headers.get_all("Cookie") or []:
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            if name != COOKIE:
                continue
            fields = value.split(".")
            if len(fields) != 4 or not re.fullmatch(r"[0-9]{1,12}", fields[0]) or fields[1] not in ("0", "1"):
                continue
            if not hmac.compare_digest(_mac(app, ".".join(fields[:3])).encode(), fields[3].encode()):
                continue
            if int(fields[0]) > time.time():
                return Session(int(fields[0]), fields[1] == "1", fields[2])
    return None


def set_cookie(app, value, max_age=None):
    attrs = "%s=%s; Path=/; HttpOnly; SameSite=Strict" % (COOKIE, value)
    if max_age is not None:
        attrs += "; Max-Age=%d" % max_age
    if app.settings.get("tls.cert") and not app.settings.get("admin.listen").strip().startswith("unix:"):
        attrs += "; Secure"  # the admin listener serves HTTPS (a unix socket stays plain)
    return ("Set-Cookie", attrs)


def allowed(app, req, session):
    """The admin API's rule (README, "Admin API"), with the login form's session as a second way to show the token: with
    ``admin.token`` set, a session that logged in with it or the bearer header; without it, anyone who
    reaches the admin listener (loopback or a unix socket, as check-config insists)."""
    return (session is not None and session.auth) or admin.authorised(app.settings.get("admin.token"), req)


# -- dispatch ---------------------------------------------------------------------------------------------

class Ctx:
    """One console request: the app, the request, its session (a fresh one when it had none), the form."""

    def __init__(self, app, req, session, fresh, form):
        self.app, self.req, self.session, self.fresh, self.form = app, req, session, fresh, form

    def csrf(self):
        return self.session.csrf(self.app)


def handle(app, req):
    """The console's answer to ``req``, or None when the path is not the console's."""
    if req.path != "/" and not req.path.startswith(PREFIX):
        return None
    if req.path.startswith(PREFIX + "static/"):
        return _static(req)
    session = read_session(app, req)
    ctx = Ctx(app, req, session or new_session(), session is None, {})
    resp = _dispatch(ctx)
    if ctx.fresh and not any(k == "Set-Cookie" for k, _ in resp.headers):
        resp.headers += (set_cookie(app, ctx.session.value(app)),)
    return resp


def _dispatch(ctx):
    req = ctx.req
    for pattern, methods, view, public in ROUTES:
        m = pattern.fullmatch(req.path)
        if m is None:
            continue
        if req.method not in methods:
            return page(ctx, 405, "Method not allowed", "<p>%s only.</p>" % ", ".join(methods),
                        [("Allow", ", ".join(methods))])
        if req.method == "POST":
            ctx.form = _form(req.body)
            given = ctx.form.get("csrf", "")
            if ctx.fresh or not hmac.compare_digest(given.encode(), ctx.csrf().encode()):
                return page(ctx, 403, "Forbidden", "<p>The form's CSRF token is missing or stale. "
                            '<a href="/">Reload the console</a> and try again.</p>')
        if not public and not allowed(ctx.app, req, None if ctx.fresh else ctx.session):
            return login_page(ctx, 401)
        return view(ctx, *m.groups())
    if not allowed(ctx.app, req, None if ctx.fresh else ctx.session):
        return login_page(ctx, 401)
    return page(ctx, 404, "Not found", "<p>No such page.</p>")


def _form(body):
    try:
        fields = urllib.parse.parse_qs(body.decode("utf-8", "replace"), max_num_fields=20)
    except ValueError:  # more fields than any console form has: no form (and so no CSRF token)
        return {}
    return {k: v[0] for k, v in fields.items()}


def _static(req):
    name = req.path[len(PREFIX + "static/"):]
    if req.method != "GET":
        return Response(405, b"GET only\n", "text/plain", (("Allow", "GET"),) + SECURITY_HEADERS)
    if name not in STATIC:
        return Response(404, b"not found\n", "text/plain", SECURITY_HEADERS)
    with open(os.path.join(STATIC_DIR, name), "rb") as f:
        return Response(200, f.read(), STATIC[name], SECURITY_HEADERS[:4] + (("Cache-Control", "max-age=300"),))


# -- pages ------------------------------------------------------------------------------------------------

def e(value):
    """A value as HTML text (None as empty)."""
    return "" if value is None else html.escape(str(value), quote=True)


def page(ctx, status, title, body, headers=(), refresh=None, nav=True):
    logout = ""
    if ctx.app.settings.get("admin.token") and not ctx.fresh and ctx.session.auth:
        logout = LOGOUT.substitute(csrf=e(ctx.csrf()))
    text = LAYOUT.substitute(title=e(title), body=body,
                             nav=string.Template(NAV).substitute(logout=logout) if nav else "",
                             attrs=' data-refresh="%d"' % refresh if refresh else "")
    return Response(status, text.encode("utf-8"), "text/html; charset=utf-8", tuple(headers) + SECURITY_HEADERS)


def login_page(ctx, status, error=""):
    nxt = ctx.req.path if ctx.req.method == "GET" else ctx.form.get("next", "/")
    body = LOGIN.substitute(csrf=e(ctx.csrf()), next=e(_local(nxt)),
                            error='<p class="error">%s</p>\n' % e(error) if error else "")
    return page(ctx, status, "Log in", body, nav=False)


LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9/_.,;:=&%?+~-]*")


def _local(path):
    """``path`` if it is a plain path on this console, else ``/``: no open redirect after a login (``//``,
    a backslash, or a tab a browser would drop to make one) and nothing that could break the header."""
    return path if LOCAL_PATH.fullmatch(path) else "/"


def redirect(ctx, location, headers=()):
    return page(ctx, 303, "See other", '<p><a href="%s">Continue</a></p>' % e(location),
                (("Location", location),) + tuple(headers))


def login(ctx):
    token = ctx.app.settings.get("admin.token")
    given = ctx.form.get("token", "")
    if token and not hmac.compare_digest(given.encode(), token.encode()):
        ctx.app.log.warning("console: login with a wrong admin token from %s", ctx.req.client)
        return login_page(ctx, 401, "That is not the admin token.")
    session = new_session(auth=bool(token))  # a new nonce: a session id seen before login is worthless after
    return redirect(ctx, _local(ctx.form.get("next", "/")), [set_cookie(ctx.app, session.value(ctx.app))])


def logout(ctx):
    return redirect(ctx, "/", [set_cookie(ctx.app, "", max_age=0)])


def overview(ctx):
    app = ctx.app
    now = time.time()
    rows = app.store.read(counts)
    oldest = app.store.read(oldest_queued)
    dead = app.store.read(lambda c: list_events(c, "dead", None, 20))
    table = {}
    for route, status, n in rows:
        table.setdefault(route, {})[status] = n
    routes = sorted(set(table) | {i.name for i in app.integrations})
    total = {s: sum(table.get(r, {}).get(s, 0) for r in routes) for s in STATUSES}
    waiting = total["queued"] + total["retry"] + total["running"]
    subs = sorted(app.store.read(subscriptions.known).values(), key=lambda sub: (sub.up, sub.route, sub.id))
    facts = [("waiting", waiting), ("dead", total["dead"]),
             ("oldest queued", age(now - oldest) if oldest else "none")]
    if subs:
        facts.append(("subscriptions up", "%d of %d" % (sum(1 for sub in subs if sub.up), len(subs))))
    if app.pool is not None:
        busy = sum(1 for w in app.pool.workers if w.busy_since is not None)
        facts.append(("workers", "%d of %d busy%s" % (busy, app.pool.size,
                                                      "" if app.pool.healthy() else ", STUCK")))
    out = ['<h1>Overview</h1>', '<dl class="facts">']
    out += ['<div><dt>%s</dt><dd>%s</dd></div>' % (e(k), e(v)) for k, v in facts]
    out.append("</dl>")
    out.append('<h2>Dead events</h2>')
    if dead:
        out.append(event_table(dead, now))
        if total["dead"] > len(dead):
            out.append('<p><a href="/ui/events?status=dead">All %d dead events</a></p>' % total["dead"])
    else:
        out.append('<p class="quiet">None.</p>')
    out.append('<h2>Events by route and status</h2>')
    out.append(counts_table(table, routes, total))
    out.append('<h2>Upstream subscriptions</h2>')
    out.append(subscriptions_table(subs) if subs else '<p class="quiet">None known: <code>hookd.py subscribe'
               '</code> creates them, <code>hookd.py subscriptions</code> lists what the upstreams have.</p>')
    remote = app.store.read(list_workers)
    if remote:
        out.append('<h2>Remote workers</h2><table class="workers"><thead><tr><th>worker</th><th>address</th>'
                   '<th>routes</th><th>leases held</th><th>last heard</th></tr></thead><tbody>%s</tbody></table>' % (
                       "".join('<tr><td>%s</td><td>%s</td><td>%s</td><td>%d</td><td title="%s">%s ago</td></tr>' % (
                           e(w["worker"]), e(w["address"]), e(w["routes"] or "any"), w["leases"],
                           e(iso(w["last_seen"])), e(age(now - w["last_seen"]))) for w in remote)))
    return page(ctx, 200, "Overview", "\n".join(out), refresh=10)


def counts_table(table, routes, total):
    """Routes down, statuses across, each number a link to those events; a last row and column of totals."""
    def cell(route, status, n):
        if not n:
            return '<td class="zero">0</td>'
        query = urllib.parse.urlencode([(k, v) for k, v in (("route", route), ("status", status)) if v])
        return '<td%s><a href="/ui/events%s">%d</a></td>' % (
            ' class="st-%s"' % status if status else "", e("?" + query if query else ""), n)
    out = ['<table class="counts"><thead><tr><th>route</th>%s<th>all</th></tr></thead><tbody>' % "".join(
        '<th>%s</th>' % e(s) for s in STATUSES)]
    for route in routes:
        cells = table.get(route, {})
        out.append('<tr><th><a href="/ui/events?%s">%s</a></th>%s%s</tr>' % (
            e(urllib.parse.urlencode({"route": route})), e(route),
            "".join(cell(route, s, cells.get(s, 0)) for s in STATUSES), cell(route, None, sum(cells.values()))))
    out.append('<tr class="total"><th>all</th>%s%s</tr></tbody></table>' % (
        "".join(cell(None, s, total[s]) for s in STATUSES), cell(None, None, sum(total.values()))))
    return "".join(out)


def subscriptions_table(subs):
    """The upstream subscriptions hookd watches, unhealthy ones first."""
    rows = "".join('<tr><td>%s</td><td>%s</td><td>%s</td><td class="msg">%s</td><td>%s</td><td>%s</td></tr>' % (
        e(sub.route), e(sub.id), e(sub.filter), e(sub.url), e(sub.status),
        '<span class="badge st-done">up</span>' if sub.up else '<span class="badge st-dead">down</span>')
        for sub in subs)
    return ('<table class="subscriptions"><thead><tr><th>route</th><th>id</th><th>trigger / filter</th><th>url'
            '</th><th>upstream says</th><th>health</th></tr></thead><tbody>%s</tbody></table>' % rows)


def event_table(rows, now):
    out = ['<table class="events"><thead><tr><th>id</th><th>route</th><th>status</th><th>tries</th>'
           '<th>received</th><th>last error / note</th></tr></thead><tbody>']
    for r in rows:
        said = r["last_error"] or r["note"] or ""
        out.append('<tr><td><a href="/ui/events/%d">%d</a></td><td>%s</td><td>%s</td><td>%d</td>'
                   '<td title="%s">%s ago</td><td class="msg">%s</td></tr>' % (
                       r["id"], r["id"], e(r["route"]), badge(r["status"]), r["attempts"],
                       e(iso(r["received_at"])), e(age(now - r["received_at"])),
                       e(said[:300] + ("…" if len(said) > 300 else ""))))
    out.append("</tbody></table>")
    return "".join(out)


def badge(status):
    return '<span class="badge st-%s">%s</span>' % (e(status), e(status))


def events(ctx):
    app, q = ctx.app, ctx.req.query1
    route = (q("route") or "").strip()[:200] or None
    status = q("status") if q("status") in STATUSES else None
    text = q("q") or None
    page_no = min(max(_int(q("page"), 1), 1), 100000)
    answer, rows, refusal = 200, [], None
    if text and len(text) > MAX_SEARCH:
        answer, refusal = 400, "The search text is longer than %d characters; search for a shorter part." % (
            MAX_SEARCH)
    else:
        rows = app.store.read(_bounded(lambda c: list_events(c, status, route, PAGE_SIZE + 1, text,
                                                            (page_no - 1) * PAGE_SIZE)))
        if rows is None:
            rows, refusal = [], (
                "The listing stopped before its end: one listing may look through about {:,} events or take"
                " {:g} seconds. Narrow it by route or status.".format(SEARCH_STEPS // STEPS_PER_EVENT,
                                                                      SEARCH_SECONDS))
    more, rows = len(rows) > PAGE_SIZE, rows[:PAGE_SIZE]
    routes = sorted({r for r, _, _ in app.store.read(counts)} | {i.name for i in app.integrations})
    option = lambda value, chosen: '<option%s>%s</option>' % (  # noqa: E731
        " selected" if value == chosen else "", e(value))
    out = ['<h1>Events</h1>', '<form class="filters" method="get" action="/ui/events">',
           '<label>route <select name="route"><option value="">any</option>%s</select></label>' % "".join(
               option(r, route) for r in routes),
           '<label>status <select name="status"><option value="">any</option>%s</select></label>' % "".join(
               option(s, status) for s in STATUSES),
           '<label>text in payload <input type="search" name="q" value="%s" maxlength="%d"></label>' % (
               e(text), MAX_SEARCH),
           '<button>Filter</button></form>']
    if refusal:
        out.append('<p class="error">%s</p>' % e(refusal))
    else:
        out.append(event_table(rows, time.time()) if rows else '<p class="quiet">No events match.</p>')
    keep = [(k, v) for k, v in (("route", route), ("status", status), ("q", text)) if v]
    links = []
    if page_no > 1:
        links.append('<a href="/ui/events?%s">← newer</a>' % e(urllib.parse.urlencode(
            keep + ([("page", page_no - 1)] if page_no > 2 else []))))
    if more:
        links.append('<a href="/ui/events?%s">older →</a>' % e(urllib.parse.urlencode(
            keep + [("page", page_no + 1)])))
    if links:
        out.append('<p class="paging">page %d · %s</p>' % (page_no, " · ".join(links)))
    return page(ctx, answer, "Events", "\n".join(out))


def _bounded(query):
    """``query(conn)`` as a read function that sqlite stops after SEARCH_STEPS steps or SEARCH_SECONDS:
    its result, or None when it was stopped. The progress handler counts steps (and looks at the clock)
    every CHECK_EVERY steps, but one step can be long: a LIKE over one large body (O(body x text), ~0.26 s
    for 1 MB of 'a' and a 200-character text) is one step, so ~60 events go by between two looks. A timer
    thread interrupts the query at SEARCH_SECONDS instead, which sqlite acts on after the event it is on
    (at the bottom of its loop). Looking every few steps would do the same, but takes the GIL back from
    the request threads every event: with one busy thread, a listing of 400k events took 2.0 s (stopped)
    instead of 0.6-1.6 s."""
    def read(conn):
        deadline, checks, stopped, lock = time.monotonic() + SEARCH_SECONDS, [0], [], threading.Lock()
        running = [True]

        def check():
            checks[0] += 1
            if checks[0] * CHECK_EVERY > SEARCH_STEPS or time.monotonic() >= deadline:
                stopped.append(True)
                return 1  # sqlite interrupts the statement
            return 0

        def interrupt():  # on the timer's thread; only while the query runs, never a later statement
            with lock:
                if running:
                    stopped.append(True)
                    conn.interrupt()
        timer = threading.Timer(SEARCH_SECONDS, interrupt)
        conn.set_progress_handler(check, CHECK_EVERY)
        timer.start()
        try:
            return query(conn)
        except sqlite3.OperationalError:
            if stopped:
                return None
            raise
        finally:
            with lock:
                running.clear()
            timer.cancel()
            conn.set_progress_handler(None, 0)
    return read


def _int(text, default):
    return int(text) if text and re.fullmatch(r"[0-9]{1,9}", text) else default


def event(ctx, event_id):
    app = ctx.app
    row = app.store.read(lambda c: row_dict(c, int(event_id), with_body=True))
    if row is None:
        return page(ctx, 404, "Not found", "<p>No event %s.</p>" % e(event_id))
    ev = admin.public_event(row, full=True)
    made = app.store.read(lambda c: products(c, int(event_id)))
    now = time.time()
    out = ['<h1>Event %d <small>%s</small> %s</h1>' % (ev["id"], e(ev["route"]), badge(ev["status"]))]
    notice = NOTICES.get(ctx.req.query1("done") or "")
    if notice:
        out.append('<p class="notice">%s</p>' % e(notice))
    out.append('<div class="actions">')
    if ev["status"] in ("dead", "retry"):
        out.append(ACTION.substitute(id=ev["id"], verb="retry", csrf=e(ctx.csrf()), label="Retry"))
    if ev["status"] != "duplicate":
        out.append(ACTION.substitute(id=ev["id"], verb="replay", csrf=e(ctx.csrf()), label="Replay"))
    out.append("</div>")
    facts = [("status", ev["status"]), ("attempts", ev["attempts"]),
             ("received", "%s (%s ago)" % (ev["received_at"], age(now - row["received_at"]))),
             ("last change", "%s (%s ago)" % (ev["updated_at"], age(now - row["updated_at"])))]
    if ev["next_attempt_at"]:
        facts.append(("next attempt", ev["next_attempt_at"]))
    out.append('<dl class="event">%s' % "".join('<dt>%s</dt><dd>%s</dd>' % (e(k), e(v)) for k, v in facts))
    if ev["duplicate_of"]:
        out.append('<dt>duplicate of</dt><dd><a href="/ui/events/%d">event %d</a></dd>' % (
            ev["duplicate_of"], ev["duplicate_of"]))
    for key, cls in (("last_error", "error"), ("note", "note")):
        if ev[key]:
            out.append('<dt>%s</dt><dd><pre class="%s">%s</pre></dd>' % (key.replace("_", " "), cls, e(ev[key])))
    out.append("</dl>")
    if made:
        out.append("<h2>Products</h2>")
        out += [product_html(p) for p in made]
    out.append("<h2>Headers</h2>")
    if ev["headers"]:
        out.append('<table class="headers"><tbody>%s</tbody></table>' % "".join(
            "<tr><th>%s</th><td>%s</td></tr>" % (e(k), e(v)) for k, v in sorted(ev["headers"].items())))
    else:
        out.append('<p class="quiet">None stored.</p>')
    out.append("<h2>Payload <small>%s</small></h2>" % e(ev.get("content_type") or ""))
    if ev["payload"] is not None:
        shown = json.dumps(ev["payload"], indent=2, ensure_ascii=False)
    elif "body" in ev:
        shown = ev["body"]
    else:
        shown = "(a binary body of %d bytes; `hookd.py event %d --json` shows it base64-encoded)" % (
            len(row.get("body") or b""), ev["id"])
    cut = len(shown) > MAX_SHOWN
    out.append('<pre class="payload">%s</pre>' % e(shown[:MAX_SHOWN]))
    if cut:
        out.append('<p class="quiet">Cut at %d characters of %d; the whole payload: '
                   '<code>hookd.py event %d --json</code>.</p>' % (MAX_SHOWN, len(shown), ev["id"]))
    return page(ctx, 200, "Event %d" % ev["id"], "\n".join(out))


def product_html(p):
    """One product: a thumbnail inline, a clip as a video with a download link, labels, variations."""
    kind, data = p["kind"], p["data"]
    if p["path"] is not None:
        name = os.path.basename(p["path"])
        url = "/ui/files/%d" % p["id"]
        try:
            size = os.stat(p["path"]).st_size
        except OSError:
            return '<p class="quiet">%s %s: the file is gone (pruned or replaced).</p>' % (e(kind), e(name))
        if kind == "thumbnail":
            return ('<figure class="thumbnail"><img src="%s" alt="thumbnail %s"><figcaption>%s (%s)</figcaption>'
                    '</figure>' % (url, e(name), e(name), e(nbytes(size))))
        if kind == "clip":
            return ('<figure class="clip"><video src="%s" controls preload="metadata"></video><figcaption>'
                    '<a href="%s?download=1" download="%s">Download %s</a> (%s)</figcaption></figure>' % (
                        url, url, e(name), e(name), e(nbytes(size))))
        return '<p><a href="%s?download=1">%s %s</a> (%s)</p>' % (url, e(kind), e(name), e(nbytes(size)))
    if kind == "labels" and isinstance(data, dict):
        rows = []
        for stamp, found in data.items():
            names = ", ".join("%s %.2f" % (n, v.get("probability", 0)) if isinstance(v, dict) else str(n)
                              for n, v in found.items()) if isinstance(found, dict) else json.dumps(found)
            rows.append("<tr><th>%s</th><td>%s</td></tr>" % (e(stamp), e(names or "(none)")))
        return ('<h3>Labels sent to Camio</h3><table class="labels"><thead><tr><th>image</th><th>labels'
                '</th></tr></thead><tbody>%s</tbody></table>' % "".join(rows))
    if kind == "variations" and isinstance(data, dict):
        cols = ("format", "width", "height", "length", "duration", "state", "error")
        rows = "".join("<tr>%s</tr>" % "".join("<td>%s</td>" % e(v.get(c)) for c in cols)
                       for v in data.get("variations") or [] if isinstance(v, dict))
        return ('<h3>Zencoder job %s: %s</h3><table class="variations"><thead><tr>%s</tr></thead>'
                '<tbody>%s</tbody></table>' % (e(data.get("job_id")), e(data.get("status")),
                                               "".join("<th>%s</th>" % c for c in cols), rows))
    return '<h3>%s</h3><pre>%s</pre>' % (e(kind), e(json.dumps(data, indent=2, ensure_ascii=False)))


def retry(ctx, event_id):
    app = ctx.app
    if not app.store.retry(int(event_id)):
        return page(ctx, 409, "Not retried", '<p>Event %s is not dead or retrying. <a href="/ui/events/%s">Back'
                    '</a></p>' % (e(event_id), e(event_id)))
    app.log.info("console: event %s queued again by hand", event_id, extra={"event": int(event_id)})
    _wake(app)
    return redirect(ctx, "/ui/events/%s?done=retried" % event_id)


def replay(ctx, event_id):
    app = ctx.app
    new_id = app.store.replay(int(event_id))
    if new_id is None:
        return page(ctx, 404, "Not found", "<p>No event %s.</p>" % e(event_id))
    app.log.info("console: event %s replayed as event %d", event_id, new_id, extra={"event": new_id})
    _wake(app)
    return redirect(ctx, "/ui/events/%d?done=replayed" % new_id)


def _wake(app):
    """Correct the waiting counts and hand due events to the workers now (not at the next poll)."""
    app.store.recount()
    if app.pool is not None:
        app.pool.schedule_once()


def file(ctx, product_id):
    """A file a job recorded as its product, if it still lies under a configured directory."""
    app, req = ctx.app, ctx.req
    path = app.store.read(lambda c: product_path(c, int(product_id)))
    real = os.path.realpath(path) if path else None
    if real is None or not under_configured_dir(app, real) or not os.path.isfile(real):
        return page(ctx, 404, "Not found", "<p>No such file.</p>")
    try:
        f = open(real, "rb")
    except OSError:  # removed or made unreadable since the look above
        return page(ctx, 404, "Not found", "<p>No such file.</p>")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(real))
    ctype = FILE_TYPES.get(os.path.splitext(real)[1].lower(), "application/octet-stream")
    disposition = "attachment" if req.query1("download") or ctype.startswith("application/") else "inline"
    headers = [("Content-Disposition", '%s; filename="%s"' % (disposition, name)), ("Accept-Ranges", "bytes")]
    with f:
        size = os.fstat(f.fileno()).st_size
        span = byte_range(req.headers.get("Range"), size)
        if span == "unsatisfiable":
            return Response(416, b"", ctype, [("Content-Range", "bytes */%d" % size)] + headers
                            + list(SECURITY_HEADERS))
        if span is None:
            if size > MAX_WHOLE:
                return page(ctx, 413, "Too large", "<p>This file is only served in ranges.</p>")
            return Response(200, f.read(), ctype, headers + list(SECURITY_HEADERS))
        start, end = span[0], min(span[1], span[0] + MAX_CHUNK - 1)
        f.seek(start)
        data = f.read(end - start + 1)
    return Response(206, data, ctype, [("Content-Range", "bytes %d-%d/%d" % (start, start + len(data) - 1, size))]
                    + headers + list(SECURITY_HEADERS))


def byte_range(header, size):
    """(first, last) of a single ``bytes=`` range, None for no usable range (serve whole), or
    ``"unsatisfiable"`` (416). Several ranges are served whole, as RFC 9110 allows."""
    m = re.fullmatch(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", header or "")
    if m is None or not (m.group(1) or m.group(2)) or len(m.group(1)) > 18 or len(m.group(2)) > 18:
        return None
    if not m.group(1):  # the last N bytes
        n = int(m.group(2))
        return (max(0, size - n), size - 1) if n and size else "unsatisfiable"
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else size - 1
    if first >= size or last < first:
        return "unsatisfiable"
    return first, min(last, size - 1)


def under_configured_dir(app, real):
    """True when ``real`` lies under state_dir or a directory a ``*.dir`` key names."""
    roots = [app.state_dir]
    for integ in app.integrations:
        for key, value in integ.conf.items():
            if key.endswith(".dir") and value:
                value = os.path.expanduser(value)
                roots += [os.path.abspath(value), os.path.join(app.state_dir, value)]
    for root in roots:
        root = os.path.realpath(root)
        if os.path.commonpath([root, real]) == root:
            return True
    return False


def age(seconds):
    """A short human duration: 42 s, 7 min, 3 h 5 min, 2 d 4 h."""
    s = max(0, int(seconds))
    if s < 120:
        return "%d s" % s
    if s < 3600:
        return "%d min" % (s // 60)
    if s < 86400:
        return "%d h %d min" % (s // 3600, s % 3600 // 60)
    return "%d d %d h" % (s // 86400, s % 86400 // 3600)


def nbytes(n):
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return ("%d %s" if unit == "bytes" else "%.1f %s") % (n, unit)
        n /= 1024.0


ROUTES = (  # (path pattern, methods, view, public: no login needed)
    (re.compile(r"/"), ("GET",), overview, False),
    (re.compile(r"/ui/events"), ("GET",), events, False),
    (re.compile(r"/ui/events/([0-9]{1,18})"), ("GET",), event, False),
    (re.compile(r"/ui/events/([0-9]{1,18})/retry"), ("POST",), retry, False),
    (re.compile(r"/ui/events/([0-9]{1,18})/replay"), ("POST",), replay, False),
    (re.compile(r"/ui/files/([0-9]{1,18})"), ("GET",), file, False),
    (re.compile(r"/ui/login"), ("POST",), login, True),
    (re.compile(r"/ui/logout"), ("POST",), logout, True),
)
