"""The one outbound HTTP client: every call hookd makes (forward, Teams, each vendor's API) goes through it.

Strategy: ``request()`` opens one ``http.client`` connection per call (it connects, with TLS for
https), or with ``keep_alive`` (forward, which runs once per event) takes one kept from an earlier call to
the same place (never one that has something to read while idle: an EOF, or bytes nobody asked for).
The exchange itself is written and read here, not by http.client (whose request building and
``email``-based answer parsing cost a forward ~65 µs of CPU): the head and the body go out in one send
(with Content-Length), and the answer is read through one buffer (``_Reader``) by http.client's rules
(status line, at most 100 header lines of at most 64 KiB, Content-Length, chunked, or to EOF; 100
Continue skipped), at most ``max_body`` bytes of it (one cut short is a NetworkError); a connection is
kept only when its answer said nothing against it and nothing came past the answer's end. It returns a
``Reply``. ``timeout`` is a deadline for the whole exchange, not for each
read: connect, send and every read share it, and one thread (``_Deadlines``, for every request in the
process) shuts the socket when it passes, so an upstream that drips one byte a second cannot hold a worker
longer than ``timeout``. Redirects are never followed: a 3xx is returned like any other status, so nobody
can bounce hookd to a host nobody allowed. A socket error or the deadline raises ``NetworkError`` (a
``Retry``); ``allowed_hosts`` refuses any other host with ``Fail`` before a byte is sent (SSRF guard).
``check(reply, what)`` is the one status mapping every caller uses: 2xx is the answer; 401/403 ``Fail``
(the credentials are wrong: retrying cannot help); 408, 429 and 5xx ``Retry`` honouring ``Retry-After``;
3xx ``Retry`` (not followed); any other status ``other`` (``Fail`` unless the caller says otherwise). 404
means something different to each integration ("no thumbnail", "asset gone", "unknown job"), so callers
that give it a meaning test for it before ``check``. ``Api`` is the small base every vendor client class
builds on: a base URL, the one host it may reach, headers sent with every call, and the per-call deadline.
"""

import http.client
import json
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse

from . import proc
from .api import Fail, Retry

MAX_REPLY = 64 * 1024 * 1024  # thumbnails and API answers; anything larger is not what we asked for
MAX_RETRY_AFTER = 3600        # seconds; a larger Retry-After from an upstream is capped to this
REFUSED = (401, 403)
TRANSIENT = (408, 429)        # plus every 5xx


class NetworkError(Retry):
    """Could not reach the upstream, or it did not answer within the deadline: worth retrying."""


class Reply:
    """status (int), headers (http.client.HTTPMessage), body (bytes), and ``json()``."""

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def ok(self):
        return 200 <= self.status < 300

    def json(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise Retry("upstream answered %d with a body that is not JSON" % self.status)


def split_url(url):
    """(scheme, host, port, path-with-query) of an http(s) URL, or Fail."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise Fail("not an http(s) URL: %s" % redact_url(url))
    port = port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, parts.hostname, port, path


def redact_url(url):
    """The URL without user:password and without its query (Teams and IXON URLs carry a signature there),
    for log lines and notes."""
    parts = urllib.parse.urlsplit(url)
    try:
        if parts.password or parts.username:
            netloc = (parts.hostname or "") + (":%d" % parts.port if parts.port else "")
            parts = parts._replace(netloc="***@" + netloc)
    except ValueError:
        parts = parts._replace(netloc="(bad address)")
    return urllib.parse.urlunsplit(parts._replace(query="", fragment=""))


def request(method, url, headers=None, body=None, timeout=30, allowed_hosts=None, max_body=MAX_REPLY,
            context=None, keep_alive=False, keep=None):
    """Send one request and return its Reply within ``timeout`` seconds in all. Raises NetworkError
    (retry: unreachable, cut off, too slow) or Fail (not an http(s) URL, host not allowed). With
    ``keep_alive`` the connection is kept for the next call to the same place (``_Idle``); a kept one
    that the upstream closed meanwhile is replaced, once, when that shows before the request went out
    whole. With ``keep`` (bytes) the answer's body is not refused past ``max_body``: only its first
    ``keep`` bytes are kept, the rest read and dropped up to KEEP_DRAIN bytes more (so that the
    connection can be kept), and past that the reading stops and the connection is closed: for callers
    that read only the status and an excerpt (forward, Teams), whose memory and time an upstream's answer
    must not grow (review R6: an endless answer held a worker, reading, until the deadline)."""
    scheme, host, port, path = split_url(url)
    if allowed_hosts is not None and host.lower() not in {h.lower() for h in allowed_hosts}:
        raise Fail("host %s is not in the allowed hosts" % host)
    if body is not None and not isinstance(body, bytes):
        body = body.encode("utf-8")
    place = (scheme, host, port, context)
    conn = _idle.take(place, timeout) if keep_alive else None
    kept = conn is not None
    if conn is None:
        conn = _connection(place, timeout)
    watch = _deadlines.watch(conn, timeout)
    try:
        wire = _request_bytes(place, method, path, headers or {}, body)
        try:
            _connect(conn)
            conn.sock.sendall(wire)
        except ConnectionError:
            if not kept or watch.cut:
                raise
            # Closed at the other end while idle, found out while sending: the upstream never had the
            # whole request. Once it is sent, an error (even "closed without an answer") is never resent
            # here: the upstream may have acted on it, and the caller's retry decides.
            conn.close()
            conn = watch.conn = _connection(place, timeout)
            _connect(conn)
            conn.sock.sendall(wire)
        reader = _Reader(conn.sock)
        status, head, length, closes = _read_head(reader, method)
        data, whole = _read_body(reader, length, max_body, keep)
        if watch.cut:  # an answer without a length ends at EOF: the cut would look like its end
            raise socket.timeout("cut off")
        _deadlines.forget(watch)
        if keep_alive and whole and not closes and not reader.buf:
            _idle.put(place, conn)  # never one holding bytes past the answer: nobody asked for them
            conn = None
        return Reply(status, head, data)
    except (OSError, http.client.HTTPException) as e:
        if watch.cut:
            raise NetworkError("%s %s:%d: no complete answer within %gs" % (method, host, port, timeout))
        raise NetworkError("%s %s:%d failed: %s" % (method, host, port, e.__class__.__name__ + (
            ": %s" % e if str(e) else "")))
    finally:
        _deadlines.forget(watch)
        if conn is not None:
            conn.close()


def _request_bytes(place, method, path, headers, body):
    """The request as it goes on the wire, in one send (head and body): the request line, Host and
    Accept-Encoding: identity (unless ``headers`` has them), Content-Length (a POST, PUT or PATCH without
    a body says 0; unless given), then ``headers`` in order; a method, path or header that could break
    the request's framing raises (as http.client would: ValueError, InvalidURL)."""
    if _BAD_METHOD.search(method):
        raise ValueError("method can't contain control characters: %r" % method)
    if _BAD_PATH.search(path):
        raise http.client.InvalidURL("URL can't contain control characters: %r" % path)
    names = {name.lower() for name in headers}
    lines = ["%s %s HTTP/1.1" % (method, path)]
    if "host" not in names:
        lines.append("Host: " + _host_header(place))
    if "accept-encoding" not in names:
        lines.append("Accept-Encoding: identity")
    if "content-length" not in names and "transfer-encoding" not in names:
        if body is not None:
            lines.append("Content-Length: %d" % len(body))
        elif method.upper() in ("PATCH", "POST", "PUT"):
            lines.append("Content-Length: 0")
    for name, value in headers.items():
        value = str(value)
        if not (name.isascii() and _HEADER_NAME.fullmatch(name)) or _BAD_VALUE.search(value):
            raise ValueError("invalid header %r: %r" % (name, value))
        lines.append("%s: %s" % (name, value))
    lines += ("", "")
    head = "\r\n".join(lines)
    try:  # the request line and names in ASCII, values in Latin-1, like http.client
        wire = head.encode("ascii")
    except UnicodeEncodeError:
        lines[0].encode("ascii")
        wire = head.encode("latin-1")
    return wire + body if body else wire


_BAD_METHOD = re.compile("[\x00-\x1f]")
_BAD_PATH = re.compile("[\x00-\x20\x7f]")
_HEADER_NAME = re.compile("[^:\\s][^:\r\n]*", re.ASCII)
_BAD_VALUE = re.compile("\n(?![ \t])|\r(?![ \t\n])")


def _host_header(place):
    """The Host header for ``place`` (the port only when not the scheme's default; IPv6 in brackets)."""
    scheme, host, port, _ = place
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        host = host.encode("idna").decode("ascii")
    if ":" in host:
        host = "[%s]" % host.split("%", 1)[0]
    return host if port == (443 if scheme == "https" else 80) else "%s:%d" % (host, port)


class _Reader:
    """One answer read off a socket through one buffer (``buf``: what was received and not yet taken):
    lines for the head and the chunk sizes, then the body. A kept connection is reused only when
    nothing is left in it."""

    __slots__ = ("sock", "buf")

    def __init__(self, sock):
        self.sock, self.buf = sock, bytearray()

    def line(self, what):
        """The next line without its line ending, or None at EOF; one longer than MAX_LINE raises."""
        buf = self.buf
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end > MAX_LINE:
                raise http.client.LineTooLong(what)
            if end >= 0:
                line = bytes(buf[:end])
                del buf[:end + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(buf) > MAX_LINE:
                raise http.client.LineTooLong(what)
            start = len(buf)
            data = self.sock.recv(RECV_SIZE)
            if not data:
                return None
            buf += data

    def take(self, n):
        """Up to ``n`` bytes: the buffered ones, then from the socket until ``n`` or its EOF."""
        first = bytes(self.buf[:n])
        del self.buf[:n]
        parts, got = [first], len(first)
        while got < n:
            data = self.sock.recv(min(RECV_SIZE, n - got))
            if not data:
                break
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)


MAX_LINE = 65536  # bytes in one line of an answer's head (http.client's bound)
MAX_HEADERS = 100  # header lines in an answer's head, or in a chunked answer's trailer
RECV_SIZE = 65536


def _read_head(reader, method):
    """(status, headers as an http.client.HTTPMessage, body length, whether the upstream closes the
    connection after it): the length is an int, "chunked", or -1 for a body that ends at EOF (no length
    given; the upstream closes then). A 100 Continue before the answer is skipped;
    1xx, 204, 304 and the answer to a HEAD have no body. Raises http.client's exceptions (an HTTPException
    or an OSError) for what is not an HTTP/1.x answer."""
    while True:
        line = reader.line("status line")
        if line is None:
            raise http.client.RemoteDisconnected("Remote end closed connection without response")
        text = str(line, "iso-8859-1")
        parts = text.split(None, 2)
        version, code = (parts + ["", ""])[:2] if len(parts) >= 2 else ("", "")
        if not version.startswith("HTTP/"):
            raise http.client.BadStatusLine(text)
        try:
            status = int(code)
        except ValueError:
            raise http.client.BadStatusLine(text)
        if not 100 <= status <= 999:
            raise http.client.BadStatusLine(text)
        if version == "HTTP/1.0" or version.startswith("HTTP/0."):
            version = 10
        elif version.startswith("HTTP/1."):
            version = 11
        else:
            raise http.client.UnknownProtocol(version)
        head = _read_headers(reader)
        if status != 100:
            break
    closes = _closes(head, version)
    if status in (204, 304) or 100 <= status < 200 or method == "HEAD":
        return status, head, 0, closes
    coding = head.get("transfer-encoding")
    if coding and coding.lower() == "chunked":
        return status, head, "chunked", closes
    try:
        length = int(head.get("content-length") or "")
    except ValueError:
        length = -1
    return (status, head, length, closes) if length >= 0 else (status, head, -1, True)


def _read_headers(reader):
    """The header lines up to the blank line (or EOF), folded lines joined, as an HTTPMessage. Every
    line counts against MAX_HEADERS, folded and colon-less ones too (as http.client counts them)."""
    fields = []
    for count in range(MAX_HEADERS + 1):
        line = reader.line("header line")
        if not line:
            break
        if count == MAX_HEADERS:
            raise http.client.HTTPException("got more than %d headers" % MAX_HEADERS)
        text = str(line, "iso-8859-1")
        if text[0] in " \t":
            if fields:
                fields[-1][1] += " " + text.strip(" \t")
            continue
        name, colon, value = text.partition(":")
        if colon:
            fields.append([name, value.strip(" \t")])
    head = http.client.HTTPMessage()
    for name, value in fields:
        head[name] = value
    return head


def _read_body(reader, length, max_body, keep=None):
    """(the answer's body, whether it was read to its end): ``length`` bytes, chunked, or (-1) up to EOF;
    more than ``max_body`` bytes is a Retry; one cut short (before its Content-Length, a chunk or the last
    chunk) an IncompleteRead. With ``keep``, the body is read in pieces whatever its size and only its
    first ``keep`` bytes are kept; past ``keep`` + KEEP_DRAIN bytes the reading stops (not whole)."""
    body = _Body(max_body, keep)
    try:
        if length == "chunked":
            _read_chunked(reader, body)
        elif length < 0:
            while body.add(reader.take(RECV_SIZE)) == RECV_SIZE:
                pass
        else:
            if keep is None and length > max_body:
                raise Retry("upstream answer larger than %d bytes" % max_body)
            _read_exactly(reader, length, body)
    except _Enough:
        return b"".join(body.parts), False
    return b"".join(body.parts), True


KEEP_DRAIN = 1 << 20  # bytes of an answer read past ``keep`` (and dropped) before the reading stops


class _Enough(Exception):
    """More of an answer than ``keep`` + KEEP_DRAIN bytes: the caller has what it keeps."""


class _Body:
    """An answer's body as it is read: its pieces (the first ``keep`` bytes of them with ``keep``; else all,
    a Retry past ``max_body``) and how many bytes were read."""

    __slots__ = ("parts", "got", "max_body", "keep")

    def __init__(self, max_body, keep):
        self.parts, self.got, self.max_body, self.keep = [], 0, max_body, keep

    def add(self, data):
        """Take ``data``; returns its length."""
        if self.keep is None:
            if self.got + len(data) > self.max_body:
                raise Retry("upstream answer larger than %d bytes" % self.max_body)
            self.parts.append(data)
        elif self.got < self.keep:
            self.parts.append(data[:self.keep - self.got])
        self.got += len(data)
        if self.keep is not None and self.got > self.keep + KEEP_DRAIN:
            raise _Enough()
        return len(data)


def _read_exactly(reader, n, body):
    """``n`` bytes into ``body``, RECV_SIZE at most at a time; fewer before EOF is an IncompleteRead."""
    while n > 0:
        got = body.add(reader.take(min(n, RECV_SIZE)))
        if got < min(n, RECV_SIZE):
            raise http.client.IncompleteRead(b"".join(body.parts), n - got)
        n -= got


def _read_chunked(reader, body):
    while True:
        line = reader.line("chunk size")
        try:
            size = int(line.split(b";", 1)[0], 16)
        except (AttributeError, ValueError):  # None: EOF
            raise http.client.IncompleteRead(b"".join(body.parts))
        if size < 0:
            raise http.client.IncompleteRead(b"".join(body.parts))
        if size == 0:
            break
        if body.keep is None and body.got + size > body.max_body:
            raise Retry("upstream answer larger than %d bytes" % body.max_body)
        _read_exactly(reader, size, body)
        if reader.line("chunk end") is None:
            raise http.client.IncompleteRead(b"".join(body.parts))
    for _ in range(MAX_HEADERS + 1):  # the trailer, read and dropped
        if not reader.line("trailer line"):
            return
    raise http.client.HTTPException("got more than %d trailer lines" % MAX_HEADERS)


def _closes(head, version):
    """True when the upstream closes the connection after this answer (http.client's rule)."""
    conn = (head.get("connection") or "").lower()
    if version == 11:
        return "close" in conn
    return not (head.get("keep-alive") or "keep-alive" in conn or
                "keep-alive" in (head.get("proxy-connection") or "").lower())


def _connection(place, timeout):
    scheme, host, port, context = place
    if scheme == "https":
        with proc.may_open_inheritable():  # OpenSSL reads the CA files with fopen(path, "r")
            return http.client.HTTPSConnection(host, port, timeout=timeout,
                                               context=context or ssl.create_default_context())
    return http.client.HTTPConnection(host, port, timeout=timeout)


def _connect(conn):
    """Open ``conn`` unless it is open; a new https connection inside ``proc.may_open_inheritable``:
    verifying the upstream's certificate, OpenSSL may open a CA file without close-on-exec, which a
    child started meanwhile by posix_spawn would keep."""
    if conn.sock is None:
        if isinstance(conn, http.client.HTTPSConnection):
            with proc.may_open_inheritable():
                conn.connect()
        else:
            conn.connect()



class _Idle:
    """Kept-alive connections not in use, per (scheme, host, port, TLS context): at most MAX_IDLE of
    each, none idle longer than IDLE_SECONDS (upstreams drop idle connections after a few seconds): the
    deadlines thread closes those that have been (``close_stale``), also to a place nobody calls again
    (a URL a reload removed), whose connections ``take`` never sees."""

    MAX_IDLE = 8
    IDLE_SECONDS = 2.0

    def __init__(self):
        self._conns, self._lock = {}, threading.Lock()  # place -> [(conn, idle since)]

    def take(self, place, timeout):
        """The most recently used idle connection to ``place`` (its timeout set to ``timeout``), or None.
        One that is readable while idle is dropped: the upstream closed it (EOF), or sent bytes nobody
        asked for, which must never be read as the answer to the next request."""
        stale = []
        try:
            with self._lock:
                kept = self._conns.get(place) or []
                while kept:
                    conn, since = kept.pop()
                    if time.monotonic() - since < self.IDLE_SECONDS and _quiet(conn.sock):
                        conn.timeout = timeout
                        conn.sock.settimeout(timeout)
                        return conn
                    stale.append(conn)
                return None
        finally:
            for conn in stale:
                conn.close()

    def put(self, place, conn):
        with self._lock:
            kept = self._conns.setdefault(place, [])
            if len(kept) < self.MAX_IDLE:
                kept.append((conn, time.monotonic()))
                return
        conn.close()

    def close_stale(self):
        """Close every connection idle for IDLE_SECONDS or longer, and forget places with none left."""
        now, stale = time.monotonic(), []
        with self._lock:
            for place, kept in list(self._conns.items()):
                while kept and now - kept[0][1] >= self.IDLE_SECONDS:  # oldest first: put appends
                    stale.append(kept.pop(0)[0])
                if not kept:
                    del self._conns[place]
        for conn in stale:
            conn.close()


def _quiet(sock):
    """Nothing to read on an idle connection: no EOF, no stray bytes (TLS: none decrypted and waiting)."""
    if sock is None or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
        return False
    poller = select.poll()  # not select(): a daemon with many connections has descriptors past 1023
    try:
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


_idle = _Idle()


class _Watch:
    """One request's connection, its deadline (time.monotonic()), and whether it was cut off."""

    __slots__ = ("conn", "deadline", "cut")

    def __init__(self, conn, deadline):
        self.conn, self.deadline, self.cut = conn, deadline, False


class _Deadlines:
    """One thread, started with the first request, that cuts off every request whose deadline has passed,
    looking ten times a second (a timer thread per request cost a worker ~1.3 ms per forward), and closes
    the kept connections idle too long (``_Idle.close_stale``)."""

    RESOLUTION = 0.1  # seconds; a request's timeout holds to within this

    def __init__(self):
        self._watches, self._lock, self._thread = {}, threading.Lock(), None

    def watch(self, conn, timeout):
        watch = _Watch(conn, time.monotonic() + timeout)
        with self._lock:
            self._watches[id(watch)] = watch
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hookd-client-deadlines", daemon=True)
                self._thread.start()
        return watch

    def forget(self, watch):
        with self._lock:
            self._watches.pop(id(watch), None)

    def _run(self):
        while True:
            time.sleep(self.RESOLUTION)
            now = time.monotonic()
            with self._lock:
                due = [w for w in self._watches.values() if w.deadline <= now]
                for w in due:
                    del self._watches[id(w)]
            for w in due:
                _cut_off(w)
            _idle.close_stale()


_deadlines = _Deadlines()


def _cut_off(watch):
    """The deadline passed: shut the socket (the plain socket's shutdown, also under TLS), so the blocked
    read returns at once."""
    watch.cut = True
    sock = watch.conn.sock
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def retry_after(reply):
    """The upstream's Retry-After in whole seconds (capped), or None when absent or not a number."""
    value = (reply.headers.get("Retry-After") or "").strip() if reply.headers else ""
    return min(int(value), MAX_RETRY_AFTER) if value.isdigit() else None


def excerpt(body, limit=200):
    """The start of an answer's body as one printable line, for an error message."""
    text = body[:limit].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()


def check(reply, what, refused="", other=Fail):
    """The one status mapping: return ``reply`` when it is 2xx, else raise. ``what`` names the call in the
    message ("iconik analyze"); ``refused`` says what to check when the credentials were refused;
    ``other`` is the exception class for statuses no rule covers (400, 404, 409, 422, ...)."""
    if reply.ok:
        return reply
    said = excerpt(reply.body)
    message = "%s answered %d%s" % (what, reply.status, ": " + said if said else "")
    if reply.status in REFUSED:
        raise Fail("%s answered %d: the credentials were refused%s" % (
            what, reply.status, "; check " + refused if refused else ""))
    if reply.status in TRANSIENT or reply.status >= 500:
        raise Retry(message, after=retry_after(reply))
    if 300 <= reply.status < 400:
        raise Retry("%s answered %d; redirects are not followed" % (what, reply.status))
    raise other(message)


class Api:
    """The base of each vendor's client class: ``call(method, path)`` on ``base`` + path, only to the
    base URL's host, with ``headers()`` on every call and ``timeout`` as each call's whole deadline."""

    def __init__(self, base, timeout=30):
        self.base = (base or "").rstrip("/")
        self.host = urllib.parse.urlsplit(self.base).hostname or ""
        self.timeout = timeout

    def headers(self):
        """Headers sent with every call (authentication, Accept); override."""
        return {}

    def call(self, method, path, body=None, headers=None, content_type="application/json",
             max_body=MAX_REPLY):
        """One call; returns the Reply whatever its status (callers map it with ``check``). A dict or
        list ``body`` is sent as JSON."""
        h = dict(self.headers())
        if body is not None:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            h["Content-Type"] = content_type
        h.update(headers or {})
        return request(method, self.base + path, headers=h, body=body, timeout=self.timeout,
                       allowed_hosts=[self.host], max_body=max_body)
