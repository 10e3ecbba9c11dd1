"""A loopback Preservica for tests, both ways round, following reference/upstreams.md §2.7.

Strategy: ``FakePreservica`` is a ``support.FakeUpstream`` whose ``respond`` function plays the parts of
the Preservica API hookd calls: ``POST /api/accesstoken/login`` (form fields; 200 JSON with ``token`` and
``validFor`` in minutes, or 401 ``{"success": false, "message": ...}``), ``POST /api/accesstoken/refresh``,
``GET /api/content/thumbnail?id=sdb:IO|REF&size=S`` (real image bytes with their Content-Type, 404 for
unknown references), ``GET /api/entity/information-objects/REF`` (EntityAPI XML with the title) and
``POST/GET/DELETE /api/webhook/subscriptions[/ID]`` (POST performs the challenge handshake against the
subscriber URL, during the call, as Preservica does; 200 with the new subscription only if the echo and the
HMAC are right, else 400; GET 200 with the list; DELETE 204, unknown 404; ``drop(id)`` plays Preservica
losing a subscription). Token lifetime is a setting
(``token_seconds``), ``expire_tokens()`` invalidates every token at once, and ``fail_next(path, status)``
scripts failures such as a 503. The other direction, Preservica calling hookd, is ``deliver()``: a POST
with ``Transfer-Encoding: chunked`` (http.client ``encode_chunked``) or Content-Length, signed with
``Preservica-Signature`` over ``"preservica-webhook-auth" + body``.
"""

import hashlib
import hmac
import http.client
import json
import os
import re
import secrets
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid

from tests.support import FakeUpstream

XIP_VERSION = "7.0"
TRIGGERS = ("MOVED", "FULL_TEXT_INDEXED", "CHANGED_SECURITY_DESCRIPTOR", "INGEST_FAILED", "CHANGE_ASSET_VISIBILITY")


def sign(secret, message):
    """Lower-case hex HMAC-SHA256, as Preservica computes it."""
    if isinstance(message, str):
        message = message.encode("utf-8")
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def envelope(events, trigger="FULL_TEXT_INDEXED", subscription="4583e1e6d2c72ed96a1151bc7dfd53c2",
             timestamp=None, tenant="DEMO"):
    """A delivery body shaped like upstreams.md §2.3's suggested payload."""
    return {"subscriptionId": subscription,
            "timestamp": timestamp or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tenant": tenant, "version": 1, "trigger": trigger, "events": events}


def io_event(ref, trigger="FULL_TEXT_INDEXED", entity_type="IO", batch="b-42"):
    """One ``events[]`` element."""
    return {"event": trigger, "entityType": entity_type, "entityRef": ref,
            "identifiers": [{"BatchId": batch}]}


def make_images(size="64x48"):
    """Real (png_bytes, jpeg_bytes) of a test pattern, made by ffmpeg."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ext in ("png", "jpg"):
            path = os.path.join(tmp, "t." + ext)
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=%s:rate=1" % size,
                            "-frames:v", "1", path], check=True, timeout=60)
            with open(path, "rb") as f:
                out[ext] = f.read()
    return out["png"], out["jpg"]


class FakePreservica:
    """The fake server. Add ``users``, ``thumbnails`` {ref: (bytes, content type)} and ``titles``
    {ref: title} before use; read ``logins``, ``thumbnail_requests`` and ``upstream.seen`` after."""

    def __init__(self, username="hookd", password="pw", tenant="DEMO", token_seconds=900, valid_for=15):
        self.users = {username: (password, tenant)}
        self.token_seconds = token_seconds   # how long the server honours a token
        self.valid_for = valid_for           # minutes it claims in the login reply (real: 15)
        self.thumbnails = {}
        self.titles = {}
        self.tokens = {}
        self.issued = []                     # every token handed out, for "never logged" checks
        self.subscriptions = {}
        self.logins = 0
        self.thumbnail_requests = 0
        self.thumbnail_ids = []              # (id, size) of every authorised thumbnail request
        self.reject_all_tokens = False
        self.broken_refs = set()             # thumbnails of these answer 500, always
        self._failures = []
        self._refused = 0
        self._lock = threading.Lock()
        self.upstream = FakeUpstream(respond=self._respond)
        self.url = self.upstream.url

    # -- scripting ------------------------------------------------------------------------------------

    def expire_tokens(self):
        with self._lock:
            self.tokens.clear()

    def fail_next(self, path_prefix, status, count=1, body=b"", headers=None):
        """The next ``count`` requests whose path starts with ``path_prefix`` get ``status``."""
        with self._lock:
            for _ in range(count):
                self._failures.append((path_prefix, status, body, headers or {}))

    def count_401(self):
        """How many API requests (not logins) carried a token the fake refused."""
        return self._refused

    def close(self):
        self.upstream.close()

    # -- the API --------------------------------------------------------------------------------------

    def _respond(self, rec):
        parts = urllib.parse.urlsplit(rec.path)
        query = urllib.parse.parse_qs(parts.query)
        scripted = self._scripted(parts.path)
        if scripted:
            return scripted
        if rec.method == "POST" and parts.path == "/api/accesstoken/login":
            return self._login(rec)
        if rec.method == "POST" and parts.path == "/api/accesstoken/refresh":
            return self._refresh(rec)
        if not self._authorised(rec):
            with self._lock:
                self._refused += 1
            return 401, {"success": False, "message": "invalid.token"}, {}
        if rec.method == "GET" and parts.path == "/api/content/thumbnail":
            return self._thumbnail(query)
        m = re.match(r"^/api/entity/(information-objects|structural-objects)/([^/]+)$", parts.path)
        if rec.method == "GET" and m:
            return self._entity(m.group(1), urllib.parse.unquote(m.group(2)))
        if parts.path.startswith("/api/webhook/subscriptions"):
            return self._subscriptions(rec, parts.path)
        return 404, {"success": False, "message": "not found"}, {}

    def _scripted(self, path):
        with self._lock:
            for i, (prefix, status, body, headers) in enumerate(self._failures):
                if path.startswith(prefix):
                    del self._failures[i]
                    return status, body, headers
        return None

    def _login(self, rec):
        form = urllib.parse.parse_qs(rec.body.decode("utf-8"))
        ctype = rec.headers.get("content-type", "")
        user = (form.get("username") or [""])[0]
        password = (form.get("password") or [""])[0]
        tenant = (form.get("tenant") or [None])[0]
        known = self.users.get(user)
        if not ctype.startswith("application/x-www-form-urlencoded") or not known or \
                known[0] != password or (tenant is not None and tenant != known[1]):
            return 401, {"success": False, "message": "failed.login"}, {}
        return 200, self._new_token(user), {}

    def _new_token(self, user):
        token, refresh = str(uuid.uuid4()), str(uuid.uuid4())
        with self._lock:
            self.logins += 1
            self.tokens[token] = (time.monotonic() + self.token_seconds, refresh)
            self.issued += [token, refresh]
        return {"success": True, "user": user, "token": token, "refresh-token": refresh,
                "validFor": self.valid_for}

    def _refresh(self, rec):
        form = urllib.parse.parse_qs(rec.body.decode("utf-8"))
        old = rec.headers.get("preservica-access-token", "")
        with self._lock:
            entry = self.tokens.pop(old, None)
        if not entry or entry[1] != (form.get("refreshToken") or [""])[0]:
            return 401, {"success": False, "message": "invalid.refresh"}, {}
        return 200, self._new_token("refreshed"), {}

    def _authorised(self, rec):
        token = rec.headers.get("preservica-access-token", "")
        with self._lock:
            entry = self.tokens.get(token)
            return not self.reject_all_tokens and entry is not None and entry[0] > time.monotonic()

    def _thumbnail(self, query):
        ident = (query.get("id") or [""])[0]
        size = (query.get("size") or [""])[0]
        m = re.match(r"^sdb:(IO|SO)\|(.+)$", ident)
        if not m or size not in ("small", "medium", "large"):
            return 400, {"success": False, "message": "bad id or size"}, {}
        with self._lock:
            self.thumbnail_requests += 1
            self.thumbnail_ids.append((ident, size))
        if m.group(2) in self.broken_refs:
            return 500, {"success": False, "message": "internal error"}, {}
        found = self.thumbnails.get(m.group(2))
        if found is None:
            return 404, b"", {}
        return 200, found[0], {"Content-Type": found[1]}

    def _entity(self, kind, ref):
        title = self.titles.get(ref)
        if title is None:
            return 404, b"", {}
        tag = "InformationObject" if kind == "information-objects" else "StructuralObject"
        xml = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
               '<EntityResponse xmlns="http://preservica.com/EntityAPI/v{v}" '
               'xmlns:xip="http://preservica.com/XIP/v{v}">'
               '<xip:{tag}><xip:Ref>{ref}</xip:Ref><xip:Title>{title}</xip:Title>'
               '<xip:Description>fake</xip:Description><xip:SecurityTag>open</xip:SecurityTag>'
               '</xip:{tag}><AdditionalInformation><Identifiers>{url}/identifiers</Identifiers>'
               '</AdditionalInformation></EntityResponse>').format(
            v=XIP_VERSION, tag=tag, ref=xml_escape(ref), title=xml_escape(title), url=self.url)
        return 200, xml.encode("utf-8"), {"Content-Type": "application/xml;charset=UTF-8"}

    def drop(self, subscription_id):
        """Preservica loses the subscription (as when it is deleted in its admin UI)."""
        with self._lock:
            del self.subscriptions[subscription_id]

    def _subscriptions(self, rec, path):
        if rec.method == "GET" and path == "/api/webhook/subscriptions":
            with self._lock:
                return 200, list(self.subscriptions.values()), {}
        if rec.method == "DELETE" and path.startswith("/api/webhook/subscriptions/"):
            sid = path.rsplit("/", 1)[-1]
            with self._lock:
                if self.subscriptions.pop(sid, None) is None:
                    return 404, {"success": False, "message": "subscription not found"}, {}
            return 204, b"", {}
        if rec.method == "POST" and path == "/api/webhook/subscriptions":
            doc = subscription_body(rec)
            if doc is None:
                return 400, {"success": False, "message": "url, triggerType and secret are required"}, {}
            ok, why = challenge(doc["url"], doc["secret"])
            if not ok:
                return 400, {"success": False, "message": "challenge failed: %s" % why}, {}
            sid = secrets.token_hex(16)
            sub = {"id": sid, "url": doc["url"], "triggerType": doc["triggerType"],
                   "includeIdentifiers": str(doc.get("includeIdentifiers", "")).lower() == "true"}
            with self._lock:
                self.subscriptions[sid] = sub
            return 200, sub, {}
        return 405, b"", {}


def subscription_body(rec):
    """The JSON subscription request (url, triggerType, secret strings; trigger a known one), or None."""
    if not rec.headers.get("content-type", "").startswith("application/json"):
        return None
    try:
        doc = json.loads(rec.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) and doc[k]
                                            for k in ("url", "triggerType", "secret")):
        return None
    return doc if doc["triggerType"] in TRIGGERS else None


def xml_escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- Preservica calling the subscriber --------------------------------------------------------------

def challenge(url, secret, code=None, timeout=10):
    """``POST url?challengeCode=CODE`` and check the echo; returns (ok, reason)."""
    code = code or secrets.token_hex(16)
    sep = "&" if "?" in url else "?"
    status, headers, body = _send(url + sep + urllib.parse.urlencode({"challengeCode": code}), b"",
                                  {"Content-Type": "application/json"}, chunks=None, timeout=timeout)
    if status != 200:
        return False, "status %d" % status
    try:
        doc = json.loads(body.decode("utf-8"))
    except ValueError:
        return False, "answer is not JSON"
    if doc.get("challengeCode") != code:
        return False, "code not echoed"
    if not hmac.compare_digest(str(doc.get("challengeResponse", "")), sign(secret, code)):
        return False, "wrong challengeResponse"
    return True, "ok"


def deliver(url, secret, body, chunked=True, chunk_size=64, split_multibyte=False, signature=None,
            extra_headers=None, timeout=10):
    """POST a delivery as Preservica does; returns (status, headers, body bytes).

    ``body`` is a dict (JSON-encoded, non-ASCII kept as UTF-8) or bytes. ``chunked=False`` sends
    Content-Length. ``split_multibyte`` makes one chunk boundary fall inside a multi-byte UTF-8
    character. ``signature``: the header value to send instead of the right one ("" = no header)."""
    if isinstance(body, dict):
        body = json.dumps(body, ensure_ascii=False).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    sig = sign(secret, b"preservica-webhook-auth" + body) if signature is None else signature
    if sig:
        headers["Preservica-Signature"] = sig
    headers.update(extra_headers or {})
    chunks = None
    if chunked:
        chunks = _split(body, chunk_size, split_multibyte)
    return _send(url, body, headers, chunks, timeout)


def _split(body, size, split_multibyte):
    """The body in pieces of ``size``; with ``split_multibyte`` the first cut falls inside a character."""
    cuts = list(range(size, len(body), size))
    if split_multibyte:
        inside = next((i for i in range(1, len(body)) if 0x80 <= body[i] <= 0xBF), None)
        if inside is None:
            raise ValueError("body has no multi-byte character to split")
        cuts = sorted(set(cuts + [inside]))
    bounds = [0] + cuts + [len(body)]
    return [body[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _send(url, body, headers, chunks, timeout):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    path = parts.path + ("?" + parts.query if parts.query else "")
    try:
        if chunks is None:
            conn.request("POST", path, body=body, headers=headers)
        else:
            conn.request("POST", path, body=iter(chunks), headers=headers, encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()
