"""iconik (Backlight) webhooks: send each new asset to iconik's analysis once, as soon as its proxy is ready.

Wire contract. An iconik webhook definition (``POST /API/notifications/v1/webhooks/``: ``event_type``,
``realm``, ``operation``, ``url`` and a ``headers`` map iconik adds to every call; OpenAPI spec in
bootsie123/iconik-typescript ``openapi.json``, https://app.iconik.io/help/pages/entities/webhooks) makes
iconik POST a JSON envelope ``{system_domain_id, event_type, object_id, user_id, realm, operation, data,
request_id}`` (captured in backblaze-b2-samples/b2-iconik-plugin ``main_test.py``). iconik signs nothing,
so the definition carries a shared-secret header (``secret.header``: ``secret.key``), checked in constant
time before the body is parsed (401). The API calls back are ``POST {url}/API/transcode/v1/analyze/assets/
{id}/`` (201 on success, 404 for an unknown asset) and ``GET {url}/API/assets/v1/assets/{id}/`` (its
``analyze_status``), with ``App-ID`` and ``Auth-Token`` headers (NorthShoreAutomation/pythonik
``pythonik/client.py``).

Strategy: ``accept`` stores each event with ``serial_key = "iconik:" + asset id``, so two jobs for one
asset never run at once. ``run`` keeps one row per asset in ``iconik_asset`` and moves it through
``proxy_first`` (a CLOSED proxy seen before the create) / ``waiting`` (created) → ``submitting`` (claimed in
the same transaction that saw both facts) → ``submitted`` (only after iconik's 201/200) or ``gone`` (404).
A job that finds ``submitting`` left behind by an attempt that may have reached iconik (network error, crash)
first reads the asset's ``analyze_status`` and submits again only if iconik has not got the request, so an
asset is analysed once whatever the number and order of events. ``IconikApi`` makes the calls; answers
are mapped by ``client.check`` (401/403 dead with what to check, 429/5xx retried). Every other event runs
only the generic actions.
"""

import hashlib
import json
import re
import time
import urllib.parse

from hookd_core import client, verify
from hookd_core.api import REQUIRED, BadPayload, Integration, NewEvent, iso

SCHEMA = """
CREATE TABLE IF NOT EXISTS iconik_asset (
    asset_id     TEXT PRIMARY KEY,
    state        TEXT NOT NULL,              -- proxy_first | waiting | submitting | submitted | gone
    proxy_ready  INTEGER NOT NULL DEFAULT 0, -- 1 once a proxy with status CLOSED was seen
    updated_at   TEXT NOT NULL,
    submitted_at TEXT,
    note         TEXT
);
"""

# iconik ids are UUIDs; anything else must never reach a URL path ("../", "?", "/").
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token
REQUESTED = ("REQUESTED", "IN_PROGRESS", "DONE")  # analyze_status values meaning "iconik already has it"
API_TIMEOUT = 30  # seconds for one call to the iconik API
REFUSED = "[iconik] app_id and auth_token, and that the token's user has can_analyze_content"


# -- what an event is about (pure functions: tested directly) ------------------------------------------

class Kind:
    """What one iconik event asks of hookd: ``action`` is "create", "proxy" or "other"."""

    def __init__(self, action, asset_id=None, proxy_status=None):
        self.action, self.asset_id, self.proxy_status = action, asset_id, proxy_status


def classify(event):
    """The Kind of a parsed iconik envelope; BadPayload when an asset event lacks a usable asset id."""
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    if event.get("event_type") != "assets":
        return Kind("other")
    realm, operation = event.get("realm"), event.get("operation")
    if realm == "entity" and operation == "create":
        return Kind("create", asset_id_of(event.get("object_id"), data.get("id")))
    if realm == "proxies" and operation in ("create", "update"):
        return Kind("proxy", asset_id_of(data.get("asset_id"), event.get("object_id")),
                    data.get("status"))
    return Kind("other")


def asset_id_of(first, fallback):
    """The first non-empty id of the two, checked to be safe in a URL path."""
    value = first or fallback
    if not isinstance(value, str) or not ID_RE.match(value):
        raise BadPayload("asset event without a valid asset id")
    return value


def canonical_key(event):
    """Dedupe key: iconik sends no delivery id or timestamp (request_id names the API call that caused the
    event, which can cause several events), so a repeated delivery is the same JSON: hash it with sorted
    keys, so re-serialisation by the sender does not hide a duplicate."""
    text = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "iconik:" + hashlib.sha256(text.encode("ascii")).hexdigest()


def analyze_path(asset_id, profile):
    """The analyze endpoint's path under the base URL for ``analyze.profile`` (empty, default or an id)."""
    path = "/API/transcode/v1/analyze/assets/%s/" % asset_id
    if profile:
        path += "profiles/%s/" % profile
    return path


# -- the per-asset state machine (each function runs inside one store.write transaction) --------------

def load(conn, asset_id):
    return conn.execute("SELECT state, proxy_ready FROM iconik_asset WHERE asset_id = ?",
                        (asset_id,)).fetchone()


def save(conn, asset_id, state, proxy_ready, note):
    """Insert or update the asset's row (no UPSERT: it needs SQLite 3.24, older than some Python 3.9s)."""
    values = (state, int(proxy_ready), iso(time.time()), note, asset_id)
    cur = conn.execute("UPDATE iconik_asset SET state = ?, proxy_ready = ?, updated_at = ?, note = ?"
                       " WHERE asset_id = ?", values)
    if cur.rowcount == 0:
        conn.execute("INSERT INTO iconik_asset (state, proxy_ready, updated_at, note, asset_id)"
                     " VALUES (?, ?, ?, ?, ?)", values)


def on_create(conn, asset_id):
    """The asset exists: it waits for its proxy, or is claimed for submission if the proxy came first.
    Returns (decision, note), decision one of None, "submit", "verify"."""
    row = load(conn, asset_id)
    if row is None:
        save(conn, asset_id, "waiting", 0, "created; waiting for a CLOSED proxy")
        return None, "asset waiting for its proxy"
    state, proxy_ready = row
    if state in ("submitted", "gone"):
        return None, "asset already %s" % state
    if not proxy_ready:
        save(conn, asset_id, "waiting", 0, "created; waiting for a CLOSED proxy")
        return None, "asset waiting for its proxy"
    return claim(conn, asset_id, state)


def on_proxy_closed(conn, asset_id):
    """A proxy of the asset is CLOSED: claim a waiting asset, or remember it for the create to come."""
    row = load(conn, asset_id)
    if row is None or row[0] == "proxy_first":
        save(conn, asset_id, "proxy_first", 1, "proxy ready before the asset's create event")
        return None, "proxy ready; waiting for the asset's create event"
    state = row[0]
    if state in ("submitted", "gone"):
        return None, "asset already %s" % state
    return claim(conn, asset_id, state)


def claim(conn, asset_id, state):
    """Created and proxy ready: mark it submitting. If it already was, an earlier attempt may have reached
    iconik, so the caller must verify before posting again."""
    decision = "verify" if state == "submitting" else "submit"
    save(conn, asset_id, "submitting", 1, "submitting")
    return decision, None


def finish(conn, asset_id, state, note):
    """End a submission: submitted, gone, or back to waiting (the request surely did not take)."""
    conn.execute("UPDATE iconik_asset SET state = ?, updated_at = ?, note = ?,"
                 " submitted_at = CASE WHEN ? = 'submitted' THEN ? ELSE submitted_at END"
                 " WHERE asset_id = ? AND state = 'submitting'",
                 (state, iso(time.time()), note, state, iso(time.time()), asset_id))


# -- the iconik API ----------------------------------------------------------------------------------------

class IconikApi(client.Api):
    """The two calls hookd makes, with the application token; only to the configured host."""

    def __init__(self, conf):
        super().__init__(conf.get("url"), API_TIMEOUT)
        self.app_id, self.auth_token = conf.get("app_id"), conf.get("auth_token")

    def headers(self):
        return {"App-ID": self.app_id, "Auth-Token": self.auth_token, "Accept": "application/json"}

    def asset(self, asset_id):
        return self.call("GET", "/API/assets/v1/assets/%s/" % asset_id)

    def analyze(self, asset_id, profile):
        return self.call("POST", analyze_path(asset_id, profile), body={})


# -- the integration -------------------------------------------------------------------------------------

class Handler(Integration):
    """``[iconik]``: POST /iconik for every iconik webhook; analysis submitted once per asset."""

    SECTION = "iconik"
    route = "/iconik"
    KEYS = {
        "url": "https://app.iconik.io",
        "app_id": REQUIRED,
        "auth_token": REQUIRED,
        "secret.header": "X-Hookd-Secret",
        "secret.key": REQUIRED,
        "analyze.profile": "",
    }
    SECRET_KEYS = ("auth_token", "secret.key")
    SCHEMA = SCHEMA
    RUNS_REMOTELY = False  # run() moves the per-asset analysis state kept in this hookd's store
    max_parallel = 2  # a burst of ingests must not turn into a burst of API calls, nor take every worker
    job_timeout = 4 * API_TIMEOUT  # at most two calls (check + submit) per job

    def __init__(self, name, conf, core):
        super().__init__(name, conf, core)
        self.api = IconikApi(conf)

    def check(self):
        problems = []
        parts = urllib.parse.urlsplit(self.conf.get("url") or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append("[%s] url must be an http(s) URL" % self.name)
        if not HEADER_RE.match(self.conf.get("secret.header") or ""):
            problems.append("[%s] secret.header must be a header name" % self.name)
        profile = self.conf.get("analyze.profile") or ""
        if profile and not ID_RE.match(profile):
            problems.append("[%s] analyze.profile must be empty, default or a profile id" % self.name)
        return problems

    # request thread ----------------------------------------------------------------------------------

    def accept(self, req):
        verify.secret_header(req.headers, [self.conf.get("secret.key")], [self.conf.get("secret.header")])
        event = req.json()
        if not isinstance(event, dict):
            raise BadPayload("iconik event is not a JSON object")
        kind = classify(event)
        key = None if self.conf.get("dedupe") else canonical_key(event)
        serial = "iconik:" + kind.asset_id if kind.asset_id else None
        return [NewEvent(payload=event, dedupe_key=key, serial_key=serial)]

    # worker thread -----------------------------------------------------------------------------------

    def run(self, ctx):
        kind = classify(ctx.payload)
        if kind.action == "create":
            decision, note = self.core.write(lambda conn: on_create(conn, kind.asset_id))
        elif kind.action == "proxy" and kind.proxy_status == "CLOSED":
            decision, note = self.core.write(lambda conn: on_proxy_closed(conn, kind.asset_id))
        elif kind.action == "proxy":
            return "proxy status %.40s; nothing to do until it is CLOSED" % kind.proxy_status
        else:
            return None
        if decision is None:
            return note
        if decision == "verify":
            note = self.verify_earlier(ctx, kind.asset_id)
            if note:
                return note
        return self.submit(ctx, kind.asset_id)

    def verify_earlier(self, ctx, asset_id):
        """An earlier attempt may have reached iconik: if the asset's analyze_status says iconik has the
        request, record it as submitted (note returned); None means "post it"."""
        reply = self.api.asset(asset_id)
        if reply.status == 404:
            return self.end(asset_id, "gone", "asset not found in iconik (deleted?); nothing submitted")
        if reply.status in (401, 403):
            ctx.log.warning("iconik: cannot read asset %s to check an earlier attempt (HTTP %d; the token "
                            "lacks can_read_assets); submitting", asset_id, reply.status)
            return None
        asset = client.check(reply, "iconik asset %s" % asset_id, REFUSED).json()
        status = asset.get("analyze_status") if isinstance(asset, dict) else None
        if status in REQUESTED:
            return self.end(asset_id, "submitted", "analysis already requested (analyze_status %s)" % status)
        return None

    def submit(self, ctx, asset_id):
        """POST the analysis request; 201/200 submitted, 404 gone, else as ``client.check`` says."""
        try:
            reply = self.api.analyze(asset_id, self.conf.get("analyze.profile"))
        except client.NetworkError:
            ctx.log.warning("iconik: analyze request for asset %s may not have arrived; will check", asset_id)
            raise
        if reply.ok:
            ctx.log.info("iconik: analysis of asset %s submitted (HTTP %d)", asset_id, reply.status)
            return self.end(asset_id, "submitted", "analysis submitted (HTTP %d)" % reply.status)
        if reply.status == 404:
            return self.end(asset_id, "gone", "asset not found in iconik (deleted?); nothing submitted")
        self.end(asset_id, "waiting", "analyze answered HTTP %d" % reply.status)
        client.check(reply, "iconik analyze of asset %s" % asset_id, REFUSED)

    def end(self, asset_id, state, note):
        self.core.write(lambda conn: finish(conn, asset_id, state, note))
        return note

    def card(self, ctx):
        event = ctx.payload if isinstance(ctx.payload, dict) else {}
        what = "/".join(str(event.get(k) or "?") for k in ("event_type", "realm", "operation"))
        facts = [("event", what), ("object", str(event.get("object_id") or ""))]
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        if data.get("status"):
            facts.append(("status", str(data["status"])))
        return {"title": "iconik: %s (event %s)" % (what, ctx.id), "facts": facts, "text": ""}

