"""A loopback IXON Cloud: API v2 (reference/upstreams.md §4.3, §4.8) plus a web-access proxy to a camera.

Strategy: two real HTTP servers on 127.0.0.1. The API server answers under ``/api`` and insists on what
the real API insists on: ``Api-Version: 2`` and the right ``Api-Application`` on every call, a bearer
token (the configured one, or a ``secretId`` it issued at ``POST /api/access-tokens`` for Basic
``email:otp:password``), and ``Api-Company`` on company-scoped calls. Replies use IXON's envelope
``{"status": "success", "type": ..., "data": ..., "moreAfter": null}``; errors are
``{"status": "error", "type": "Error", "data": [{"message": ...}]}``. ``POST /api/web-access`` with
``{"server": {"publicId": ...}}`` answers 201 with a session URL ``http://127.0.0.1:W/?auth=TOKEN`` on the
web-access server. There, ``GET /?auth=TOKEN`` answers 302 with the session cookie, and any other path is
proxied byte for byte to the camera, but only with that cookie (else 401). Every request is recorded in
``seen`` as (server, method, path, headers).
"""

import base64
import http.server
import json
import os
import socket
import threading
import urllib.parse

COOKIE = "ixwa_session"


class FakeIxon:
    """``FakeIxon(camera, application="App123456789", company="1111-2222-3333-4444-5555",
    token="tok...", email=..., password=..., server_id=...)``; ``api_url`` for [ixon] api.url."""

    def __init__(self, camera, application="App123456789", company="1111-2222-3333-4444-5555",
                 token="T0kenT0kenT0kenT0kenT0kenT0ken12", email="ops@example.com", password="pw-1",
                 server_id="srv-cam-1", data_as_list=False):
        self.camera, self.application, self.company = camera, application, company
        self.tokens = {token} if token else set()
        self.email, self.password, self.server_id = email, password, server_id
        self.data_as_list = data_as_list
        self.sessions, self.cookies = set(), set()
        self.seen = []
        self.logins = 0
        self._lock = threading.Lock()
        self.api = _serve(self._api_handler())
        self.wa = _serve(self._wa_handler())
        self.api_url = "http://127.0.0.1:%d/api" % self.api.server_address[1]
        self.wa_url = "http://127.0.0.1:%d" % self.wa.server_address[1]

    def close(self):
        for srv in (self.api, self.wa):
            srv.shutdown()
            srv.server_close()

    def count(self, server, method, path):
        with self._lock:
            return sum(1 for s, m, p, _ in self.seen if (s, m) == (server, method) and p.split("?")[0] == path)

    def requests(self, server, path=None):
        with self._lock:
            return [(m, p, h) for s, m, p, h in self.seen
                    if s == server and (path is None or p.split("?")[0] == path)]

    def _record(self, server, h):
        with self._lock:
            self.seen.append((server, h.command, h.path, {k.lower(): v for k, v in h.headers.items()}))

    # -- API v2 ----------------------------------------------------------------------------------------

    def api_answer(self, h, body):
        """(status, envelope) for one API request."""
        path = urllib.parse.urlsplit(h.path).path
        if h.headers.get("Api-Version") != "2":
            return _err(400, "Api-Version header must be 2")
        if h.headers.get("Api-Application") != self.application:
            return _err(401, "unknown Api-Application")
        if path == "/api/access-tokens" and h.command == "POST":
            return self._login(h, body)
        auth = h.headers.get("Authorization") or ""
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            return _err(401, "a valid bearer token is required")
        if path == "/api/companies" and h.command == "GET":
            return _ok("Company", [{"publicId": self.company, "name": "Acme Machines"}])
        if h.headers.get("Api-Company") != self.company:
            return _err(403, "Api-Company header missing or not yours")
        if path == "/api/web-access" and h.command == "POST":
            return self._web_access(body)
        if path == "/api/agents" and h.command == "GET":
            return _ok("Agent", [{"publicId": "agent-1", "name": "IXrouter line 4"}])
        if path == "/api/agents/agent-1/servers" and h.command == "GET":
            return _ok("AgentServer", [{"publicId": self.server_id, "name": "Camera line 4"}])
        return _err(404, "no such endpoint")

    def _login(self, h, body):
        """Basic base64(email:otp:password) (the 2FA code may be empty: email::password)."""
        auth = h.headers.get("Authorization") or ""
        try:
            email, _otp, password = base64.b64decode(auth[6:]).decode("utf-8").split(":", 2)
        except (ValueError, UnicodeDecodeError):
            return _err(401, "Basic email:otp:password required")
        if not auth.startswith("Basic ") or (email, password) != (self.email, self.password):
            return _err(401, "wrong email or password")
        req = json.loads(body or b"{}")
        if not 60 <= int(req.get("expiresIn", 0)) <= 5184000:
            return _err(400, "expiresIn out of range")
        secret = os.urandom(16).hex()
        with self._lock:
            self.tokens.add(secret)
            self.logins += 1
        return 201, {"status": "success", "type": "AccessToken",
                     "data": {"publicId": "at-" + secret[:8], "expiresOn": "2030-01-01T00:00:00Z",
                              "secretId": secret}}

    def _web_access(self, body):
        try:
            server = json.loads(body)["server"]["publicId"]
        except (ValueError, KeyError, TypeError):
            return _err(400, "body must be {\"server\": {\"publicId\": ...}}")
        if server != self.server_id:
            return _err(404, "no such server")
        session = os.urandom(12).hex()
        with self._lock:
            self.sessions.add(session)
        data = {"publicId": "wa-" + session[:6], "url": "%s/?auth=%s" % (self.wa_url, session)}
        return 201, {"status": "success", "type": "WebAccess", "data": [data] if self.data_as_list else data}

    def _api_handler(self):
        fake = self

        class H(_Quiet):
            def _any(self):
                fake._record("api", self)
                n = int(self.headers.get("Content-Length") or 0)
                status, doc = fake.api_answer(self, self.rfile.read(n) if n else b"")
                _send(self, status, json.dumps(doc).encode(), {"Content-Type": "application/json"})

            do_GET = do_POST = _any

        return H

    # -- web access: the HTTP proxy to the camera ------------------------------------------------------

    def _wa_handler(self):
        fake = self

        class H(_Quiet):
            def do_GET(self):
                fake._record("wa", self)
                parts = urllib.parse.urlsplit(self.path)
                auth = urllib.parse.parse_qs(parts.query).get("auth", [None])[0]
                if parts.path == "/" and auth:
                    return fake._open_session(self, auth)
                if _cookie(self.headers.get("Cookie"), COOKIE) not in fake.cookies:
                    return _send(self, 401, b"web access session required\n", {"Content-Type": "text/plain"})
                fake._proxy(self)

        return H

    def _open_session(self, h, auth):
        if auth not in self.sessions:
            return _send(h, 403, b"unknown web access session\n", {"Content-Type": "text/plain"})
        cookie = os.urandom(12).hex()
        with self._lock:
            self.cookies.add(cookie)
        _send(h, 302, b"", {"Location": "/", "Set-Cookie": "%s=%s; Path=/; HttpOnly" % (COOKIE, cookie)})

    def _proxy(self, h):
        """Pass the request to the camera (with its Authorization) and relay the answer until either
        side closes: the camera's stream has no length."""
        lines = ["GET %s HTTP/1.1" % h.path, "Host: 127.0.0.1:%d" % self.camera.port, "Connection: close"]
        if h.headers.get("Authorization"):
            lines.append("Authorization: " + h.headers["Authorization"])
        h.close_connection = True
        try:
            with socket.create_connection(("127.0.0.1", self.camera.port), timeout=120) as up:
                up.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                for chunk in iter(lambda: up.recv(65536), b""):
                    h.wfile.write(chunk)
                    h.wfile.flush()
        except OSError:
            pass


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass


def _serve(handler):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _send(h, status, body, headers):
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _ok(kind, items):
    return 200, {"status": "success", "type": kind, "data": items, "moreAfter": None}


def _err(status, message):
    return status, {"status": "error", "type": "Error", "data": [{"message": message}]}


def _cookie(header, name):
    for part in (header or "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None
