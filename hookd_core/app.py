"""The App: configuration, the integrations found in ``handlers/``, the store, and the daemon's lifecycle.

Strategy: ``App.load(path)`` reads the file, imports every module in ``handlers/`` and builds one
``Handler`` per matching section, collecting problems (fatal) and warnings (logged). ``serve()`` opens the
store (requeueing events a crash left 'running'), starts the worker pool and the HTTP server on a
thread, then keeps the main thread for signals: handlers only put the signal on a queue (no logging in
a signal handler), and the main loop acts on it: SIGTERM/SIGINT stop intake and drain within
``shutdown_grace``; SIGHUP reloads the configuration in place. The same App, without ``serve()``, backs
the CLI subcommands, so they work on the daemon's state directory while it runs.
"""

import importlib
import json
import os
import pkgutil
import queue
import shlex
import signal
import socket
import ssl
import threading
import time
import urllib.parse

from . import config as config_mod
from . import actions, admin, alerts, clients, logs, proc, subscriptions, systemd_glue
from .children import Registry
from .api import Core, Integration, NewEvent, dedupe_key, free_mb
from .metrics import Metrics
from .redact import StoredHeaders, credential_headers
from .server import Server
from .store import Store
from .workers import Pool


def discover():
    """{SECTION: Handler class} for every module in handlers/ (modules starting with _ are skipped)."""
    import handlers
    found = {}
    for info in pkgutil.iter_modules(handlers.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module("handlers." + info.name)
        cls = getattr(mod, "Handler", None)
        if cls is None or not issubclass(cls, Integration) or not cls.SECTION:
            continue
        if cls.SECTION in found:
            raise SystemExit("handlers/%s.py: section %s is already taken" % (info.name, cls.SECTION))
        found[cls.SECTION] = cls
    return found


def handler_for(section, classes):
    if section in classes:
        return classes[section]
    for name, cls in classes.items():
        if name.endswith(":") and section.startswith(name) and len(section) > len(name):
            return cls
    return None


def job_idle_after(settings):
    """``job_idle_after`` in seconds, None for "off"; raises ConfigError when it is neither."""
    value = settings.get("job_idle_after").strip().lower()
    if value == "off":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is None or not seconds >= 0:
        raise config_mod.ConfigError("[hookd] job_idle_after must be off or a number of seconds, at least 0")
    return seconds


class Settling:
    """What a commit group's answers run in: their log lines written together (``logs.hold``), their
    requests counted with one lock (``Metrics.hold``). A plain object entered once a group, where three
    nested ``contextlib`` generators cost the writer ~10 µs a group to enter and ~12 to leave."""

    __slots__ = ("metrics",)

    def __init__(self, metrics):
        self.metrics = metrics

    def __enter__(self):
        logs.hold()
        self.metrics.hold()

    def __exit__(self, *exc):
        try:
            self.metrics.add_held()
        finally:
            logs.write_held()


class App:
    def __init__(self, path):
        self.path = path
        self.log = logs.setup("text")
        self.stopping = threading.Event()
        self.metrics = Metrics()
        self.store = None
        self.children = None  # the job processes' registry, once the store is open
        self.pool = None
        self.idle_after = None  # job_idle_after, once loaded
        self.server = self.admin_server = None
        self.alerts = None
        self.integrations = []
        self._routes = (None, {}, ())  # route_for's table, of the integrations it was made for
        self.problems, self.warnings = [], []
        self.classes = discover()
        self._signals = queue.SimpleQueue()
        self.load()

    # -- configuration ------------------------------------------------------------------------------
    def load(self):
        """(Re)read the configuration; sets settings, integrations, problems, warnings."""
        problems, warnings = [], []
        try:
            cfg = config_mod.load(self.path)
        except config_mod.ConfigError as e:
            self.problems, self.warnings = [str(e)], []
            return False
        warnings.extend(cfg.warnings)
        settings = config_mod.make_section("hookd", cfg.raw.get("hookd", {}), config_mod.HOOKD_KEYS, problems,
                                           warnings)
        integrations = []
        for name in cfg.section_names():
            cls = handler_for(name, self.classes)
            if cls is None:
                warnings.append("unknown section [%s] (ignored)" % name)
                continue
            keys = dict(config_mod.ACTION_KEYS)
            keys.update(cls.KEYS)
            conf = config_mod.make_section(name, cfg.raw[name], keys, problems, warnings)
            integ = cls(name, conf, Core(self, name))
            try:
                problems.extend("[%s] %s" % (name, p) for p in actions.check(conf))
                if conf.bool("remote") and not cls.RUNS_REMOTELY:
                    problems.append("[%s] remote = true is not possible: its jobs keep their state in this"
                                    " hookd's store" % name)
                problems.extend(integ.check())
            except config_mod.ConfigError as e:
                problems.append(str(e))
            integrations.append(integ)
        problems.extend(self._check_settings(settings))
        self.cfg, self.problems, self.warnings = cfg, problems, warnings
        if not problems:
            self.settings, self.integrations = settings, integrations
            self.proxies = clients.networks(settings.get("proxy.trusted"))
            self.state_dir = os.path.abspath(os.environ.get("STATE_DIRECTORY", "").split(":")[0]
                                             or settings.get("state_dir"))
            self.log = logs.setup(settings.get("log.format"))
            self.idle_after = job_idle_after(settings)  # applied by ``serve`` (a daemon, a worker), not by a CLI
        return not problems

    def _check_settings(self, s):
        out = []
        for key in ("workers", "max_body", "max_connections", "queue_limit", "retry.max_attempts",
                    "retention.days", "max_header_bytes", "max_connections_per_client"):
            try:
                if s.int(key) < 1:
                    out.append("[hookd] %s must be at least 1" % key)
            except config_mod.ConfigError as e:
                out.append(str(e))
        for key in ("read_timeout", "retry.base_delay", "retry.max_delay", "shutdown_grace", "write_timeout",
                    "min_free_mb"):
            try:
                if s.float(key) < 0:
                    out.append("[hookd] %s must not be negative" % key)
            except config_mod.ConfigError as e:
                out.append(str(e))
        try:
            job_idle_after(s)
        except config_mod.ConfigError as e:
            out.append(str(e))
        if s.get("log.format") not in ("text", "json"):
            out.append("[hookd] log.format must be text or json")
        if bool(s.get("tls.cert")) != bool(s.get("tls.key")):
            out.append("[hookd] tls.cert and tls.key go together")
        out.extend(admin.check(s))
        for key in ("alert.teams.url", "public_url"):
            parts = urllib.parse.urlsplit(s.get(key) or "")
            if s.get(key) and (parts.scheme not in ("http", "https") or not parts.hostname):
                out.append("[hookd] %s must be an http:// or https:// URL" % key)
        public = urllib.parse.urlsplit(s.get("public_url") or "")
        if public.query or public.fragment:
            out.append("[hookd] public_url is a base URL: no query or fragment")
        try:
            interval = s.float("subscriptions.check_interval")
            if interval != 0 and not interval >= subscriptions.MIN_INTERVAL:
                out.append("[hookd] subscriptions.check_interval must be 0 (off) or at least %g seconds"
                           % subscriptions.MIN_INTERVAL)
        except config_mod.ConfigError as e:
            out.append(str(e))
        try:
            shlex.split(s.get("alert.command") or "")
        except ValueError as e:
            out.append("[hookd] alert.command cannot be split into arguments: %s" % e)
        try:
            clients.networks(s.get("proxy.trusted"))
        except config_mod.ConfigError as e:
            out.append(str(e))
        return out

    def secrets(self):
        """Every configured secret value (to keep them out of stored headers)."""
        out = [self.settings.get("admin.token"), self.settings.get("alert.teams.url")]
        for integ in self.integrations:
            for key, value in integ.conf.items():
                if key in integ.SECRET_KEYS or "secret" in key or "token" in key or "password" in key:
                    out.extend(str(value).split())
        return [s for s in out if s and len(s) >= 4]

    # -- routing and intake -------------------------------------------------------------------------
    def route_for(self, path):
        """The first integration, in the configuration's order, whose ``match`` takes ``path``. The routes
        that are one path (``Integration.match``) are found in a table made once per configuration; an
        integration with a ``match`` of its own (a path pattern) is still asked when it comes first."""
        table = self._routes
        if table[0] is not self.integrations:
            table = self._route_table()
        at, integ = table[1].get(path, _NO_ROUTE)
        for n, pattern in table[2]:
            if n > at:
                break
            if pattern.match(path):
                return pattern
        return integ

    def _route_table(self):
        """(the integrations, {path: (position, integration)} of those matching one path, the others with
        their positions)."""
        integrations, paths, patterns = self.integrations, {}, []
        for n, integ in enumerate(integrations):
            if type(integ).match is Integration.match:
                paths.setdefault(integ.route, (n, integ))
            else:
                patterns.append((n, integ))
        self._routes = table = (integrations, paths, tuple(patterns))
        return table

    def integration(self, name):
        for integ in self.integrations:
            if integ.name == name:
                return integ
        return None

    def event_rows(self, integ, req, events):
        """Rows for the store from accept()'s NewEvents: dedupe key, stored headers, body, payload."""
        stored_headers, rule, done = self._secret_cache()[1][integ.name]
        headers = stored_headers.json(req.headers)
        content_type, body = req.headers.get("Content-Type"), req.body
        rows = []
        batch = False  # the first event's key stands for the delivery: the others carry none of their own
        for ev in events:
            if not isinstance(ev, NewEvent):
                ev = NewEvent(ev)
            batch = batch or ev.batch
            key = ev.dedupe_key if batch or ev.dedupe_key is not None else dedupe_key(rule, req)
            serial, element, payload = ev.serial_key, ev.element, ev.payload
            # _storable only for what is not None, an int or ASCII text (what rows hold): a call less a value
            rows.append({"dedupe_key": key if key is None or (key.__class__ is str and key.isascii())
                         else _storable(key),
                         "serial_key": serial if serial is None or (serial.__class__ is str and serial.isascii())
                         else _storable(serial),
                         "headers": headers, "content_type": content_type, "body": body,
                         "element": element if element is None or element.__class__ is int else _storable(element),
                         "payload": None if payload is None else json.dumps(payload),
                         "done": done, "batch": ev.batch})
        return rows

    def redact(self, text):
        """``text`` (a path no route matched, for a log line) with every configured secret masked: a
        near miss such as /ixon/webhook/KEY/x must not put the key in the log."""
        for secret in self._secret_cache()[0]:
            text = text.replace(secret, "***")
        return text

    def _secret_cache(self):
        """(every secret, {route: (its StoredHeaders, its dedupe rule, nothing to do)}), worked out once per
        configuration (a reload builds new integrations) instead of once per request."""
        cache = getattr(self, "_secrets", None)
        if cache is None or cache[0] is not self.integrations:
            secrets = self.secrets()
            facts = {i.name: (StoredHeaders(secrets, credential_headers(i.conf)),
                              i.conf.get("dedupe") or getattr(i, "DEFAULT_DEDUPE", "body"), not i.needs_work())
                     for i in self.integrations}
            cache = (self.integrations, secrets, facts)
            self._secrets = cache
        return cache[1], cache[2]

    def ready(self):
        """(status, reason) for /readyz: "unavailable" unless the database takes a write and the workers
        are alive; "degraded" when a folder files are written to has less than ``min_free_mb`` free.
        Degraded is still ready: intake goes on (only recordings and thumbnails wait for space), so a
        load balancer probing /readyz must keep sending webhooks to this instance."""
        try:
            self.store.write(lambda c: c.execute("CREATE TABLE IF NOT EXISTS hookd_ready(x)"))
        except Exception as e:
            return "unavailable", "database: %s" % e
        if not self.pool.healthy():
            return "unavailable", "workers stuck or dead"
        low = self.low_space()
        if low:
            return "degraded", low
        return "ok", "ok"

    def low_space(self):
        """Why files cannot be written now (less than min_free_mb free under state_dir or a folder an
        integration writes to), or None."""
        floor = self.settings.float("min_free_mb")
        folders = [self.state_dir] + [f.folder for integ in self.integrations for f in integ.files()]
        for folder in folders:
            free = free_mb(folder)
            if free < floor:
                return ("only %d MB free under %s (min_free_mb = %g): recordings and thumbnails wait for space;"
                        " webhooks are still accepted" % (free, folder, floor))
        return None

    # -- store and lifecycle ------------------------------------------------------------------------
    def open_store(self):
        os.makedirs(self.state_dir, exist_ok=True)
        self.store = Store(os.path.join(self.state_dir, "hookd.sqlite3"))
        self.children = Registry(self.store, self.log)
        self.store.on_dead = alerts.dead_hook(self)
        self._group_settling = Settling(self.metrics)
        self.store.settling = self._settling
        for sql in (alerts.SCHEMA, subscriptions.SCHEMA):
            self.store.write(lambda c, sql=sql: _executescript(c, sql))
        for integ in self.integrations:
            if integ.SCHEMA:
                self.store.write(lambda c, sql=integ.SCHEMA: _executescript(c, sql))
        return self.store

    def _settling(self):
        """What a commit group's answers run in (the store's ``settling``): a ``Settling``."""
        return self._group_settling

    def prune_daily(self):
        """The daily prune (the pool runs it on a thread of its own): old events, alerts, files. A
        shutdown stops it after the write it is on."""
        days = self.settings.float("retention.days")
        self.store.write(lambda c: alerts.prune(c, time.time() - days * 86400))
        n = self.store.prune(days, stopping=self.stopping)
        if n:
            self.log.info("pruned %d finished events older than %s days", n, self.settings.get("retention.days"))
        for line in self.prune_files():
            self.log.info("%s", line)

    def prune_files(self, now=None):
        """Delete the files integrations wrote (clips, thumbnails) older than their keep_days; one line
        per folder that lost any."""
        lines = []
        for integ in self.integrations:
            for files in integ.files():
                n = files.prune(now)
                if n:
                    lines.append("pruned %d %s%s older than %g days from %s" % (
                        n, files.noun, "" if n == 1 else "s", files.keep_days, files.folder))
        return lines

    def serve(self, host, port):
        """Run the daemon until SIGTERM/SIGINT; returns the exit code."""
        self._announce()
        self.open_store()
        for owner, n in sorted(self.children.kill_leftovers().items()):
            self.log.warning("killed %d processes of %s left running by an earlier run", n, owner)
        n = self.store.requeue_running()
        if n:
            self.log.warning("requeued %d events left running by an earlier stop", n)
        proc.idle_after(self.idle_after, self.log)
        self.pool = Pool(self, self.settings.int("workers"))
        # before any port listens: a signal from now on waits in the queue for the main loop (a SIGTERM
        # right after the first 202 drains like any other), never takes its default action
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda s, f: self._signals.put(s))  # no logging here, just queue it
        inherited = systemd_glue.inherited_socket()
        self.server = Server((host, port), self, sock=inherited)
        where = admin.listen_address(self.settings.get("admin.listen"))
        try:
            self.admin_server = where and Server(where, self, admin=True)
        except OSError as e:
            self.server.server_close()
            raise OSError(e.errno, "admin.listen %s: %s" % (self.settings.get("admin.listen"), e.strerror or e))
        scheme = self._wrap_tls()
        self.pool.start()
        self.pool.schedule_once()
        self.alerts = alerts.Sender(self)
        self.alerts.start()
        subscriptions.Watcher(self).start()
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                         name="hookd-http", daemon=True).start()
        h, p = self.server.server_address[:2]
        self.log.info("listening on %s://%s:%d (%d workers, state %s)", scheme, h, p,
                      self.settings.int("workers"), self.state_dir)
        self._serve_admin(scheme)
        systemd_glue.ready(self)
        return self._main_loop()

    def _serve_admin(self, scheme):
        """The admin API's own listener, bound by hookd itself, also under socket activation."""
        if self.admin_server is None:
            self.log.info("admin API off (admin.listen is empty)")
            return
        threading.Thread(target=self.admin_server.serve_forever, kwargs={"poll_interval": 0.2},
                         name="hookd-admin", daemon=True).start()
        if self.admin_server.address_family == socket.AF_UNIX:
            self.log.info("admin API listening on unix:%s", self.admin_server.server_address)
        else:
            self.log.info("admin API listening on %s://%s:%d", scheme, *self.admin_server.server_address[:2])

    def _announce(self):
        for w in self.warnings:
            self.log.warning("config: %s", w)
        if self.path is None or not os.path.exists(self.path):
            self.log.warning("no configuration file (%s): every integration is disabled",
                             self.path or "credentials.properties")
        elif not self.integrations:
            self.log.warning("no integration configured in %s: every route answers 404", self.path)

    def _wrap_tls(self):
        """With tls.cert and tls.key: HTTPS on the webhook port and on a TCP admin listener (remote workers
        reach the lease API from other hosts); a unix-socket admin listener stays plain. Returns the scheme."""
        cert, key = self.settings.get("tls.cert"), self.settings.get("tls.key")
        if not cert:
            return "http"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        for server in (self.server, self.admin_server):
            if server is not None and server.address_family != socket.AF_UNIX:
                server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        return "https"

    def _main_loop(self):
        while True:
            try:
                sig = self._signals.get(timeout=systemd_glue.tick_interval())
            except queue.Empty:
                systemd_glue.tick(self)
                continue
            if sig == signal.SIGHUP:
                self.reload()
                continue
            return self.shutdown(signal.Signals(sig).name)

    def reload(self):
        old = self.integrations
        if self.load():
            for integ in self.integrations:
                if integ.SCHEMA:
                    self.store.write(lambda c, sql=integ.SCHEMA: _executescript(c, sql))
            proc.idle_after(self.idle_after, self.log)
            for w in self.warnings:
                self.log.warning("config: %s", w)
            self.log.info("configuration reloaded: %d integrations (workers, state_dir and the address"
                          " change only on restart)", len(self.integrations))
        else:
            self.integrations = old
            for p in self.problems:
                self.log.error("reload refused: %s", p)

    def shutdown(self, why):
        grace = self.settings.float("shutdown_grace")
        self.log.info("%s: stopping intake, letting running jobs finish (up to %.0fs)", why, grace)
        systemd_glue.stopping()
        servers = [s for s in (self.server, self.admin_server) if s is not None]
        for server in servers:  # the listening sockets first: a client arriving now is refused, never reset
            server.stopping = True
            server.shutdown()
            server.stop_listening()
            server.reaper.fire_idle()
        self.stopping.set()
        left = self.pool.join(grace)
        killed = self.children.kill_all()
        if killed:
            self.log.warning("killed the processes of %s after shutdown_grace",
                             ", ".join(killed))
            self.pool.join(5)  # let their workers record the outcome before the store closes
        for server in servers:
            server.server_close()
        if left:
            self.log.warning("%d jobs still running after shutdown_grace; they run again after restart", left)
        self.store.close()
        self.log.info("stopped")
        return 0


_NO_ROUTE = (float("inf"), None)


def _storable(key):
    """A key sqlite can bind: JSON may carry a lone surrogate ("\\ud800"), which no UTF-8 text holds, so
    such a key is kept as its JSON text instead (the same again for a redelivery). Anything else as is."""
    if not isinstance(key, str) or key.isascii():
        return key
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(key)
    return key


def _executescript(conn, sql):
    """Run each statement of a handler's SCHEMA inside the writer's open transaction."""
    for stmt in sql.split(";"):
        if stmt.strip():
            conn.execute(stmt)

