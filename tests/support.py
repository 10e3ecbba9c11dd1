"""Shared test parts: the real daemon as a subprocess, a scripted loopback upstream, raw HTTP helpers.

Strategy: every end-to-end test starts ``python3 hookd.py 127.0.0.1:0 --config FILE`` in a temporary
directory and reads the bound port from its ``listening on`` log line, and the admin listener's address
from its ``admin API listening on`` line (``admin.listen = 127.0.0.1:0`` unless the test sets its own),
so tests never race for a port.
``FakeUpstream`` is a real ``ThreadingHTTPServer`` on 127.0.0.1:0 that records each request into a queue
and answers from a script; vendor fakes subclass it or pass a ``respond`` function. Waiting is always
polling against a deadline, never a bare sleep.
"""

import hashlib
import hmac
import http.client
import http.server
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKD = os.path.join(ROOT, "hookd.py")


def wait_until(predicate, timeout=10.0, interval=0.02, message="condition"):
    """Poll ``predicate`` until it returns a truthy value (returned), or fail with AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, message))
        time.sleep(interval)


class Daemon:
    """A running ``hookd.py`` subprocess. ``url``, ``port``, ``admin_url`` (``http://127.0.0.1:PORT`` or
    ``unix:/path``; None when the admin API is off), ``state_dir``, ``log()`` (all stderr so far),
    ``cli(*args)`` to run a subcommand on the same config, ``events()``/``event(id)`` via ``--json``,
    ``admin(method, path)`` for one admin API request."""

    def __init__(self, config_text, tmpdir=None, env=None, extra_args=(), state_dir=None):
        self.tmp = tmpdir or tempfile.mkdtemp(prefix="hookd-test-")
        self.state_dir = state_dir or os.path.join(self.tmp, "var")
        self.config_path = os.path.join(self.tmp, "credentials.properties")
        text = config_text
        if "[hookd]" not in text:
            text = "[hookd]\n" + text
        text = text.replace("[hookd]", "[hookd]\nstate_dir = %s" % self.state_dir, 1) \
            if "state_dir" not in text else text
        if not re.search(r"^admin\.listen\s*=", text, re.M):
            text = text.replace("[hookd]", "[hookd]\nadmin.listen = 127.0.0.1:0", 1)
        with open(self.config_path, "w") as f:
            f.write(text)
        os.chmod(self.config_path, 0o600)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env.pop("HOOKD_CONFIG", None)
        self.env.update(env or {})
        self.extra_args = list(extra_args)
        self.proc = None
        self._log = []
        self._log_lock = threading.Lock()
        self.port = self.admin_url = None

    def start(self, timeout=15):
        self.port = self.admin_url = None
        self._spawn(["127.0.0.1:0"])
        wait_until(lambda: (self.port and (self.admin_url or "admin API off" in self.log()))
                   or self.proc.poll() is not None, timeout, message="daemon to listen")
        if self.port is None:
            raise AssertionError("daemon exited with %s:\n%s" % (self.proc.returncode, self.log()))
        return self

    def _spawn(self, args):
        self.proc = subprocess.Popen(
            [sys.executable, HOOKD] + args + ["--config", self.config_path] + self.extra_args,
            cwd=self.tmp, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()

    def _pump(self, proc):
        with proc.stdout:  # closed at EOF, when the daemon has exited
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace")
                with self._log_lock:
                    self._log.append(line)
                m = re.search(r"admin API listening on (https?://[0-9.]+:\d+|unix:\S+)", line)
                if m:
                    self.admin_url = m.group(1)
                    continue
                m = re.search(r"listening on https?://[0-9.]+:(\d+)", line)
                if m and self.port is None:
                    self.port = int(m.group(1))

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def log(self):
        with self._log_lock:
            return "".join(self._log)

    def wait_log(self, pattern, timeout=10):
        return wait_until(lambda: re.search(pattern, self.log()), timeout, message="log %r" % pattern)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=None, timeout=40):
        """Stop the daemon (SIGTERM by default) and return its exit code."""
        sig = signal.SIGTERM if sig is None else sig  # (in the class body, `signal` is the method above)
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise AssertionError("daemon did not stop within %ss:\n%s" % (timeout, self.log()[-4000:]))

    def kill9(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def cli(self, *args, timeout=60, input=None):
        """Run ``hookd.py ARGS --config FILE``; returns CompletedProcess (text)."""
        return subprocess.run([sys.executable, HOOKD] + list(args) + ["--config", self.config_path],
                              cwd=self.tmp, env=self.env, capture_output=True, text=True,
                              timeout=timeout, input=input)

    def events(self, *filters):
        r = self.cli("events", "--json", "--limit", "100000", *filters)
        if r.returncode != 0:
            raise AssertionError("events --json failed: %s" % r.stderr)
        return json.loads(r.stdout)

    def event(self, event_id):
        r = self.cli("event", str(event_id), "--json")
        if r.returncode != 0:
            raise AssertionError("event %s failed: %s" % (event_id, r.stderr))
        return json.loads(r.stdout)

    def wait_status(self, event_id, status, timeout=20):
        """Poll until event ``event_id`` has ``status`` (a string or a tuple of them); return the event."""
        wanted = (status,) if isinstance(status, str) else tuple(status)
        box = {}

        def check():
            box["e"] = self.event(event_id)
            return box["e"]["status"] in wanted
        try:
            wait_until(check, timeout, interval=0.1, message="event %s to be %s" % (event_id, wanted))
        except AssertionError:
            raise AssertionError("event %s is %r, not %s; log:\n%s" % (
                event_id, box.get("e"), wanted, self.log()[-3000:]))
        return box["e"]

    def post(self, path, body=b"", headers=None, chunked=False, chunk_size=7):
        return post(self.url + path, body, headers, chunked=chunked, chunk_size=chunk_size)

    def get(self, path, headers=None):
        return request("GET", self.url + path, None, headers)

    def admin(self, method, path, body=None, headers=None):
        """One request to the admin listener; (status, headers, body)."""
        if self.admin_url is None:
            raise AssertionError("the admin API is off (or its line was not logged yet)")
        if self.admin_url.startswith("unix:"):
            return unix_request(self.admin_url[5:], method, path, body, headers)
        return request(method, self.admin_url + path, body, headers)


class Worker(Daemon):
    """A ``hookd.py worker ARGS`` subprocess with its own configuration and state directory (another host,
    as far as the first hookd can tell); started once its ``worker NAME: running`` line is logged."""

    def __init__(self, config_text, args, **kw):
        super().__init__(config_text, **kw)
        self.args = list(args)

    def start(self, timeout=15):
        self._spawn(["worker"] + self.args)
        wait_until(lambda: re.search(r"worker \S+: running", self.log()) or self.proc.poll() is not None,
                   timeout, message="worker to start")
        if self.proc.poll() is not None:
            raise AssertionError("worker exited with %s:\n%s" % (self.proc.returncode, self.log()))
        return self


def app_from(folder, text):
    """An in-process ``App`` on the configuration ``text``, written to ``folder/c.properties`` (0600, as
    the daemon wants its file), for tests that drive the core without a daemon."""
    from hookd_core.app import App
    path = os.path.join(folder, "c.properties")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return App(path)


def request(method, url, body=None, headers=None, timeout=20):
    """One request on a fresh connection; returns (status, headers dict lower-cased, body bytes)."""
    m = re.match(r"https?://([^/:]+):(\d+)(.*)", url)
    host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"
    return _one(http.client.HTTPConnection(host, port, timeout=timeout), method, path, body, headers)


def unix_request(sock_path, method, path, body=None, headers=None, timeout=20):
    """One request over a unix socket; (status, headers dict lower-cased, body bytes)."""
    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.settimeout(timeout)
    conn.sock.connect(sock_path)
    return _one(conn, method, path, body, headers)


def _one(conn, method, path, body, headers):
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def post(url, body, headers=None, chunked=False, chunk_size=7, timeout=20):
    """POST ``body`` with Content-Length, or chunked in pieces of ``chunk_size``; (status, headers, body)."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not chunked:
        return request("POST", url, body, dict(headers or {}), timeout)
    m = re.match(r"https?://([^/:]+):(\d+)(.*)", url)
    host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"
    head = "POST %s HTTP/1.1\r\nHost: %s:%d\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n" % (
        path, host, port)
    for k, v in (headers or {}).items():
        head += "%s: %s\r\n" % (k, v)
    data = head.encode("latin-1") + b"\r\n"
    for i in range(0, len(body), chunk_size):
        piece = body[i:i + chunk_size]
        data += b"%x\r\n" % len(piece) + piece + b"\r\n"
    data += b"0\r\n\r\n"
    return raw_exchange(host, port, data, timeout)


def raw_exchange(host, port, data, timeout=20):
    """Send raw bytes, read one HTTP response; (status, headers, body)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        f = s.makefile("rb")
        resp = http.client.HTTPResponse(s)
        resp.fp = f
        resp.begin()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def hmac_hex(secret, message, digest=hashlib.sha256):
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if isinstance(message, str):
        message = message.encode("utf-8")
    return hmac.new(secret, message, digest).hexdigest()


class FakeUpstream:
    """A loopback HTTP server that records requests and answers from a script.

    ``script`` is a list of (status, body[, headers dict]) used in order (the last one repeats), or a
    function ``respond(req) -> (status, body, headers)``. Each request is recorded as a ``Recorded``
    (method, path, headers (lower-case dict), body) in ``self.requests`` (a queue) and ``self.seen``."""

    def __init__(self, script=((200, b"{}"),), respond=None):
        self.script = list(script)
        self.respond = respond
        self.requests = queue.Queue()
        self.seen = []
        self._lock = threading.Lock()
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                rec = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                               body)
                with outer._lock:
                    outer.seen.append(rec)
                outer.requests.put(rec)
                status, rbody, rheaders = outer._answer(rec)
                if isinstance(rbody, (dict, list)):
                    rbody = json.dumps(rbody).encode()
                    rheaders = dict({"Content-Type": "application/json"}, **(rheaders or {}))
                elif isinstance(rbody, str):
                    rbody = rbody.encode()
                if status is None:  # accept and never answer: hold the connection until shutdown
                    outer._stall.wait(60)
                    return
                self.send_response(status)
                for k, v in (rheaders or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(rbody)))
                self.end_headers()
                self.wfile.write(rbody)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

        self._stall = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _answer(self, rec):
        if self.respond is not None:
            out = self.respond(rec)
        else:
            with self._lock:
                out = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        status, body = out[0], out[1]
        headers = out[2] if len(out) > 2 else {}
        return status, body, headers

    def wait_for_request(self, timeout=10):
        try:
            return self.requests.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no request reached the fake upstream within %ss" % timeout)

    def count(self, path_prefix=""):
        with self._lock:
            return sum(1 for r in self.seen if r.path.startswith(path_prefix))

    def close(self):
        self._stall.set()
        self.server.shutdown()
        self.server.server_close()


class Recorded:
    def __init__(self, method, path, headers, body):
        self.method, self.path, self.headers, self.body = method, path, headers, body

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<%s %s %d bytes>" % (self.method, self.path, len(self.body))


def process_alive(pid):
    """True while ``pid`` exists and is not a zombie waiting to be reaped (a killed orphan whose new
    parent has not reaped it yet counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
