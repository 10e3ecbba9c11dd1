"""The contract between hookd's core and the integration modules in ``handlers/``: all a new one needs.

Strategy: an integration is one file, ``handlers/NAME.py``, laid out like ``handlers/hook.py``: a module
docstring giving the wire contract (what the sender POSTs, how it proves who it is, what hookd calls back,
each citing the upstream's own public documentation or source), then ``class Handler(Integration)`` with
``accept`` and ``run``, and, when it calls an upstream API, one small client class built on
``hookd_core.client.Api``. At startup the core imports every module in ``handlers/`` and, for each
configuration section whose name equals ``Handler.SECTION`` (or starts with it, when SECTION ends with
``:``, as in ``hook:``), builds ``Handler(name, conf, core)``: ``conf`` is the section (a
``config.Section``, defaults applied, ``env:``/``file:``/``cred:`` resolved), ``core`` a ``Core``, the
narrow part of the daemon a handler may use (never the whole App).

Configuration: ``KEYS`` gives every key with its default (``REQUIRED`` for must-haves; the generic action
keys and ``dedupe`` are added by the core), ``SECRET_KEYS`` those whose values are never logged, stored or
shown, and ``check()`` returns one problem line per mistake for ``check-config`` (a missing required key is
reported by the core). Every key is documented in ``credentials.properties.template`` (tests/test_docs.py
checks) and README. Tables of its own: ``SCHEMA`` (``CREATE TABLE IF NOT EXISTS``), used only through
``core.read``/``core.write`` inside one transaction each. Extra CLI subcommands: ``COMMANDS``.

Request thread: a request whose path the handler ``match``es goes to ``accept(req)`` (a ``Request``).
``accept`` verifies with ``hookd_core.verify`` (a scheme over the raw bytes: ``verify.verify(conf, ...)``,
``verify.hmac_scheme``, ``verify.secret_header``, ``verify.path_secret``), parses with ``req.json()`` (400
for anything that is not JSON, deep nesting included), raises a ``Reject`` for what it refuses
(``BadSignature`` 401, ``Forbidden`` 403, ``NotFound`` 404, ``BadPayload`` 422, ``Busy`` 503) and returns
either a list of ``NewEvent`` (the core commits them, then answers 202; each may carry a ``dedupe_key``, so
a redelivery is answered "duplicate" and runs nothing, and a ``serial_key``, so two jobs for one camera or
asset never run at once) or a ``Response`` to answer at once without storing anything (a handshake). It
never touches the network. A POST with neither Content-Length nor Transfer-Encoding is 411 before
``accept`` is called, unless the handler sets ``bodiless_post = True``: it then gets ``req.body == b""``
(RFC 9112 §6.3) and the connection closes after the answer (Preservica's challenge, sent as ``curl -X POST
URL?challengeCode=C`` would).

Worker thread: ``run(ctx)`` (a ``JobContext``) does the integration's own work for one stored event, then
the core runs the section's generic actions (command, forward, teams; ``actions()`` says which, ``card``
what a Teams card says, ``ctx.action_input`` what they get instead of the event). ``run`` ends the job by
returning (done; a short note), raising ``Retry`` (backoff, or ``after`` seconds, then dead after
``retry.max_attempts``) or raising ``Fail`` (dead at once). Calls upstream go through
``hookd_core.client``: one deadline per call, no redirects, and ``client.check`` maps every answer the same
way (2xx the reply; 401/403 ``Fail`` with what to check; 408/429/5xx and network errors ``Retry`` honouring
``Retry-After``; any other status ``Fail`` unless the caller says otherwise; 404 means what the integration
says, so it is tested before ``check``). Times shown or stored are ``iso()`` (ISO 8601 UTC). Files an
integration writes are declared by ``files()``: the core prunes them after their ``keep_days`` and keeps
``min_free_mb`` free under them (``core.need_space(folder)`` before writing raises ``Retry``).
"""

import functools
import hashlib
import json
import os
import time

REQUIRED = object()  # KEYS default meaning "this key must be set"
_scan_json = json.JSONDecoder().scan_once  # (value, end) of the JSON value at an index (Request.json)
JSON_WHITESPACE = " \t\n\r"  # RFC 8259 ws (str.strip() alone would also take \x0b, \x0c, \u00a0, ...)


def json_or_none(body):
    """``body`` (bytes) parsed as JSON, or None when it is empty or not JSON (bad UTF-8, bad syntax, or
    nesting so deep that the parser gives up with RecursionError)."""
    if not body:
        return None
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def iso(ts):
    """Epoch seconds as ISO 8601 UTC with milliseconds (None stays None): the one format hookd shows and
    stores (``iso(time.time())`` for now). The date and time of the last second asked for are kept, so
    the log lines of one second format them once."""
    global _last_second
    if ts is None:
        return None
    second = ts // 1
    last = _last_second
    if last[0] != second:
        last = _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return last[1] + ".%03dZ" % int((ts % 1) * 1000)


_last_second = (None, "")  # (whole epoch second, its date and time): replaced whole, never changed


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


class Forbidden(Reject):
    status = 403


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
    the body, and ``ctx.payload`` is rebuilt from the body by ``element_payload``. ``batch``, on the
    first NewEvent of a batch delivery only: its ``dedupe_key`` stands for the whole delivery and the
    others carry none; dedupe is still per element (the store judges each one by its position and
    content when the delivery's key is already stored)."""

    __slots__ = ("payload", "dedupe_key", "serial_key", "element", "batch")

    def __init__(self, payload=None, dedupe_key=None, serial_key=None, element=None, batch=False):
        self.payload = payload
        self.dedupe_key = dedupe_key
        self.serial_key = serial_key
        self.element = element
        self.batch = batch


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
    ``items()`` in arrival order, from (name, value) pairs as the head carried them, so a lookup is a
    dict access rather than a walk over every header. ``first`` is the index (lower-case name -> its
    first value, one comprehension); ``repeated`` says a name came more than once, and only then is
    ``by_name`` (lower-case name -> its values in order) worth having; it is built on first use (a list
    per name cost every request's six fields 1.3 µs where the one comprehension costs 1.1). Nobody
    changes either."""

    __slots__ = ("_items", "first", "repeated", "_by_name")

    def __init__(self, items, before=None):
        """``before``: (a list of the pairs that came before ``items``, their ``first`` index), indexed
        already (the first lines of a head that a connection's heads share); ``items`` is then a list."""
        if before is None:
            self._items = items = list(items)
            self.first = first = {name.lower(): value for name, value in reversed(items)}  # the first one wins
        else:  # the index of those before, copied, and each new name added once: the first one wins
            self.first = first = before[1].copy()
            add = first.setdefault
            for name, value in items:
                add(name.lower(), value)
            self._items = items = before[0] + items
        self.repeated = len(first) < len(items)
        self._by_name = None

    @property
    def by_name(self):
        index = self._by_name
        if index is None:
            index = {}
            for name, value in self._items:
                index.setdefault(name.lower(), []).append(value)
            self._by_name = index
        return index

    def get(self, name, default=None):
        return self.first.get(name.lower(), default)

    __getitem__ = get

    def get_all(self, name, failobj=None):
        if not self.repeated:
            value = self.first.get(name.lower())
            return failobj if value is None else [value]
        values = self.by_name.get(name.lower())
        return list(values) if values else failobj

    def items(self):
        return list(self._items)

    def __contains__(self, name):
        return name.lower() in self.first


class Request:
    """What ``accept`` and ``get`` see. ``headers`` is a ``Headers`` (case-insensitive ``get``,
    ``get_all``, ``items``); ``query`` maps each name to a list of values; ``body`` is the exact bytes received.
    ``connected()`` is False once the client has hung up (the server sets it; a long poll asks it).
    ``framing.Reader`` yields one per request head, with what the head says besides: the ``target`` as
    sent, the ``query_string`` split from it, the HTTP ``version``, ``keep_alive`` (the connection stays
    open after the answer) and ``expect_continue``; the server then sets ``query``, ``body`` and ``client``."""

    __slots__ = ("method", "path", "query", "headers", "body", "client", "connected", "target", "query_string",
                 "version", "keep_alive", "expect_continue")

    def __init__(self, method, path, query, headers, body, client, target=None, query_string="",
                 version="HTTP/1.1", keep_alive=True, expect_continue=False):
        self.method, self.path, self.query = method, path, query
        self.headers, self.body, self.client = headers, body, client
        self.connected = _always
        self.target, self.query_string, self.version = target, query_string, version
        self.keep_alive, self.expect_continue = keep_alive, expect_continue

    def json(self):
        """The body parsed as JSON, or Unparsable (400). A body that begins with a JSON value (what
        senders send) is read by the decoder's scanner itself: ``json.loads`` adds two whitespace regex
        matches and three calls around it (6.5 -> 5.5 µs a 1.2 KB Preservica delivery); JSON whitespace
        after the value is allowed, as json.loads allows it. Anything else (whitespace before the value,
        a BOM, trailing data, not JSON) goes to ``json.loads``, which decides as before."""
        try:
            text = self.body.decode("utf-8")
            try:
                doc, end = _scan_json(text, 0)
            except StopIteration:  # no value at the first character: json.loads says why, or skips whitespace
                return json.loads(text)
            if end == len(text) or not text[end:].strip(JSON_WHITESPACE):
                return doc
            return json.loads(text)  # trailing data: its error
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise Unparsable("body is not JSON: %s" % e.__class__.__name__)

    def query1(self, name, default=None):
        values = self.query.get(name)
        return values[0] if values else default


def _always():
    return True


def path_segment(path, prefix):
    """The one non-empty path segment after ``prefix`` ("/ixon/webhook/KEY" → "KEY"), or None."""
    rest = path[len(prefix):] if path.startswith(prefix) else ""
    return rest if rest and "/" not in rest else None


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
      COMMANDS     {"zencoder-submit": function(handler, argv) -> exit code}, extra CLI subcommands, called
                   with the configured section's Handler (the core says so when the section is absent)
      max_parallel at most this many of this section's jobs run at once (None: no limit)
      queue_size   at most this many of this section's events waiting (queued, retrying or running); more
                   -> 503 + Retry-After, checked by the core inside the insert transaction (None: no limit)
      job_timeout  seconds a job may run before the watchdog calls the worker stuck
      RUNS_REMOTELY  False when ``run`` keeps state in the store (correlation tables): its jobs then
                   cannot be leased to a remote worker (``remote = true`` is refused)
      route        the POST path, or a pattern shown in log lines ("/ixon/webhook/{key}": a secret path
                   segment is never logged); override ``match`` for patterns
      bodiless_post  True: a POST with neither Content-Length nor Transfer-Encoding reaches ``accept``
                   with an empty body (RFC 9112 §6.3) instead of being answered 411; the connection is
                   closed after the answer (Preservica's challenge comes that way)
    ``self.conf`` is a ``config.Section``: ``get``, ``int``, ``float``, ``bool``, ``list`` with defaults
    applied and ``env:``/``file:``/``cred:`` already resolved. ``self.core`` is the ``Core``.
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
    route = None
    bodiless_post = False

    def __init__(self, name, conf, core):
        self.name, self.conf, self.core = name, conf, core

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

    def files(self):
        """The files this integration writes, as a list of ``Files``: the core deletes those older than
        their ``keep_days`` in the daily prune and ``hookd.py prune``, and /readyz reports a folder with
        less than ``min_free_mb`` free."""
        return []


class Files:
    """Files one integration writes: ``folder``, the name ``suffixes`` that are its own (nothing else
    there is touched), ``keep_days`` (0: kept forever) and what one is called (``noun``, for messages)."""

    __slots__ = ("folder", "suffixes", "keep_days", "noun")

    def __init__(self, folder, suffixes, keep_days, noun):
        self.folder, self.suffixes, self.keep_days, self.noun = folder, tuple(suffixes), keep_days, noun

    def prune(self, now=None):
        """Delete this integration's files last modified more than ``keep_days`` ago; returns how many."""
        if not self.keep_days or self.keep_days <= 0:
            return 0
        cutoff = (time.time() if now is None else now) - self.keep_days * 86400.0
        removed = 0
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.endswith(self.suffixes) or entry.name.startswith("."):
                continue  # temporary files (.tmp-*) belong to a job still writing
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed


def free_mb(folder):
    """Megabytes free to an unprivileged writer on the file system holding ``folder`` (or its nearest
    existing parent, for a folder not created yet)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 1048576.0


class Core:
    """The part of the daemon one integration may use, instead of the whole App: its section ``name``,
    the ``[hookd]`` ``settings``, ``state_dir``, the ``log``, the store (``read``/``write`` a function of
    a sqlite connection, for its own tables and its own route's events; ``waiting()`` its events not
    finished yet), the free-space floor (``need_space``) and every configured secret (``secrets``, to
    keep them out of what a job passes on)."""

    def __init__(self, app, name):
        self._app, self.name = app, name

    @property
    def settings(self):
        return self._app.settings

    @property
    def state_dir(self):
        return self._app.state_dir

    @property
    def log(self):
        return self._app.log

    def read(self, fn):
        return self._app.store.read(fn)

    def write(self, fn):
        return self._app.store.write(fn)

    def waiting(self):
        return self._app.store.waiting(self.name)

    def secrets(self):
        """Every secret configured anywhere in the daemon, to keep out of a child's environment."""
        return self._app.secrets()

    def need_space(self, folder):
        """Raise Retry when ``folder`` has less than ``min_free_mb`` free: a recording or thumbnail waits
        for space instead of filling the disk (intake, which needs far less, carries on)."""
        floor = self.settings.float("min_free_mb")
        free = free_mb(folder)
        if free < floor:
            raise Retry("only %d MB free under %s (min_free_mb = %g); waiting for space" % (free, folder, floor))


class JobContext:
    """What ``run`` and the actions see for one attempt of one event.

    id, route, attempt (1-based), payload (JSON value), body (raw bytes), headers (dict of the stored,
    non-secret headers, lower-case names), content_type, received_at (ISO 8601), conf (the section),
    stopping (threading.Event set on shutdown), log (logging.Logger-like, messages get the event id),
    products (where ``product`` records go: the store, or None where there is none). A handler may set
    ``action_input`` (a JSON-able dict the actions get instead of the event) or ``skip_actions = True``
    (run no generic action this time).
    """

    def __init__(self, id, route, attempt, payload, body, headers, content_type, received_at, conf, stopping,
                 log, products=None):
        self.id, self.route, self.attempt = id, route, attempt
        self.payload, self.body, self.headers, self.content_type = payload, body, headers, content_type
        self.received_at, self.conf, self.stopping, self.log = received_at, conf, stopping, log
        self.products = products
        self.action_input = None
        self.skip_actions = False

    def product(self, kind, path=None, data=None):
        """Record what this job produced, for the console: a file it wrote (``path``; the console serves
        files only through these records) or what it sent (``data``, JSON-able). Kinds the console
        shows: ``thumbnail`` and ``clip`` (files), ``labels`` and ``variations`` (data). A job run by a
        remote worker records into that host's own store, next to the files it wrote."""
        if self.products is not None:
            self.products.add_product(self.id, kind, None if path is None else os.path.abspath(path), data)


def dedupe_key(rule, req):
    """The dedupe key for ``req`` under ``rule``: ``header:NAME`` (None if the header is absent),
    ``json:dotted.path`` (None if absent), ``body`` or empty (sha256 of the raw body), ``none`` (None)."""
    return dedupe_keyer(rule)(req)


@functools.lru_cache(maxsize=64)
def dedupe_keyer(rule):
    """``dedupe_key`` under one ``rule`` (rules come from the configuration: a handful), the rule read
    once: a function of the request."""
    rule = (rule or "body").strip()
    if rule == "none":
        return _no_key
    if rule.startswith("header:"):
        name = rule[7:].strip()

        def by_header(req):
            value = req.headers.get(name)
            return "h:" + value.strip() if value else None
        return by_header
    if rule.startswith("json:"):
        path = rule[5:].strip().split(".")

        def by_json(req):
            value = json_or_none(req.body)
            for part in path:
                if not isinstance(value, dict) or part not in value:
                    return None
                value = value[part]
            return "j:" + (value if isinstance(value, str) else json.dumps(value, sort_keys=True))
        return by_json
    return _body_key


def _no_key(req):
    return None


def _body_key(req):
    return "b:" + hashlib.sha256(req.body).hexdigest()
