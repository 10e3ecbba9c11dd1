"""The HTTP side: a ThreadingHTTPServer that reads, verifies, commits, and only then answers.

Strategy: ``Server`` bounds concurrent connections (503 beyond ``max_connections``, written by the
accepting thread without starting a handler) and owns a ``Reaper`` that enforces ``read_timeout`` as a
whole-request deadline: when it passes, the socket's read side is shut, the blocked read returns, and
the handler answers 408 (or closes quietly if the client had sent nothing). ``Handler`` speaks HTTP/1.1
keep-alive; every answer has Content-Length. A POST goes: route lookup (404 before any ``100 Continue``)
-> framing -> body -> ``integration.accept`` (verify over the raw bytes, parse) -> queue limit ->
``store.add_events`` (group commit) -> 202 -> the ids go to the worker queue. Every refusal is a
``Reject`` carrying its status, answered with one WARNING line; anything else is a 500 with a traceback.
"""

import email.utils
import http.server
import json
import re
import socket
import threading
import time
import urllib.parse

from . import framing
from .api import Busy, Headers, NotFound, Reject, Request, Response, json_or_none
from .store import StoreError, list_events, row_dict
from .workers import iso

SENSITIVE = ("authorization", "cookie", "signature", "secret", "token", "hmac", "api-key", "apikey", "password")
_SENSITIVE = re.compile("|".join(SENSITIVE))


class Reaper:
    """One thread that shuts the read side of sockets whose request deadline has passed.

    Each connection has one entry, [deadline, socket, armed, fired, between], re-armed for every
    request. Ten times a second the thread looks at every open connection (at most max_connections),
    so the request path only writes three fields, and nothing piles up between scans."""

    RESOLUTION = 0.1  # seconds; read_timeout is enforced to within this

    def __init__(self):
        self._entries, self._lock = {}, threading.Lock()  # id(entry) -> entry
        threading.Thread(target=self._run, name="hookd-reaper", daemon=True).start()

    def register(self, sock):
        entry = [0.0, sock, False, False, False]
        with self._lock:
            self._entries[id(entry)] = entry
        return entry

    def unregister(self, entry):
        entry[2] = False
        with self._lock:
            self._entries.pop(id(entry), None)

    @staticmethod
    def arm(entry, seconds, between=False):
        """Watch the entry's socket for ``seconds``. ``between``: the connection is idle between two
        requests (a keep-alive wait), which shutdown may cut at once; a first request gets its time."""
        entry[0] = time.monotonic() + seconds
        entry[3], entry[4] = False, between
        entry[2] = True  # armed last: the scan never sees an armed entry with an old deadline

    @staticmethod
    def disarm(entry):
        entry[2] = False

    def _snapshot(self):
        with self._lock:
            return list(self._entries.values())

    def fire_idle(self):
        """Shut every connection waiting between requests now (at shutdown). A connection accepted but
        not yet heard from keeps its deadline: its first request is served, then it is closed."""
        for e in self._snapshot():
            if e[2] and e[4]:
                _shut(e)

    def _run(self):
        while True:
            time.sleep(self.RESOLUTION)
            now = time.monotonic()
            for e in self._snapshot():
                if e[2] and e[0] <= now:
                    _shut(e)


def _shut(entry):
    entry[3] = True
    try:
        entry[1].shutdown(socket.SHUT_RD)
    except OSError:
        pass


class Server(http.server.ThreadingHTTPServer):
    """Bounded, drainable: non-daemon request threads, so ``server_close`` waits for them."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, app, sock=None):
        self.app = app
        self.reaper = Reaper()
        self._conn_lock = threading.Lock()
        self.connections = 0
        self.stopping = False
        if sock is None:
            super().__init__(address, Handler)
        else:  # socket activation: the listening socket is inherited, already bound
            super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
            self.socket = sock
            self.server_address = sock.getsockname()[:2]

    def process_request(self, request, client_address):
        with self._conn_lock:
            full = self.connections >= self.app.settings.int("max_connections")
            if not full:
                self.connections += 1
        if full:
            self.app.log.warning("503 too many connections (max_connections=%d), refused %s",
                                 self.app.settings.int("max_connections"), client_address[0])
            self.app.metrics.request("-", 503)
            _refuse(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self):
        with self._conn_lock:
            self.connections -= 1

    def handle_error(self, request, client_address):
        self.app.log.exception("unexpected error on a connection from %s", client_address[0])


def _refuse(sock):
    body = b'{"error": "too many connections"}'
    msg = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        sock.setblocking(False)
        sock.send(msg)
    except OSError:
        pass


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hookd"
    sys_version = ""

    def setup(self):
        super().setup()
        self._deadline = self.server.reaper.register(self.connection)
        # No socket timeout: a timeout makes every recv a poll() plus a recv. The Reaper enforces
        # read_timeout instead, and answers are small enough never to block in send.
        try:  # answers are written whole; never hold a segment back waiting for an ACK
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    # -- one request, with its deadline -------------------------------------------------------------
    def handle_one_request(self):
        app = self.server.app
        self._served = getattr(self, "_served", 0)
        self.server.reaper.arm(self._deadline, app.settings.float("read_timeout"), between=self._served > 0)
        self._served += 1
        self._route = "-"
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except OSError:
            self.close_connection = True
            return
        if not self.raw_requestline:
            self.close_connection = True
            self.server.reaper.disarm(self._deadline)
            return
        try:
            if len(self.raw_requestline) > 65536:
                self.requestline, self.request_version, self.command = "", "", ""
                self.send_error(414)
                return
            if not self.parse_request():
                return
            if self.request_version not in ("HTTP/1.0", "HTTP/1.1"):
                self.send_error(505, "HTTP version %s not supported" % self.request_version[:20])
                return
            bad = header_problem(self.headers)
            if bad:
                self.send_error(400, bad)
                return
            self.hdrs = Headers(self.headers.raw_items())
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self._reply(405, {"error": "method not allowed"}, [("Allow", "GET, POST")])
                return
            method()
            self.wfile.flush()
        except (socket.timeout, ConnectionError, framing.ClientGone) as e:
            self._client_gone(e)
        finally:
            self.server.reaper.disarm(self._deadline)

    def finish(self):
        """After an error answer that closes the connection, drain what the client still sends for a
        moment, so the kernel does not reset the connection and destroy the answer before it is read."""
        self.server.reaper.unregister(self._deadline)
        try:
            super().finish()
            if self.close_connection and getattr(self, "_linger", False):
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(0.5)
                for _ in range(64):
                    if not self.connection.recv(65536):
                        break
        except OSError:
            pass

    def _client_gone(self, exc):
        self.close_connection = True
        if self._deadline[3]:
            self.server.app.log.warning("408 %s %s: request not received within read_timeout", self.command,
                                        self._log_path())
            self.server.app.metrics.request(self._route, 408)
            self._reply(408, {"error": "request not received within read_timeout"}, close=True)
        else:
            self.server.app.log.warning("client %s went away mid-request: %s", self.client_address[0], exc)

    def handle_expect_100(self):
        """Answer 100 Continue only for a route that exists and a size that fits."""
        path = urllib.parse.urlsplit(self.path).path
        integ = self.server.app.route_for(path)
        if header_problem(self.headers):
            return True  # no 100; handle_one_request refuses the head next
        if self.command != "POST" or integ is None:
            self._reject(NotFound("no route for %s" % path), close=True)
            return False
        try:
            framing.body_framing(self.headers, self.request_version, self.server.app.settings.int("max_body"))
        except Reject as e:
            self._reject(e, close=True)
            return False
        return super().handle_expect_100()

    # -- methods ------------------------------------------------------------------------------------
    def do_POST(self):
        app = self.server.app
        parts = urllib.parse.urlsplit(self.path)
        integ = app.route_for(parts.path)
        try:
            if integ is None:
                raise NotFound("no route for %s" % parts.path[:200])
            self._route = integ.name
            body = self._read_body()
            if self._deadline[3]:
                raise framing.ClientGone("deadline passed")
            self.server.reaper.disarm(self._deadline)
            req = Request("POST", parts.path, urllib.parse.parse_qs(parts.query), self.hdrs, body,
                          self.client_address[0])
            self._accept(integ, req)
        except Reject as e:
            self._reject(e, close=isinstance(e, (framing.BadFraming, framing.UnsupportedCoding,
                                                 framing.BodyTooLarge, framing.LengthRequired)))
        except StoreError as e:
            app.log.error("503 %s: %s", self._route, e)
            app.metrics.request(self._route, 503)
            self._reply(503, {"error": "storage unavailable"}, [("Retry-After", "5")])
        except (framing.ClientGone, socket.timeout, ConnectionError):
            raise
        except Exception:
            app.log.exception("500 %s: fault inside hookd", self._route)
            app.metrics.request(self._route, 500)
            self._reply(500, {"error": "internal error"}, close=True)

    def _read_body(self):
        max_body = self.server.app.settings.int("max_body")
        kind, length = framing.body_framing(self.hdrs, self.request_version, max_body)
        return framing.read_body(self.rfile, kind, length, max_body)

    def _accept(self, integ, req):
        app = self.server.app
        result = integ.accept(req)
        if isinstance(result, Response):
            app.log.info("%d %s answered without storing", result.status, integ.name)
            app.metrics.request(integ.name, result.status)
            return self._send(result.status, result.body, result.content_type, result.headers)
        if app.store.waiting() >= app.settings.int("queue_limit"):
            raise Busy("queue_limit %d reached" % app.settings.int("queue_limit"))
        rows = app.event_rows(integ, req, result)
        stored = app.store.add_events(integ.name, rows, limit=integ.queue_size)
        fresh = [(i, r) for (i, status), r in zip(stored, rows) if status == "new"]
        for event_id, row in fresh:
            if not row.get("done"):
                app.pool.submit(event_id, integ.name, row.get("serial_key"))
        ids = [i for i, _ in stored]
        if fresh:
            app.log.info("202 %s stored event %s", integ.name, ",".join(str(i) for i, _ in fresh),
                         extra={"event": fresh[0][0]})
            app.metrics.request(integ.name, 202)
            return self._send(202, b'{"id": %d, "ids": [%s], "status": "queued"}' % (
                ids[0], ", ".join(str(i) for i in ids).encode()), "application/json")
        app.log.info("200 %s duplicate of event %s", integ.name, ids[0] if ids else "-")
        app.metrics.request(integ.name, 200)
        return self._reply(200, {"id": ids[0] if ids else None, "ids": ids, "status": "duplicate"})

    def do_GET(self):
        app = self.server.app
        parts = urllib.parse.urlsplit(self.path)
        try:
            integ = app.route_for(parts.path)
            if integ is not None:
                self._route = integ.name
                req = Request("GET", parts.path, urllib.parse.parse_qs(parts.query), self.hdrs, b"",
                              self.client_address[0])
                r = integ.get(req)
                app.metrics.request(integ.name, r.status)
                return self._send(r.status, r.body, r.content_type, r.headers)
            return self._admin(parts)
        except Reject as e:
            self._reject(e)
        except Exception:
            app.log.exception("500 GET %s: fault inside hookd", self._log_path())
            self._reply(500, {"error": "internal error"}, close=True)

    def do_HEAD(self):
        self._reply(405, {"error": "method not allowed"}, [("Allow", "GET, POST")])

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD

    # -- admin API ----------------------------------------------------------------------------------
    def _admin(self, parts):
        app = self.server.app
        req = Request("GET", parts.path, urllib.parse.parse_qs(parts.query), self.hdrs, b"",
                      self.client_address[0])
        if not app.admin_allowed(req):
            raise Reject("admin API needs loopback or the admin token", status=401)
        path = parts.path
        if path == "/healthz":
            return self._reply(200, {"status": "ok"})
        if path == "/readyz":
            ok, why = app.ready()
            return self._reply(200 if ok else 503, {"status": "ok" if ok else "unavailable", "reason": why})
        if path == "/metrics":
            text = app.metrics.render(app.store).encode()
            return self._send(200, text, "text/plain; version=0.0.4")
        if path == "/events":
            q = lambda k: req.query1(k) or None  # noqa: E731
            limit = int(q("limit") or 100)
            rows = app.store.read(lambda c: list_events(c, q("status"), q("route"), limit))
            return self._reply(200, [public_event(r) for r in rows])
        if path.startswith("/events/") and path[8:].isdigit():
            row = app.store.read(lambda c: row_dict(c, int(path[8:]), with_body=True))
            if row is None:
                raise NotFound("no event %s" % path[8:])
            return self._reply(200, public_event(row, full=True))
        for integ in app.integrations:
            r = integ.admin_get(req)
            if r is not None:
                return self._send(r.status, r.body, r.content_type, r.headers)
        raise NotFound("no route for %s" % path[:200])

    # -- answering ----------------------------------------------------------------------------------
    def _reject(self, e, close=False):
        app = self.server.app
        if self._deadline[3]:  # the head was cut short by read_timeout: whatever it lacks, that is why
            e = Reject("request not received within read_timeout", status=408)
        app.log.warning("%d %s %s: %s", e.status, self._route, self._log_path(), e)
        app.metrics.request(self._route, e.status)
        self._reply(e.status, {"error": str(e)}, e.headers, close=close or e.status == 408)

    def _log_path(self):
        """The path for a log line. A matched route may carry a secret in its path (Camio's key), so
        only unmatched paths are logged as sent (cut to 200 characters)."""
        if self._route != "-":
            integ = self.server.app.integration(self._route)
            return integ.route if integ is not None and integ.route else "(%s route)" % self._route
        return urllib.parse.urlsplit(self.path).path[:200]

    def _reply(self, status, obj, headers=(), close=False):
        if status >= 400 and (close or self.close_connection):
            self._linger = True
        self._send(status, json.dumps(obj).encode(), "application/json", headers, close)

    def _send(self, status, body, content_type, headers=(), close=False):
        """Write the whole answer with one send: a head and a body in two small segments would meet
        Nagle's algorithm and the client's delayed ACK, and every keep-alive answer would wait ~40 ms."""
        if close or self.server.stopping:
            self.close_connection = True
        head = ["HTTP/1.1 %d %s" % (status, self.responses.get(status, ("",))[0]), "Server: hookd",
                "Date: " + _http_date(), "Content-Type: " + content_type, "Content-Length: %d" % len(body)]
        head.extend("%s: %s" % (k, v) for k, v in headers)
        if self.close_connection:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(data + body if self.command != "HEAD" else data)

    def send_error(self, code, message=None, explain=None):
        """Errors found by the stdlib parser (bad request line, too many headers): JSON, one log line.
        A request cut short by the read_timeout deadline is a 408, whatever the parser made of it."""
        if getattr(self, "_deadline", None) and self._deadline[3]:
            code, message = 408, "request not received within read_timeout"
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.1"  # the stdlib would send a bare body; hookd speaks no 0.9
        self.server.app.log.warning("%d malformed request from %s: %s", code, self.client_address[0],
                                    message or "")
        self.server.app.metrics.request("-", code)
        self.close_connection = True
        self._reply(code, {"error": message or "bad request"}, close=True)

    def log_message(self, fmt, *args):
        pass  # hookd writes its own line per outcome


_DATE = [0, ""]


def _http_date():
    """The Date header value, formatted once per second."""
    now = int(time.time())
    if _DATE[0] != now:
        _DATE[1] = email.utils.formatdate(now, usegmt=True)
        _DATE[0] = now
    return _DATE[1]


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_problem(headers):
    """Why a parsed head must be refused, or None. RFC 9112 §5.1: no whitespace between a field name and
    its colon (a classic smuggling vector: "Transfer-Encoding : chunked" read by one parser and not
    another); names are tokens; §5.2: obs-fold is refused; a line without a colon ends the stdlib's
    header parsing early, leaving the rest unseen, so it is refused too."""
    if headers.defects or headers.get_payload():
        return "malformed header line"
    for name, value in headers.raw_items():
        if not _TOKEN.fullmatch(name):
            return "invalid header name %r" % name[:40]
        if "\r" in value or "\n" in value or "\0" in value:
            return "folded or control characters in header %s" % name[:40]
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
        out["payload"] = json.loads(row["payload"]) if row.get("payload") else json_or_none(body)
        try:
            out["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            import base64
            out["body_base64"] = base64.b64encode(body).decode()
    return out


def stored_headers(headers, secrets):
    """Headers worth keeping (lower-case names), without credentials, signatures or secret values."""
    out = {}
    for name, value in headers.items():
        low = name.lower()
        if _SENSITIVE.search(low) or (secrets and any(sec in value for sec in secrets)):
            continue
        out[low] = value
    return out
