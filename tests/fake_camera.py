"""A loopback MJPEG IP camera for tests: real JPEG frames served as ``multipart/x-mixed-replace``.

Strategy: the frames are made once per process by the real ffmpeg (``-f lavfi -i testsrc``), so the
recorder under test decodes genuine JPEG data. Each GET on ``path`` answers 200 with
``Content-Type: multipart/x-mixed-replace; boundary=...`` and then one part per frame at ``fps``,
until the client goes away or the camera is closed (no Content-Length: the body ends when the
connection closes, like a real camera). Options: HTTP basic or digest auth, and a stall mode that sends
``stall_after`` frames and then goes silent while holding the connection open (a camera hanging
mid-stream) for the first ``stall_connections`` connections. The camera records every request and the
monotonic time it sent each connection's first frame, so a benchmark can time "first frame". One fake
may stand for several cameras (``paths``) and keeps each stream's path and monotonic start and end
(``streams``; a client that hangs up is noticed before the next frame), so a test can see that one
camera is never recorded twice at the same time.
"""

import base64
import hashlib
import http.server
import os
import re
import select
import socket
import subprocess
import tempfile
import threading
import time

BOUNDARY = "hookdframe"
_FRAMES = {}
_FRAMES_LOCK = threading.Lock()


def make_frames(size="320x240", count=10):
    """``count`` distinct JPEG frames (bytes) of testsrc at ``size``, made once by ffmpeg and cached."""
    key = (size, count)
    with _FRAMES_LOCK:
        if key not in _FRAMES:
            with tempfile.TemporaryDirectory(prefix="fakecam-") as tmp:
                subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error",
                                "-f", "lavfi", "-i", "testsrc=size=%s:rate=%d" % (size, count),
                                "-frames:v", str(count), "-q:v", "5",
                                os.path.join(tmp, "f%03d.jpg")], check=True, timeout=60)
                names = sorted(os.listdir(tmp))
                frames = []
                for name in names:
                    with open(os.path.join(tmp, name), "rb") as f:
                        frames.append(f.read())
            assert frames and all(fr[:2] == b"\xff\xd8" for fr in frames), "ffmpeg made no JPEGs"
            _FRAMES[key] = frames
        return _FRAMES[key]


class FakeCamera:
    """``FakeCamera(fps=10, path="/video.mjpg", auth="none"|"basic"|"digest", username, password,
    stall_after=None, stall_connections=1)``; ``url``, ``stream_url``, ``connections``,
    ``first_frame_at`` (monotonic times), ``requests`` (list of (path, headers dict)), ``close()``;
    ``paths``: every path served (default: just ``path``); ``streams``: [path, start, end or None]."""

    def __init__(self, fps=10, path="/video.mjpg", auth="none", username="cam", password="secret",
                 stall_after=None, stall_connections=1, size="320x240", paths=None):
        self.fps, self.path, self.auth = fps, path, auth
        self.paths = set(paths or (path,))
        self.streams = []
        self.username, self.password = username, password
        self.stall_after, self.stall_connections = stall_after, stall_connections
        self.frames = make_frames(size)
        self.connections = 0
        self.first_frame_at = []
        self.requests = []
        self.frames_sent = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._nonce = base64.b16encode(os.urandom(8)).decode().lower()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.stream_url = self.url + path
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self._closed.set()
        self.server.shutdown()
        self.server.server_close()

    # -- auth ------------------------------------------------------------------------------------------

    def authorized(self, header):
        """True when the Authorization header value satisfies this camera's auth mode."""
        if self.auth == "none":
            return True
        if self.auth == "basic":
            want = "Basic " + base64.b64encode(
                ("%s:%s" % (self.username, self.password)).encode()).decode()
            return header == want
        return self._digest_ok(header or "")

    def challenge(self):
        if self.auth == "basic":
            return 'Basic realm="fakecam"'
        return 'Digest realm="fakecam", qop="auth", nonce="%s", algorithm=MD5' % self._nonce

    def _digest_ok(self, header):
        """RFC 7616 digest with MD5 and qop=auth, as cameras do."""
        if not header.startswith("Digest "):
            return False
        p = dict(re.findall(r'(\w+)="?([^",]*)"?', header[7:]))
        if p.get("username") != self.username or p.get("nonce") != self._nonce:
            return False

        def md5(s):
            return hashlib.md5(s.encode()).hexdigest()
        ha1 = md5("%s:fakecam:%s" % (self.username, self.password))
        ha2 = md5("GET:%s" % p.get("uri", ""))
        if p.get("qop"):
            want = md5("%s:%s:%s:%s:%s:%s" % (ha1, self._nonce, p.get("nc"), p.get("cnonce"),
                                              p["qop"], ha2))
        else:
            want = md5("%s:%s:%s" % (ha1, self._nonce, ha2))
        return p.get("response") == want

    # -- streaming -------------------------------------------------------------------------------------

    def serve(self, h):
        """Answer one GET on BaseHTTPRequestHandler ``h``: 401, 404, or the endless multipart stream."""
        with self._lock:
            self.requests.append((h.path, {k.lower(): v for k, v in h.headers.items()}))
        path = h.path.split("?")[0]
        if path not in self.paths:
            return _plain(h, 404, b"no such stream\n")
        if not self.authorized(h.headers.get("Authorization")):
            return _plain(h, 401, b"unauthorized\n", {"WWW-Authenticate": self.challenge()})
        with self._lock:
            self.connections += 1
            number = self.connections
        h.send_response(200)
        h.send_header("Content-Type", "multipart/x-mixed-replace; boundary=%s" % BOUNDARY)
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        stall = self.stall_after is not None and number <= self.stall_connections
        stream = [path, time.monotonic(), None]
        with self._lock:
            self.streams.append(stream)
        try:
            self._stream(h.wfile, stall, h.connection)
        finally:
            stream[2] = time.monotonic()

    def _stream(self, out, stall, sock):
        start = time.monotonic()
        n = 0
        while not self._closed.is_set():
            try:
                if select.select([sock], [], [], 0)[0] and not sock.recv(1, socket.MSG_PEEK):
                    return  # the client hung up
            except OSError:
                return
            if stall and n >= self.stall_after:
                self._closed.wait(120)  # silent, connection held open: a hung camera
                return
            frame = self.frames[n % len(self.frames)]
            part = ("--%s\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % (
                BOUNDARY, len(frame))).encode() + frame + b"\r\n"
            try:
                out.write(part)
                out.flush()
            except OSError:
                return
            if n == 0:
                with self._lock:
                    self.first_frame_at.append(time.monotonic())
            n += 1
            with self._lock:
                self.frames_sent += 1
            delay = start + n / float(self.fps) - time.monotonic()
            if delay > 0 and self._closed.wait(delay):
                return

    def _handler_class(self):
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                camera.serve(self)

        return Handler


def _plain(h, status, body, headers=None):
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Type", "text/plain")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)
