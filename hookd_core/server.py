"""The HTTP side: a ThreadingHTTPServer that reads, verifies, commits, and only then answers.

Strategy: ``Server`` bounds concurrent connections (503 beyond ``max_connections`` in all, or beyond
``max_connections_per_client`` from one address, written by the accepting thread without starting a
handler; proxies in ``proxy.trusted`` are exempt, and the client they forward for is counted per request
instead) and owns a ``Reaper`` that enforces ``read_timeout`` as a whole-request deadline: when it
passes, the socket's read side is shut, the blocked read returns, and the handler answers 408 (or closes
quietly if the client had sent nothing). The same Reaper bounds the handler's answers by
``write_timeout`` (a client that does not read is cut, both directions shut, and dropped); the writer
thread's answers have the same deadline. On SIGTERM ``stop_listening`` serves what is already queued on
the listening socket and closes it, so a later client is refused rather than reset after sending (under
socket activation systemd keeps the socket and its queue). ``Handler`` reads each request with
``framing.Reader`` (hookd's own strict HTTP/1.1 parser) and speaks keep-alive; every answer has
Content-Length, and an answer given while a body is still unread closes the connection. The same
classes serve two listeners: the webhook port (webhook routes, /healthz, /readyz) and the admin listener
(``admin.dispatch``). A webhook POST goes: route lookup (404 before any ``100 Continue``) -> framing ->
body -> ``integration.accept`` (verify over the raw bytes, parse) -> queue limit ->
``store.submit_events`` (group commit) -> the writer thread, right after the COMMIT, puts the ids on
the worker queue and sends the 202 itself (``Answer``), while the connection's thread goes back to
reading; answers on one connection never overtake each other (TLS connections answer from their own
thread). Every refusal is a ``Reject`` carrying its status, answered with one WARNING line; anything
else is a 500 with a traceback.
"""

import array
import email.utils
import http
import http.server
import json
import os
import select
import socket
import socketserver
import stat
import ssl
import struct
import threading
import time
import urllib.parse

from . import admin, clients, framing, logs
from .api import Busy, NotFound, Reject, Response
from .store import StoreError, set_policy

_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


class Reaper:
    """One thread that shuts the read side of sockets whose request deadline has passed.

    Each connection has one entry, [deadline, socket, armed, fired, between, writing], re-armed for
    every request and every answer (``writing``: the deadline is write_timeout, and firing shuts both
    directions, which ends a send blocked on a client that does not read). Ten times a second the
    thread looks at every open connection (at most max_connections), so the request path only writes
    three fields, and nothing piles up between scans."""

    RESOLUTION = 0.1  # seconds; read_timeout is enforced to within this

    def __init__(self):
        self._entries, self._lock = {}, threading.Lock()  # id(entry) -> entry
        threading.Thread(target=self._run, name="hookd-reaper", daemon=True).start()

    def register(self, sock):
        entry = [0.0, sock, False, False, False, False]
        with self._lock:
            self._entries[id(entry)] = entry
        return entry

    def unregister(self, entry):
        entry[2] = False
        with self._lock:
            self._entries.pop(id(entry), None)

    @staticmethod
    def arm(entry, seconds, between=False, writing=False):
        """Watch the entry's socket for ``seconds``. ``between``: the connection is idle between two
        requests (a keep-alive wait), which shutdown may cut at once; a first request gets its time.
        ``writing``: an answer is being sent."""
        entry[0] = time.monotonic() + seconds
        entry[3], entry[4], entry[5] = False, between, writing
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
        entry[1].shutdown(socket.SHUT_RDWR if entry[5] else socket.SHUT_RD)
    except OSError:
        pass


class Server(http.server.ThreadingHTTPServer):
    """Bounded, drainable: non-daemon request threads, so ``server_close`` waits for them. ``admin``:
    this is the admin listener (requests go to ``admin.dispatch``). ``address`` is (host, port), or a
    path for a unix socket (created mode 0600)."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128
    bound_path = None  # the unix socket file this server created (removed by server_close)

    def __init__(self, address, app, sock=None, admin=False):
        self.app, self.admin, self.inherited = app, admin, sock is not None
        self.reaper = Reaper()
        self._conn_lock = threading.Lock()
        self.connections = 0
        self._per_client, self._counted = {}, {}  # address -> open connections; id(socket) -> address
        self._told = {}  # address -> when its last 503 was logged
        self.stopping = False
        if isinstance(address, str):
            self.address_family = socket.AF_UNIX
        if sock is None:
            super().__init__(address, Handler)
        else:  # socket activation: the listening socket is inherited, already bound
            super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
            self.socket = sock
            self.server_address = sock.getsockname()[:2]

    def server_bind(self):
        if self.address_family != socket.AF_UNIX:
            return super().server_bind()
        _remove_stale_socket(self.server_address)
        old = os.umask(0o177)  # the socket file is born 0600: no moment when others may connect
        try:
            socketserver.TCPServer.server_bind(self)
        finally:
            os.umask(old)
        self.bound_path = self.server_address  # this socket file is ours to remove
        os.chmod(self.server_address, 0o600)

    def get_request(self):
        sock, addr = self.socket.accept()
        return sock, (addr if self.address_family != socket.AF_UNIX else ("unix", 0))

    def server_close(self):
        super().server_close()
        if self.bound_path:
            try:
                os.unlink(self.bound_path)
            except OSError:
                pass

    def process_request(self, request, client_address):
        peer, settings = client_address[0], self.app.settings
        counted = None if clients.trusted(peer, self.app.proxies) else peer
        with self._conn_lock:
            full = self.connections >= settings.int("max_connections")
            crowded = counted is not None and \
                self._per_client.get(counted, 0) >= settings.int("max_connections_per_client")
            if not (full or crowded):
                self.connections += 1
                if counted is not None:
                    self._per_client[counted] = self._per_client.get(counted, 0) + 1
                    self._counted[id(request)] = counted
        if full or crowded:
            if full:
                self.app.log.warning("503 too many connections (max_connections=%d), refused %s",
                                     settings.int("max_connections"), peer)
            else:
                self.tell_crowded(peer)
            self.app.metrics.request("-", 503)
            _refuse(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._release(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request):
        with self._conn_lock:
            self.connections -= 1
            self._leave(self._counted.pop(id(request), None))

    def enter(self, client):
        """Count one request of ``client`` (forwarded by a trusted proxy); False when it has its
        max_connections_per_client already (then nothing is counted)."""
        with self._conn_lock:
            if self._per_client.get(client, 0) >= self.app.settings.int("max_connections_per_client"):
                return False
            self._per_client[client] = self._per_client.get(client, 0) + 1
            return True

    def leave(self, client):
        with self._conn_lock:
            self._leave(client)

    def _leave(self, client):
        if client is not None:
            n = self._per_client.pop(client) - 1
            if n:
                self._per_client[client] = n

    def tell_crowded(self, client):
        """One log line per client and second at most, however many connections it tries."""
        now = time.monotonic()
        with self._conn_lock:
            if now - self._told.get(client, -1.0) < 1.0:
                return
            if len(self._told) > 4096:  # forget clients not refused within the last second
                self._told = {c: t for c, t in self._told.items() if now - t < 1.0}
            self._told[client] = now
        self.app.log.warning("503 too many connections from %s (max_connections_per_client=%d)", client,
                             self.app.settings.int("max_connections_per_client"))

    def stop_listening(self):
        """At shutdown, after serve_forever returned: stop taking connections without resetting any.
        A TCP listener cannot stop at once (the kernel completes handshakes into its queue until it is
        closed, and closing it resets what is queued), so: new connection attempts (a SYN) are dropped
        by a socket filter, handshakes already under way finish, what is queued is served (one answer
        each, with Connection: close), and then the socket is closed; a client whose SYN was dropped
        retries and is refused. Under socket activation the socket stays open: systemd keeps it, and
        what queues there is served by the next start."""
        if self.inherited:
            return
        tcp = self.address_family != socket.AF_UNIX and _drop_new_connections(self.socket)
        self.socket.setblocking(False)
        for wait in ((HANDSHAKE_GRACE, 0.0) if tcp else (0.0,)):
            time.sleep(wait)
            while True:
                try:
                    request, client_address = self.get_request()
                except OSError:
                    break
                request.setblocking(True)
                self.process_request(request, client_address)
        self.socket.close()

    def handle_error(self, request, client_address):
        self.app.log.exception("unexpected error on a connection from %s", client_address[0])


HANDSHAKE_GRACE = 0.25  # seconds for handshakes under way at SIGTERM to complete (a client's round trip)
SO_ATTACH_FILTER = 26    # <asm-generic/socket.h>
# A classic BPF socket filter: drop TCP segments with SYN set and ACK clear (new connection attempts),
# keep everything else. It runs on the TCP header (skb->data), so byte 13 holds the flags.
_SYN_DROP = [(0x30, 0, 0, 13),          # ldb [13]
             (0x54, 0, 0, 0x12),        # and #SYN|ACK
             (0x15, 0, 1, 0x02),        # jeq #SYN, drop, keep
             (0x06, 0, 0, 0),           # drop: ret #0
             (0x06, 0, 0, 0xFFFFFFFF)]  # keep: ret #-1


def _drop_new_connections(sock):
    """Attach _SYN_DROP to a listening TCP socket; False when the kernel refuses it."""
    prog = array.array("B", b"".join(struct.pack("HBBI", *op) for op in _SYN_DROP))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HP", len(_SYN_DROP),
                                                                          prog.buffer_info()[0]))
    except OSError:
        return False
    return True


def _remove_stale_socket(path):
    """A unix socket file left by a killed hookd is removed; a live one (someone answers) is an error, and
    so is anything that is not a socket (admin.listen never deletes a file)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(17, "%s exists and is not a socket" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(98, "another process listens on %s" % path)


def _refuse(sock):
    body = b'{"error": "too many connections"}'
    msg = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        sock.setblocking(False)
        sock.send(msg)
    except OSError:
        pass


class Handler(socketserver.StreamRequestHandler):
    """One connection: requests in order, each read by ``framing.Reader`` within its deadline."""

    def setup(self):
        super().setup()
        self.app = self.server.app
        if not self.server.admin and hasattr(os, "SCHED_BATCH"):
            # A webhook connection's thread, woken by its client's next request, waits for the core
            # instead of preempting the thread that has it (SCHED_BATCH: the same share of the CPU, no
            # wake-up preemption). Under load that thread is mostly the store's writer answering a group:
            # each answer it sends brings that client's next request at once, and a connection thread
            # that preempted it would only find the GIL held and sleep again (docs/performance.md,
            # "Connection threads that wait their turn"). Where the call is refused (a seccomp filter;
            # the shipped unit allows it since job_idle_after) the thread stays as it was.
            set_policy(os.SCHED_BATCH)
        self._deadline = self.server.reaper.register(self.connection)
        # No socket timeout: a timeout makes every recv a poll() plus a recv. The Reaper enforces
        # read_timeout and write_timeout instead.
        try:  # answers are written whole; never hold a segment back waiting for an ACK
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.reader = framing.Reader(self.connection.recv_into, self.app.settings.int("max_header_bytes"), self._continue)
        self.peer = self.client = self.client_address[0]
        self.close_connection = self._linger = False
        self.req, self._route = None, "-"  # the request being served (an api.Request, from its head on)
        self._answer = None  # an Answer the writer thread still owes this connection
        self._tls = isinstance(self.connection, ssl.SSLSocket)
        self._settings = None  # the configuration the limits below were read from

    def handle(self):
        served = 0
        while not self.close_connection:
            if self.app.settings is not self._settings:
                self._configure()
            self.server.reaper.arm(self._deadline, self._read_timeout, served > 0)
            try:
                self.handle_one_request()
            except (ConnectionError, framing.ClientGone) as e:
                self._client_gone(e)
            finally:
                self.server.reaper.disarm(self._deadline)
            served += 1

    def _configure(self):
        """Read the limits a request is held to from the configuration in force, once per configuration
        (a reload replaces app.settings): before waiting for a head (read_timeout), and again once it
        came, so a connection kept open across a reload holds its next request to the new limits."""
        settings = self._settings = self.app.settings
        self._read_timeout, self._max_body, self._queue_limit = \
            settings.float("read_timeout"), settings.int("max_body"), settings.int("queue_limit")

    def handle_one_request(self):
        self.req, self._route = None, "-"
        try:
            self.req = self.reader.head()
        except Reject as e:
            return self._reject(e, close=True)
        if self.req is None:
            self.close_connection = True
            return
        if self.app.settings is not self._settings:
            self._configure()
        self.client = clients.client_address(self.peer, self.req.headers, self.app.proxies) if self.app.proxies \
            else self.peer
        if self.client == self.peer:
            return self._respond()
        if not self.server.enter(self.client):  # a client behind a trusted proxy, over its limit
            self.server.tell_crowded(self.client)
            self.app.metrics.request("-", 503)
            return self._reply(503, {"error": "too many connections"}, [("Retry-After", "1")], close=True)
        try:
            self._respond()
        finally:
            self.server.leave(self.client)

    def _respond(self):
        try:
            if self.server.admin:
                r = self._admin(self.req)
            else:
                r = self._webhook(self.req)
            if r is not None:  # None: the writer thread answers after the commit
                self._send(r.status, r.body, r.content_type, r.headers)
        except Reject as e:
            self._reject(e)
        except StoreError as e:
            self.app.log.error("503 %s: %s", self._route, e)
            self.app.metrics.request(self._route, 503)
            self._reply(503, {"error": "storage unavailable"}, [("Retry-After", "5")])
        except (framing.ClientGone, ConnectionError):
            raise
        except Exception:
            self.app.log.exception("500 %s %s: fault inside hookd", self._route, self._log_path())
            self.app.metrics.request(self._route, 500)
            self._reply(500, {"error": "internal error"}, close=True)

    def finish(self):
        """After an error answer that closes the connection, drain what the client still sends for a
        moment, so the kernel does not reset the connection and destroy the answer before it is read."""
        self.server.reaper.unregister(self._deadline)
        self._settle()
        try:
            super().finish()
            if self._linger:
                self.connection.shutdown(socket.SHUT_WR)
                until = time.monotonic() + 1.0
                while time.monotonic() < until:
                    self.connection.settimeout(max(0.01, until - time.monotonic()))
                    if not self.connection.recv(65536):
                        break
        except OSError:
            pass

    def _client_gone(self, exc):
        self.close_connection = True
        if self._deadline[3] and self._deadline[5]:
            self.app.log.warning("dropped %s: it did not read its answer within write_timeout (%ss)",
                                 self.client, self.app.settings.get("write_timeout"))
        elif self._deadline[3]:
            try:
                self._reject(Reject("request not received within read_timeout", status=408), close=True)
            except OSError:
                pass  # gone for good
        else:
            self.app.log.warning("client %s went away mid-request: %s", self.client, exc)

    def _continue(self):
        self._settle()
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _read_body(self, unframed_ok=False):
        body = self.reader.body(self._max_body, unframed_ok)
        if self._deadline[3]:
            raise framing.ClientGone("deadline passed")
        self.server.reaper.disarm(self._deadline)
        return body

    # -- the webhook port ---------------------------------------------------------------------------
    def _webhook(self, req):
        app = self.app
        integ = app.route_for(req.path)
        if integ is not None:
            self._route = integ.name
        if req.method == "POST":
            if integ is None:
                raise NotFound("no route for %s" % app.redact(req.path[:200]))
            req.query, req.client = _query(req.query_string), self.client
            req.body = self._read_body(integ.bodiless_post)
            return self._accept(integ, req)
        if req.method != "GET":
            raise Reject("method not allowed", status=405, headers=[("Allow", "GET, POST")])
        if integ is not None:
            req.query, req.body, req.client = _query(req.query_string), b"", self.client
            r = integ.get(req)
            app.metrics.request(integ.name, r.status)
            return r
        if req.path == "/healthz":
            return Response(200, {"status": "ok"})
        if req.path == "/readyz":
            return admin.readyz(app)
        raise NotFound("no route for %s" % app.redact(req.path[:200]))

    def _accept(self, integ, req):
        app = self.app
        result = integ.accept(req)
        if isinstance(result, Response):
            app.log.info("%d %s answered without storing", result.status, integ.name)
            app.metrics.request(integ.name, result.status)
            return result
        if app.store.waiting() >= self._queue_limit:
            raise Busy("queue_limit %d reached" % self._queue_limit)
        rows = app.event_rows(integ, req, result)
        self._settle()
        if not self._tls:
            # The writer thread answers right after the commit (or this one, when the store's writer was
            # idle and this thread committed the events itself); then this thread goes back to reading.
            close = self.server.stopping or not req.keep_alive
            answer = Answer(self, integ.name, rows, close)
            app.store.submit_events(integ.name, rows, None, integ.queue_size, answer)  # by position: cheaper
            self._answer, self.close_connection = answer, close
            return None
        try:  # TLS: one SSL object must not be used by two threads at once, so this thread answers
            stored, error = app.store.add_events(integ.name, rows, limit=integ.queue_size), None
        except (Busy, StoreError) as e:
            stored, error = None, e
        status, body, headers, close = outcome(app, integ.name, rows, stored, error, req.client)
        if close:
            self.close_connection = True
        return Response(status, body, "application/json", headers)

    def _settle(self):
        """Wait until the answer the writer thread owes this connection is out (it usually is: the
        client waited for it before sending more), so answers never overtake each other."""
        answer, self._answer = self._answer, None
        if answer is not None:
            answer.sent.acquire()

    # -- the admin listener -------------------------------------------------------------------------
    def _admin(self, req):
        self._route = "admin"
        if self.app.children is not None and self.app.children.owns_peer(self.connection):
            raise Reject("the admin API does not serve the processes of hookd's own jobs", status=403)
        req.query = urllib.parse.parse_qs(req.query_string, keep_blank_values=True)
        req.body, req.client, req.connected = self._read_body(), self.client, self._connected
        return admin.dispatch(self.app, req)

    def _connected(self):
        """False once the client has hung up: its socket turns readable (EOF) while it waits for an answer
        (a client that sends its next request before this answer loses only its long poll)."""
        poller = select.poll()
        poller.register(self.connection, select.POLLIN | select.POLLPRI)
        return not poller.poll(0)

    # -- answering ----------------------------------------------------------------------------------
    def _reject(self, e, close=False):
        app = self.app
        if self._deadline[3]:  # the request was cut short by read_timeout: whatever it lacks, that is why
            e = Reject("request not received within read_timeout", status=408)
        if self.req is None:
            app.log.warning("%d malformed request from %s: %s", e.status, self.client, e)
        else:
            app.log.warning("%d %s %s: %s", e.status, self._route, self._log_path(), e)
        if not self.server.admin:
            app.metrics.request(self._route, e.status)
        self._reply(e.status, {"error": str(e)}, e.headers, close=close or e.status == 408)

    def _log_path(self):
        """The path for a log line. A matched route may carry a secret in its path (Camio's key), so
        only unmatched paths are logged as sent, with any configured secret masked (a near miss such as
        /ixon/webhook/KEY/x), cut to 200 characters; the log escapes control bytes."""
        if self._route not in ("-", "admin"):
            integ = self.app.integration(self._route)
            return integ.route if integ is not None and integ.route else "(%s route)" % self._route
        return self.app.redact(self.req.path[:200]) if self.req is not None else "-"

    def _reply(self, status, obj, headers=(), close=False):
        self._send(status, json.dumps(obj).encode(), "application/json", headers, close)

    def _send(self, status, body, content_type, headers=(), close=False):
        """Write the whole answer with one send: a head and a body in two small segments would meet
        Nagle's algorithm and the client's delayed ACK, and every keep-alive answer would wait ~40 ms.
        An answer given while a body is still unread closes the connection. The send is bounded by
        write_timeout."""
        self._settle()
        req = self.req
        if close or self.server.stopping or self.reader.unread or req is None or not req.keep_alive:
            self.close_connection = True
            self._linger = status >= 400
        if req is not None and req.method == "HEAD":
            data = _answer_bytes(status, b"", content_type, headers, self.close_connection, len(body))
        else:
            data = _answer_bytes(status, body, content_type, headers, self.close_connection)
        self.server.reaper.arm(self._deadline, self.app.settings.float("write_timeout"), writing=True)
        try:
            self.wfile.write(data)
        finally:
            self.server.reaper.disarm(self._deadline)


class Answer:
    """The answer to one stored request, sent by the writer thread right after the commit (``__call__``
    is the store's ``then``). The send never blocks the writer: what the socket does not take at once
    (a client that stops reading) is sent by a thread of its own within write_timeout, or the client
    is dropped. ``sent`` opens once the whole answer is out; the connection's thread waits on it before
    it writes anything else or closes. ``prepare`` (the store calls it while the COMMIT waits for the
    disk) makes the usual answer's bytes and log line beforehand; nothing of it is sent, logged or
    counted unless the commit succeeds with that result."""

    __slots__ = ("handler", "client", "route", "rows", "close", "sent", "ready")

    def __init__(self, handler, route, rows, close):
        self.handler, self.route, self.rows, self.close = handler, route, rows, close
        self.client = handler.client  # the handler may be reading the next request when this is sent
        self.sent = threading.Lock()
        self.sent.acquire()
        self.ready = None

    def prepare(self, stored):
        """Before the commit is known to have succeeded, on the store's preparing thread: for a request
        whose events are all new (most requests: one event, or a batch delivery's several), its answer's
        bytes, log message and line (encoded) and the jobs it gives the workers, kept as (stored, bytes,
        message, line, jobs), so that after the COMMIT only the bookkeeping and the send are left."""
        ids = _new_ids(stored)
        if ids is not None:
            body, message = _queued(self.route, ids, ids, self.client)
            self.ready = (stored, _answer_bytes(202, body, "application/json", (), self.close), message,
                          logs.rendered(self.handler.app.log, message, ids[0]), _jobs(stored, self.rows))

    def __call__(self, stored, error):
        handler = self.handler
        try:
            ready = self.ready
            if ready is not None and error is None and ready[0] is stored:  # committed as prepared
                _stored_new(handler.app, self.route, ready[4], stored[0][0], ready[2], ready[3])
                data, close = ready[1], False
            else:
                status, body, headers, close = outcome(handler.app, self.route, self.rows, stored, error, self.client)
                data = _answer_bytes(status, body, "application/json", headers, close or self.close)
            sock = handler.connection
            try:
                sent = sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                close, sent = True, len(data)  # the client is gone; its thread finds the socket shut
            if sent < len(data):
                threading.Thread(target=self._send_rest, args=(data[sent:], close), daemon=True).start()
                return
            if close:  # a fault: the connection's thread reads EOF and closes
                _shut_down(sock, socket.SHUT_RD)
        except BaseException:
            self.sent.release()
            raise
        self.sent.release()

    def _send_rest(self, data, close):
        """Send what the socket did not take at once, waiting with poll (select refuses a descriptor past
        1023). Whatever ends it early (write_timeout, the client gone, any error) drops the connection, so
        a cut answer is never followed by the next one."""
        sock = self.handler.connection
        deadline = time.monotonic() + self.handler.app.settings.float("write_timeout")
        try:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            while data:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(left * 1000):
                    close = True  # the client does not read its answer: dropped
                    break
                data = data[sock.send(data, socket.MSG_DONTWAIT):]
        except OSError:
            close = True  # the client is gone
        except BaseException:
            close = True
            raise
        finally:
            if close:
                _shut_down(sock, socket.SHUT_RDWR)
            self.sent.release()


def _shut_down(sock, how):
    try:
        sock.shutdown(how)
    except OSError:
        pass


def outcome(app, route, rows, stored, error, client):
    """(status, body, headers, close) for a request whose events were stored (``stored``: the store's
    [(id, "new"|"duplicate")]) or refused (``error``), after queueing the fresh ones for the workers,
    with the request's one log line and its metric."""
    if error is not None:
        if isinstance(error, Reject):
            app.log.warning("%d %s: %s", error.status, route, error)
            app.metrics.request(route, error.status)
            return error.status, json.dumps({"error": str(error)}).encode(), error.headers, False
        if isinstance(error, StoreError):
            app.log.error("503 %s: %s", route, error)
            app.metrics.request(route, 503)
            return 503, b'{"error": "storage unavailable"}', (("Retry-After", "5"),), False
        app.log.error("500 %s: fault inside hookd: %r", route, error)
        app.metrics.request(route, 500)
        return 500, b'{"error": "internal error"}', (), True
    ids = _new_ids(stored)  # every event new (most deliveries): as Answer.prepare makes it
    fresh = ids if ids is not None else [i for i, status in stored if status == "new"]
    if fresh:
        body, message = _queued(route, ids or [i for i, _ in stored], fresh, client)
        _stored_new(app, route, _jobs(stored, rows), fresh[0], message)
        return 202, body, (), False
    first = stored[0][0] if stored else None
    logs.info(app.log, "200 %s duplicate of event %s" % (route, first if stored else "-"))
    app.metrics.request(route, 200)
    return 200, json.dumps({"id": first, "ids": [i for i, _ in stored], "status": "duplicate"}).encode(), (), False


def _new_ids(stored):
    """The ids of a request's events when every one was stored new (most requests), else None."""
    if len(stored) == 1:  # one event (most requests): no list walked
        return [stored[0][0]] if stored[0][1] == "new" else None
    ids = [event_id for event_id, status in stored if status == "new"]
    return ids if ids and len(ids) == len(stored) else None


def _queued(route, ids, fresh, client):
    """The body and log message of a 202: ``ids`` every event's id, ``fresh`` those stored new (the log
    line names only them)."""
    if len(ids) == 1:  # one event, new (most requests)
        return (b'{"id": %d, "ids": [%d], "status": "queued"}' % (ids[0], ids[0]),
                "202 %s stored event %d from %s" % (route, ids[0], client))
    text = [str(i) for i in ids]
    named = text if fresh is ids else [str(i) for i in fresh]
    return (b'{"id": %d, "ids": [%s], "status": "queued"}' % (ids[0], ", ".join(text).encode()),
            "202 %s stored event %s from %s" % (route, ",".join(named), client))


def _jobs(stored, rows):
    """(id, serial key) of each event of a request stored new that a worker runs (not stored done)."""
    return [(event_id, row.get("serial_key")) for (event_id, status), row in zip(stored, rows)
            if status == "new" and not row.get("done")]


def _stored_new(app, route, jobs, first, message, line=None):
    """After the commit, for a request with events stored new: queue its ``jobs`` (``_jobs``) for the
    workers, log the request's line under the first new event (``first``; ``line``: made beforehand by
    ``logs.rendered``), count its 202."""
    for event_id, serial_key in jobs:
        app.pool.submit(event_id, route, serial_key)
    logs.info(app.log, message, first, line)
    app.metrics.request(route, 202)


def _answer_bytes(status, body, content_type, headers, close, length=None):
    """A whole HTTP/1.1 answer in one piece: status line, headers, body (``length``: Content-Length
    when the body is left out, as for HEAD)."""
    extra = "".join(["%s: %s\r\n" % (k, v) for k, v in headers]) if headers else ""
    return b"%s%s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
        _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\nServer: hookd\r\nDate: " % status, _http_date(),
        content_type.encode("latin-1"), len(body) if length is None else length, extra.encode("latin-1"),
        b"Connection: close\r\n" if close else b"", body)


# Each answer's first bytes, up to the Date header's value.
_STATUS_LINES = {status: b"HTTP/1.1 %d %s\r\nServer: hookd\r\nDate: " % (status, phrase.encode("latin-1"))
                 for status, phrase in _REASONS.items()}


def _query(text):
    """The query string as {name: [values]}; most webhook URLs have none."""
    return urllib.parse.parse_qs(text) if text else {}


_DATE = (None, b"")  # (the second, its Date header value): replaced whole, never changed


def _http_date():
    """The Date header value (bytes), formatted once per second."""
    global _DATE
    now = int(time.time())
    date = _DATE
    if date[0] != now:
        date = _DATE = (now, email.utils.formatdate(now, usegmt=True).encode("latin-1"))
    return date[1]
