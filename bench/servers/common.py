"""Shared parts of the benchmark's stand-in servers: body framing, the two signature checks, a durable sqlite store.

Strategy: the ceiling, naive-durable, Flask and pyPreservica targets must do exactly the same work per
request apart from what they are meant to show, so the pieces live here once. ``read_body`` reads a
Content-Length or a chunked body from a ``BaseHTTPRequestHandler`` (the stdlib server does not de-chunk);
``verify`` checks a Preservica signature (hex HMAC of "preservica-webhook-auth" + body) or a Standard
Webhooks v1 signature (base64 HMAC of "id.ts.body" with the base64-decoded ``whsec_`` key) in constant
time; ``QuietHandler`` and ``Server`` are the HTTP/1.1 keep-alive handler base (no access log, empty
answers with Content-Length) and the threading server with a 128-deep listen backlog that the ceiling
and naive-durable targets share; ``Store`` is one sqlite connection in WAL mode with synchronous=FULL that commits every insert on
its own (the naive way), guarded by a lock so any number of handler threads can share it.
"""

import base64
import hashlib
import hmac
import http.server
import sqlite3
import threading
import time

PRESERVICA_SECRET = b"bench-preservica-secret"
WHSEC = "whsec_YmVuY2gtc3RhbmRhcmQtd2ViaG9va3Mtc2VjcmV0LWtleQ=="
MAX_BODY = 1 << 20


def read_body(handler):
    """The request body as bytes, from Content-Length or chunked framing; None when framing is bad."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        return _read_chunked(handler.rfile)
    length = int(handler.headers.get("Content-Length") or 0)
    if length > MAX_BODY:
        return None
    return handler.rfile.read(length)


def _read_chunked(rfile):
    parts = []
    total = 0
    while True:
        size = int(rfile.readline(64).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(parts)
        total += size
        if total > MAX_BODY:
            return None
        parts.append(rfile.read(size))
        rfile.readline(8)


def verify(path, headers, body):
    """True when the request carries the right signature for its route."""
    if path.startswith("/hooks/"):
        return _verify_standard(headers, body)
    got = headers.get("Preservica-Signature", "")
    want = hmac.new(PRESERVICA_SECRET, b"preservica-webhook-auth" + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(got, want)


def _verify_standard(headers, body):
    msg_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    key = base64.b64decode(WHSEC[len("whsec_"):])
    signed = ("%s.%s." % (msg_id, stamp)).encode() + body
    want = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for item in headers.get("webhook-signature", "").split():
        version, _, sig = item.partition(",")
        if version == "v1" and hmac.compare_digest(sig, want):
            return True
    return False


class Store:
    """One sqlite database, WAL + synchronous=FULL, one commit per inserted request."""

    def __init__(self, path):
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, route TEXT,"
                        " received REAL, body BLOB)")

    def insert(self, route, body):
        with self.lock:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO events (route, received, body) VALUES (?, ?, ?)",
                            (route, time.time(), body))
            self.db.execute("COMMIT")


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no access log; ``answer(code)`` sends an empty response in one write."""

    protocol_version = "HTTP/1.1"

    def answer(self, code):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    """One thread per connection; a backlog of 128 so 64 connections connect at once."""

    request_queue_size = 128
    daemon_threads = True
