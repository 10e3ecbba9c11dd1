"""Preservica webhooks (v6.8+): the subscription handshake, signed event deliveries, thumbnails and Teams cards.

Wire contract (carj/pyPreservica ``pyPreservica/webHooksAPI.py`` and ``docs/webhooks.rst``;
https://developers.preservica.com/api-reference/6-access-token-api). A subscription
(``POST /api/webhook/subscriptions`` with ``url``, ``triggerType``, ``secret``) makes Preservica POST
``url?challengeCode=C``, possibly with no body at all, and expect 200 JSON ``{"challengeCode": C,
"challengeResponse": hex(HMAC-SHA256(secret, C))}``. Every delivery after that is a POST whose
``Preservica-Signature`` is hex HMAC-SHA256(secret, ``"preservica-webhook-auth"`` + raw body) (401 when
missing or wrong) and whose JSON body is ``{"subscriptionId", "timestamp", "trigger", "events": [{"entityRef",
"entityType", "identifiers"?, "event"?}, ...]}``. For thumbnails hookd logs in (``POST
/api/accesstoken/login``, form ``username``, ``password``, ``tenant``: 200 ``{"token", "validFor"}``
minutes) and fetches ``GET /api/content/thumbnail?id=sdb:IO|REF&size=S`` with ``Preservica-Access-Token``
(404: the entity has no thumbnail); the card's title comes from ``GET /api/entity/information-objects/REF``
(XML, ``Title``).

Strategy: ``accept`` runs on the request thread and never touches the network. A POST carrying
``?challengeCode=C`` is the handshake, answered at once, before and without any signature check (also when
it has no body: ``bodiless_post``). Any other POST is verified with the core's ``hmac`` recipe (message
``preservica-webhook-auth{body}``); then each element of ``events[]`` becomes its own stored job (one
serial lane per entity), so one failing asset never holds up the others. The delivery's body is stored
once; each job keeps only its element's index, and its payload (the envelope's fields plus ``"event":
element``) is rebuilt from the body on the worker. On a worker, ``run`` does the ``thumbnail`` action
itself through ``PreservicaApi`` (token cached, one new login on a 401, answers mapped by
``client.check``), waiting for ``min_free_mb`` before it writes, and the daily prune deletes thumbnails
older than ``thumbnail.keep_days``; ``teams``, ``command`` and ``forward`` are the core's
generic actions, run afterwards in the order the ``actions`` key lists them, and ``card`` tells the Teams
action what to say.
"""

import hashlib
import hmac
import json
import os
import re
import tempfile
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from json.encoder import encode_basestring_ascii as _json_string

from hookd_core import client, verify
from hookd_core.api import (REQUIRED, BadPayload, Fail, Files, Integration, NewEvent, Reject, Response,
                            Retry, dedupe_key)
from hookd_core.config import ConfigError

SIGNATURE_PREFIX = "preservica-webhook-auth"
SIGNED_MESSAGE = SIGNATURE_PREFIX + "{body}"  # the core hmac recipe's template
# The handshake signs any code it is given; a code that begins like a signed event body would turn the
# handshake into a signing oracle for forged events, so such codes are refused.
MAX_CHALLENGE = 512        # characters; real codes are short random strings
MAX_EVENTS = 1000          # elements per delivery; a bigger array is not something Preservica sends
MAX_KEY_STAMP = 40         # characters of the delivery's timestamp that lead its events' dedupe keys
API_TIMEOUT = 30           # seconds for each call to the Preservica API
MAX_ENTITY_XML = 1 << 20   # bytes of entity XML read for the card's title
TOKEN_MARGIN = 60          # seconds before validFor runs out that a cached token is dropped
ACTIONS = ("thumbnail", "teams", "command", "forward")
GENERIC = {"teams": "teams.url", "command": "command", "forward": "forward"}
SIZES = ("small", "medium", "large")
THUMB_TYPES = {"IO": "IO", "SO": "SO"}  # entity types the thumbnail API knows; CO has none
TRIGGER_WORDS = {
    "FULL_TEXT_INDEXED": "ingested and indexed",
    "MOVED": "moved",
    "INGEST_FAILED": "failed to ingest",
    "CHANGED_SECURITY_DESCRIPTOR": "security descriptor changed",
    "CHANGE_ASSET_VISIBILITY": "visibility changed",
}
ENTITY_PATHS = {"IO": "information-objects", "SO": "structural-objects", "CO": "content-objects"}
ENTITY_WORDS = {"IO": "asset", "SO": "folder", "CO": "content object"}
_sha256 = hashlib.sha256  # one global look-up a delivery key, not a global and an attribute


def safe_name(ref):
    """``ref`` as a file name that cannot leave its directory: only [A-Za-z0-9_.-], no leading dot."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", ref)[:200].lstrip(".")
    if not name:
        raise Fail("entity reference %r cannot be used as a file name" % ref[:80])
    return name


def trigger_of(payload):
    """The event's trigger: the per-event ``event`` field [U], else the envelope's ``trigger``."""
    event = payload.get("event") or {}
    return str(event.get("event") or payload.get("trigger") or "UNKNOWN")


class Handler(Integration):
    SECTION = "preservica"
    route = "/preservica"
    KEYS = {
        "secret.key": REQUIRED,
        "server": "",
        "username": "",
        "password": "",
        "tenant": "",
        "actions": "",
        "thumbnail.size": "large",
        "thumbnail.dir": "",
        "thumbnail.keep_days": "0",
    }
    SECRET_KEYS = ("secret.key", "password")
    bodiless_post = True  # the challenge may come with neither Content-Length nor Transfer-Encoding

    def __init__(self, name, conf, core):
        super().__init__(name, conf, core)
        self.api = PreservicaApi(conf)
        # read once: a Section never changes (a reload builds new handlers)
        self._rule, self._lane = conf.get("dedupe"), name + ":"
        # its key prepared now (a section without secret.key is a problem check-config reports, not a crash)
        self._verify = verify.hex_hmac_checker([conf.get("secret.key") or ""], "Preservica-Signature",
                                               SIGNED_MESSAGE)
        unlisted = [n for n, key in GENERIC.items() if conf.get(key) and n not in self.wanted()]
        if unlisted and core is not None:
            core.log.warning("[%s] not listed in actions, so not run: %s", name, ", ".join(unlisted))

    # -- configuration -------------------------------------------------------------------------------

    def wanted(self):
        """The ``actions`` key as a list of names, in the order given."""
        return [a.lower() for a in self.conf.list("actions")]

    def check(self):
        problems = []
        wanted = self.wanted()
        for name in wanted:
            if name not in ACTIONS:
                problems.append("[%s] actions: unknown action %r (known: %s)" % (
                    self.name, name, ", ".join(ACTIONS)))
            elif name in GENERIC and not self.conf.get(GENERIC[name]):
                problems.append("[%s] actions lists %s but %s is empty" % (self.name, name, GENERIC[name]))
        if "thumbnail" in wanted:
            for key in ("server", "username", "password"):
                if not self.conf.get(key):
                    problems.append("[%s] actions lists thumbnail but %s is empty" % (self.name, key))
            if self.conf.get("thumbnail.size") not in SIZES:
                problems.append("[%s] thumbnail.size must be one of %s" % (self.name, ", ".join(SIZES)))
        try:
            negative = self.conf.float("thumbnail.keep_days") < 0
        except ConfigError:
            negative = True
        if negative:
            problems.append("[%s] thumbnail.keep_days must be 0 (keep) or a number of days" % self.name)
        server = self.conf.get("server")
        if server and urllib.parse.urlsplit(server).scheme not in ("http", "https"):
            problems.append("[%s] server must be an http(s):// URL" % self.name)
        return problems

    def actions(self):
        """The generic actions named in ``actions``, in that order; an empty key runs none."""
        return [name for name in self.wanted() if name in GENERIC]

    def needs_work(self):
        """Store-and-log only (``actions`` empty) leaves nothing for a worker."""
        return bool(self.wanted())

    # -- request thread ------------------------------------------------------------------------------

    def accept(self, req):
        if "challengeCode" in req.query:
            return self.challenge(req.query1("challengeCode", ""))
        self._verify(req.headers, req.body)
        body = req.json()
        if not isinstance(body, dict) or not isinstance(body.get("events"), list):
            raise BadPayload("body is not an object with an events array")
        events = body["events"]
        if not events:
            return Response(200, {"success": True, "status": "empty", "ids": []})
        if len(events) > MAX_EVENTS:
            raise BadPayload("more than %d events in one delivery" % MAX_EVENTS)
        return self.new_events(req, body)

    def challenge(self, code):
        """The subscription handshake: echo the code with its lower-case hex HMAC-SHA256."""
        if len(code) > MAX_CHALLENGE:
            raise Reject("challengeCode longer than %d characters" % MAX_CHALLENGE)
        if code.startswith(SIGNATURE_PREFIX):
            raise Reject("challengeCode looks like a signed event body; refused")
        mac = hmac.new(self.conf.get("secret.key").encode("utf-8"), code.encode("utf-8"), hashlib.sha256)
        return Response(200, json.dumps({"challengeCode": code, "challengeResponse": mac.hexdigest()}).encode())

    def new_events(self, req, body):
        """One NewEvent per element of ``events[]``: its index in the array (the body is stored once, the
        envelope is never copied) and one serial lane per entity. Dedupe is per element, but a delivery
        stores one key: with the section's ``dedupe`` rule, that rule's key plus the element's position on
        every element; otherwise the delivery's key (``delivery_key``) on its first element, a batch
        (``NewEvent.batch``): only when that key is already stored (a redelivery) does the store judge
        each element by its own position and content. A new delivery costs one key and one index entry
        instead of one per element (measured: ~4 µs a 4-event delivery in the writer, ~4 µs of keys on
        the request thread)."""
        lane = self._lane
        out, index = [], 0
        for element in body["events"]:
            ref = element.get("entityRef") if element.__class__ is dict or isinstance(element, dict) else None
            if ref.__class__ is not str or not ref.strip():
                raise self._bad_element(index, element)
            out.append(NewEvent(None, None, lane + ref, index))
            index += 1
        rule = self._rule
        if rule:
            key = dedupe_key(rule, req)
            for index, event in enumerate(out):
                event.dedupe_key = None if key is None else "%s#%d" % (key, index)
        else:
            out[0].dedupe_key, out[0].batch = self.delivery_key(req.body, body), True
        return out

    @staticmethod
    def _bad_element(index, element):
        """The BadPayload for element ``index``, which is not an object with an entityRef."""
        if not isinstance(element, dict):
            return BadPayload("events[%d] is not an object" % index)
        return BadPayload("events[%d] has no entityRef" % index)

    def delivery_key(self, raw, body):
        """The key of a whole delivery: the key earlier versions gave its first element alone, a hash of
        the subscription, timestamp and trigger (the body's hash when there is no timestamp) and of the
        first element's position, reference, type and event. So a redelivery of the same message finds
        it, a delivery stored by an earlier version (one key per element) included, and a later event
        about the same asset (a later timestamp) does not. It begins with the delivery's timestamp, so
        keys arrive roughly in order and each commit adds them at the end of the dedupe index instead of
        scattered over all of it (measured: 47 KB of WAL per 4-event delivery with hash-first keys, 11
        KB with timestamp-first ones)."""
        stamp, first = body.get("timestamp"), body["events"][0]
        subscription, trigger = body.get("subscriptionId"), body.get("trigger")
        if stamp and stamp.__class__ is str and subscription.__class__ is str and trigger.__class__ is str:
            # the usual delivery: json.dumps([subscription, stamp, trigger]) without building an encoder (~1
            # µs), in one format with the first element's part (~0.4 µs)
            material = "[%s, %s, %s]\x000\x00%s\x00%s\x00%s" % (  # the first element's position, 0, in the text
                _json_string(subscription), _json_string(stamp), _json_string(trigger), first.get("entityRef"),
                first.get("entityType"), first.get("event"))
            return "pv:%s:%s" % (stamp[:MAX_KEY_STAMP],
                                 _sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:32])
        if stamp:
            base, prefix = json.dumps([subscription, stamp, trigger]), "pv:%s:" % str(stamp)[:MAX_KEY_STAMP]
        else:
            base, prefix = "body:" + hashlib.sha256(raw).hexdigest(), "pv:"
        material = "%s\0%d\0%s\0%s\0%s" % (base, 0, first.get("entityRef"), first.get("entityType"),
                                           first.get("event"))
        return prefix + hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    # -- worker thread -------------------------------------------------------------------------------

    def run(self, ctx):
        if "thumbnail" not in self.wanted():
            return None
        return self.thumbnail(ctx)

    def thumbnail(self, ctx):
        """Fetch the entity's thumbnail and write ``thumbnail.dir/REF.jpg|.png``; a 404 is done."""
        event = ctx.payload["event"]
        ref, kind = event["entityRef"], str(event.get("entityType") or "IO").upper()
        if kind not in THUMB_TYPES:
            return "no thumbnail for entity type %s" % kind
        query = urllib.parse.urlencode({"id": "sdb:%s|%s" % (THUMB_TYPES[kind], ref),
                                        "size": self.conf.get("thumbnail.size")})
        self.core.need_space(self.thumbnail_dir())
        reply = self.api.request("GET", "/api/content/thumbnail?" + query, "image/png, image/jpeg, image/*")
        if reply.status == 404:
            ctx.log.info("preservica: no thumbnail for sdb:%s|%s", kind, ref)
            return "no thumbnail for sdb:%s|%s" % (kind, ref)
        client.check(reply, "Preservica thumbnail")
        if not reply.body:
            raise Retry("thumbnail for %s came back empty" % ref)
        path = self.write_thumbnail(ref, reply.headers.get("Content-Type", ""), reply.body)
        ctx.product("thumbnail", path=path)
        ctx.log.info("preservica: thumbnail %s (%d bytes)", path, len(reply.body))
        return "thumbnail %s" % os.path.basename(path)

    def write_thumbnail(self, ref, content_type, data):
        """Write ``data`` atomically as REF.png (Content-Type image/png) or REF.jpg; return the path."""
        folder = self.thumbnail_dir()
        os.makedirs(folder, exist_ok=True)
        ext = ".png" if content_type.split(";")[0].strip().lower() == "image/png" else ".jpg"
        name = safe_name(ref)
        path = os.path.join(folder, name + ext)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=ext)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        other = os.path.join(folder, name + (".jpg" if ext == ".png" else ".png"))
        if os.path.exists(other):
            os.unlink(other)  # the asset's thumbnail changed type; keep only the current one
        return path

    def thumbnail_dir(self):
        """``thumbnail.dir`` (relative paths are below state_dir), default ``state_dir/thumbnails``."""
        folder = self.conf.get("thumbnail.dir") or "thumbnails"
        return os.path.join(self.core.state_dir, os.path.expanduser(folder))

    def files(self):
        if "thumbnail" not in self.wanted():
            return []
        return [Files(self.thumbnail_dir(), (".jpg", ".png"), self.conf.float("thumbnail.keep_days"),
                      "thumbnail")]

    # -- the Teams card ------------------------------------------------------------------------------

    def card(self, ctx):
        """Trigger, entity type, reference and title (read from Preservica when credentials are set)."""
        payload = ctx.payload
        event = payload.get("event") or {}
        ref, kind = str(event.get("entityRef", "")), str(event.get("entityType") or "IO").upper()
        trigger = trigger_of(payload)
        title = self.title_of(ctx, kind, ref)
        facts = [("Trigger", trigger), ("Entity type", kind), ("Reference", ref),
                 ("Title", title or "(unknown)")]
        for key, label in (("tenant", "Tenant"), ("timestamp", "Time")):
            if payload.get(key):
                facts.append((label, str(payload[key])))
        words = TRIGGER_WORDS.get(trigger, trigger.lower().replace("_", " "))
        what = "Preservica: %s %s" % (ENTITY_WORDS.get(kind, "entity"), words)
        return {"title": "%s: %s" % (what, title or ref),
                "facts": facts,
                "text": "%s (%s) %s" % (title, ref, words) if title else "%s %s" % (ref, words)}

    def title_of(self, ctx, kind, ref):
        """The entity's Title from ``GET /api/entity/{kind path}/REF``, or None (no credentials, failure)."""
        if not (self.conf.get("server") and self.conf.get("username") and ENTITY_PATHS.get(kind)):
            return None
        try:
            reply = self.api.request("GET", "/api/entity/%s/%s" % (ENTITY_PATHS[kind], urllib.parse.quote(ref, safe="")),
                                 "application/xml", max_body=MAX_ENTITY_XML)
            return xml_title(client.check(reply, "Preservica entity").body)
        except (Retry, Fail, ET.ParseError) as e:
            ctx.log.warning("preservica: title of %s not read: %s", ref, e)
            return None


class PreservicaApi(client.Api):
    """Calls to the Preservica REST API with an access token: logged in on first use, cached until
    shortly before ``validFor`` runs out, and renewed once when a call is answered 401."""

    REFUSED = "[preservica] username, password and tenant"

    def __init__(self, conf):
        super().__init__(conf.get("server"), API_TIMEOUT)
        self.conf = conf
        self._token = None
        self._token_until = 0.0
        self._token_lock = threading.Lock()

    def request(self, method, path, accept="application/json", body=None, max_body=client.MAX_REPLY):
        """``method`` on ``server + path`` with the cached token (a ``body`` is sent as JSON); on a 401 log
        in again once and repeat. The Reply is returned whatever its status (404 means something to each
        caller; the subscription calls read theirs)."""
        refused = None
        for _ in range(2):
            token = self.token(refused)
            reply = self.call(method, path, body, headers={"Preservica-Access-Token": token, "Accept": accept},
                              max_body=max_body)
            if reply.status != 401:
                return reply
            refused = token
        raise Fail("Preservica answered 401 to %s even after a new login: check %s" % (
            path.split("?")[0], self.REFUSED))

    def token(self, refused=None):
        """A valid access token: the cached one, or a new login when there is none, it is about to run
        out, or it is the one just ``refused`` (if another worker already replaced it, that one is
        used: concurrent 401s cost one login, not one each)."""
        with self._token_lock:
            if not self._token or time.monotonic() >= self._token_until or self._token == refused:
                self._token, self._token_until = self.login()
            return self._token

    def login(self):
        """``POST /api/accesstoken/login`` (form fields); returns (token, monotonic expiry)."""
        form = {"username": self.conf.get("username"), "password": self.conf.get("password")}
        if self.conf.get("tenant"):
            form["tenant"] = self.conf.get("tenant")
        reply = self.call("POST", "/api/accesstoken/login", urllib.parse.urlencode(form),
                          headers={"Accept": "application/json"},
                          content_type="application/x-www-form-urlencoded")
        doc = client.check(reply, "Preservica login", self.REFUSED).json()
        token = doc.get("token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise Fail("Preservica login answered %d without a token" % reply.status)
        try:
            lifetime = float(doc.get("validFor", 15)) * 60
        except (TypeError, ValueError):
            lifetime = 15 * 60
        margin = min(TOKEN_MARGIN, lifetime / 4)
        return token, time.monotonic() + lifetime - margin


def xml_title(data):
    """The first ``Title`` element's text in an EntityAPI answer (any XIP namespace version), or None."""
    root = ET.fromstring(data)
    for elem in root.iter():
        if elem.tag.rsplit("}", 1)[-1] == "Title" and elem.text and elem.text.strip():
            return elem.text.strip()
    return None
