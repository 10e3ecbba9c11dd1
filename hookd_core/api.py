"""The contract between hookd's core and the integration modules in ``handlers/``.

Strategy: an integration is one file, ``handlers/NAME.py``, that defines ``class Handler(Integration)``.
At startup the core imports every module in ``handlers/``, and for each configuration section whose name
equals ``Handler.SECTION`` (or starts with it, when SECTION ends with ``:``, as in ``hook:``) it builds one
``Handler(name, conf, app)``. A request whose path the handler ``match``es goes to ``accept`` on the
request thread: verify over the raw bytes, parse, and return the events to store. The core commits them
(group commit) and only then answers 202. A worker later calls ``run(ctx)`` for each stored event, then
the section's generic actions (command, forward, teams). ``run`` ends the job by returning (done),
raising ``Retry`` (backoff, then dead), or raising ``Fail`` (dead at once). A handler never imports
``hookd``; everything it needs from outside comes through ``app`` and ``ctx``.
"""

import json
import os

REQUIRED = object()  # KEYS default meaning "this key must be set"


def json_or_none(body):
    """``body`` (bytes) parsed as JSON, or None when it is empty or not JSON (bad UTF-8, bad syntax, or
    nesting so deep that the parser gives up with RecursionError)."""
    if not body:
        return None
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


# -- errors that carry their HTTP status (h11's error_status_hint) -------------------------------------

class Reject(Exception):
    """A request refused with ``status``; the message goes to one WARNING log line, never a secret."""
    status = 400
    headers = ()

    def __init__(self, reason, status=None, headers=()):
        super().__init__(reason)
        if status is not None:
            self.status = status
        self.headers = tuple(headers)


class BadFraming(Reject):
    status = 400


class Unparsable(Reject):
    status = 400


class BadSignature(Reject):
    status = 401


class NotFound(Reject):
    status = 404


class BodyTooLarge(Reject):
    status = 413


class BadPayload(Reject):
    status = 422


class Busy(Reject):
    """503 with Retry-After: a queue is full; the sender should try again later."""
    status = 503

    def __init__(self, reason, retry_after=5):
        super().__init__(reason, headers=[("Retry-After", str(int(retry_after)))])


class Retry(Exception):
    """Raised by a job: try again later (after ``after`` seconds, else the configured backoff)."""

    def __init__(self, reason, after=None):
        super().__init__(reason)
        self.after = after


class Fail(Exception):
    """Raised by a job: retrying cannot help (bad token, forbidden host); the event goes dead at once."""


# -- what accept() returns -----------------------------------------------------------------------------

class NewEvent:
    """One job to store. ``payload`` (JSON-able) is what ``ctx.payload`` will be; None means the parsed
    body. ``dedupe_key`` None means the section's ``dedupe`` setting (default: sha256 of the body).
    ``serial_key``: never two running jobs with the same key (a camera, an asset). ``element``: this job
    is element N of the body's ``events`` array (a batch delivery); only N is stored, never a copy of
    the body, and ``ctx.payload`` is rebuilt from the body by ``element_payload``."""

    __slots__ = ("payload", "dedupe_key", "serial_key", "element")

    def __init__(self, payload=None, dedupe_key=None, serial_key=None, element=None):
        self.payload = payload
        self.dedupe_key = dedupe_key
        self.serial_key = serial_key
        self.element = element


def element_payload(doc, index):
    """The payload of element ``index`` of a batch delivery ``doc``: the envelope's fields (everything
    but ``events``) plus ``"event": events[index]``."""
    out = {k: v for k, v in doc.items() if k != "events"}
    out["event"] = doc["events"][index]
    return out


def stored_payload(payload, body, element):
    """A stored event's payload from its columns: the stored JSON text, else element ``element`` of the
    body, else the body parsed as JSON (None when it is not JSON)."""
    if payload is not None:
        return json.loads(payload)
    doc = json_or_none(body)
    if element is not None and doc is not None:
        return element_payload(doc, element)
    return doc


class Headers:
    """Request headers, indexed once: case-insensitive ``get`` (first value) and ``get_all``, and
    ``items()`` in arrival order. Built from the stdlib's parsed head (``raw_items``), so a lookup is
    a dict access rather than a walk over every header."""

    __slots__ = ("_items", "_index")

    def __init__(self, items):
        self._items = list(items)
        self._index = {}
        for name, value in self._items:
            self._index.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        values = self._index.get(name.lower())
        return values[0] if values else default

    __getitem__ = get

    def get_all(self, name, failobj=None):
        values = self._index.get(name.lower())
        return list(values) if values else failobj

    def items(self):
        return list(self._items)

    def __contains__(self, name):
        return name.lower() in self._index


class Request:
    """What ``accept`` and ``get`` see. ``headers`` is a ``Headers`` (case-insensitive ``get``,
    ``get_all``, ``items``); ``query`` maps each name to a list of values; ``body`` is the exact bytes received.
    ``connected()`` is False once the client has hung up (the server sets it; a long poll asks it)."""

    def __init__(self, method, path, query, headers, body, client):
        self.method, self.path, self.query = method, path, query
        self.headers, self.body, self.client = headers, body, client
        self.connected = _always

    def json(self):
        """The body parsed as JSON, or Unparsable (400)."""
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise Unparsable("body is not JSON: %s" % e.__class__.__name__)

    def query1(self, name, default=None):
        values = self.query.get(name)
        return values[0] if values else default


def _always():
    return True


class Response:
    """A reply for ``get``/``admin`` routes and for answers like Preservica's challenge."""

    def __init__(self, status=200, body=b"", content_type="application/json", headers=()):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode("utf-8")
        self.status, self.body, self.content_type, self.headers = status, body, content_type, tuple(headers)


class Integration:
    """Base class for ``handlers/NAME.py``'s ``Handler``. Override what the integration needs.

    Attributes the core reads:
      SECTION      config section name ("iconik"), or a prefix ending in ":" ("hook:") for many sections
      KEYS         {key: default}; REQUIRED for must-have keys. The generic action keys (command, forward,
                   teams.url, ...) and dedupe are added by the core. Every key is documented in the template.
      SECRET_KEYS  keys whose values are secrets (never logged; their headers are never stored)
      SCHEMA       SQL run with executescript at startup (CREATE TABLE IF NOT EXISTS ...), for own tables
      COMMANDS     {"zencoder-submit": function(app, argv) -> exit code}, extra CLI subcommands
      max_parallel at most this many of this section's jobs run at once (None: no limit)
      queue_size   at most this many of this section's events waiting (queued, retrying or running); more
                   -> 503 + Retry-After, checked by the core inside the insert transaction (None: no limit)
      job_timeout  seconds a job may run before the watchdog calls the worker stuck
      RUNS_REMOTELY  False when ``run`` keeps state in the store (correlation tables): its jobs then
                   cannot be leased to a remote worker (``remote = true`` is refused)
    ``self.conf`` is a ``config.Section``: ``get``, ``int``, ``float``, ``bool``, ``list`` with defaults
    applied and ``env:``/``file:``/``cred:`` already resolved.
    """

    SECTION = None
    KEYS = {}
    SECRET_KEYS = ()
    SCHEMA = ""
    COMMANDS = {}
    max_parallel = None
    queue_size = None
    job_timeout = 600
    RUNS_REMOTELY = True
    route = None  # the POST path; override match() for patterns

    def __init__(self, name, conf, app):
        self.name, self.conf, self.app = name, conf, app

    def match(self, path):
        """True when this integration owns ``path`` (query string already removed)."""
        return path == self.route

    def check(self):
        """Configuration problems beyond missing required keys, one string each."""
        return []

    def accept(self, req):
        """Request thread: verify (raise BadSignature), parse (Unparsable/BadPayload), return a list of
        NewEvent, or a Response to answer at once without storing anything (a handshake)."""
        raise NotImplementedError

    def run(self, ctx):
        """Worker thread: the integration's own work for one stored event. Return None or a short note."""
        return None

    def get(self, req):
        """GET on a path this integration matches; return a Response. Default: 405."""
        raise Reject("method not allowed", status=405, headers=[("Allow", "POST")])

    def admin_get(self, req):
        """GET on an admin path (already authorised by the core); return a Response, or None if not ours."""
        return None

    def actions(self):
        """Names of the generic actions to run after ``run``, in order. Default: each one configured."""
        names = []
        if self.conf.get("command"):
            names.append("command")
        if self.conf.get("forward"):
            names.append("forward")
        if self.conf.get("teams.url"):
            names.append("teams")
        return names

    def needs_work(self):
        """False when a stored event has nothing left to do (no work of its own, no action): it is then
        stored as done at once and no worker touches it. Override when ``run`` may do nothing."""
        return type(self).run is not Integration.run or bool(self.actions())

    def card(self, ctx):
        """What a Teams card says about this event: {"title": str, "facts": [(name, value)], "text": str}."""
        return {"title": "hookd: %s event %s" % (self.name, ctx.id), "facts": [("route", self.name)],
                "text": ""}


class JobContext:
    """What ``run`` and the actions see for one attempt of one event.

    id, route, attempt (1-based), payload (JSON value), body (raw bytes), headers (dict of the stored,
    non-secret headers, lower-case names), content_type, received_at (ISO 8601), conf (the section),
    app (see hookd_core.app.App), stopping (threading.Event set on shutdown), log (logging.Logger-like,
    messages get the event id). A handler may set ``action_input`` (a JSON-able dict the actions get
    instead of the event) or ``skip_actions = True`` (run no generic action this time).
    """

    def __init__(self, **kw):
        self.action_input = None
        self.skip_actions = False
        self.__dict__.update(kw)

    def product(self, kind, path=None, data=None):
        """Record what this job produced, for the console: a file it wrote (``path``; the console serves
        files only through these records) or what it sent (``data``, JSON-able). Kinds the console
        shows: ``thumbnail`` and ``clip`` (files), ``labels`` and ``variations`` (data). A job run by a
        remote worker (SPEC §10) records into that host's own store, next to the files it wrote."""
        self.app.store.add_product(self.id, kind, None if path is None else os.path.abspath(path), data)


def dedupe_key(rule, req):
    """The dedupe key for ``req`` under ``rule``: ``header:NAME`` (None if the header is absent),
    ``json:dotted.path`` (None if absent), ``body`` or empty (sha256 of the raw body), ``none`` (None)."""
    import hashlib
    rule = (rule or "body").strip()
    if rule == "none":
        return None
    if rule.startswith("header:"):
        value = req.headers.get(rule[7:].strip())
        return "h:" + value.strip() if value else None
    if rule.startswith("json:"):
        value = json_or_none(req.body)
        for part in rule[5:].strip().split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return "j:" + (value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    return "b:" + hashlib.sha256(req.body).hexdigest()
