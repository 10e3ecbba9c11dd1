"""The request reader: hookd's own HTTP/1.1 parser, bytes in, one buffered read path, strict.

Strategy (after h11's ``_readers.py`` and gunicorn's ``message.py``; RFC 9112): ``Reader`` owns one
connection's receive buffer and yields requests in order. It receives with the socket's own
``recv_into`` into one buffer per connection (8 KiB: one call usually holds a whole request, head and
body, and what follows it stays buffered for the next request; a longer body is received straight
into its own bytes). ``head()`` takes the head from the buffer (and yields it as an ``api.Request``): a whole head with CRLF
line ends is checked in one match over the block (request line and every field line; the common case),
and anything else (a head still arriving, bare LF line ends, leading empty lines, a head that does not
match) is read and checked line by line, which also says why a head is refused; both ways within
``max_header_bytes`` (and 100 header lines; 431 beyond). A sender's heads on one connection mostly begin
with the same lines (request line, Host, Content-Type): once two heads read whole began with the same lines,
a head that begins with those bytes has only its other lines matched (each line is judged alone, so the
same bytes get the same verdict). ``body()`` decides the framing once from the
head, says ``100 Continue`` when the client waits for it, and reads exactly that body. ``unread`` tells
whether a body is still on the wire: the server closes the connection after any answer given while
``unread`` is true, so an unread body is never parsed as the next request. Anything ambiguous is
refused rather than guessed, because two parsers that guess differently are how request smuggling
happens:
  - request line ``METHOD SP TARGET SP HTTP/1.x``: else 400 (505 for another HTTP version);
  - a bare LF ends a line like CRLF; a CR not followed by LF anywhere in the head: 400;
  - header names are tokens, no whitespace before the colon, no obs-fold; values hold only VCHAR, SP,
    HTAB and 0x80-0xFF, and only SP and HTAB are trimmed (never VT, FF, NBSP, NEL): else 400;
  - HTTP/1.1 with no Host, or any request with two: 400;
  - Transfer-Encoding and Content-Length together: 400 (a CL.TE desync vector);
  - chunked on HTTP/1.0: 400 (1.0 has no chunked; a proxy may read it differently);
  - a coding other than exactly ``chunked``: 501 (hookd decodes nothing else; the sender should not gzip);
  - a repeated or non-digit Content-Length: 400; a POST with neither: 411, unless its route takes
    such requests as bodiless (Preservica's challenge), and then the connection closes after the answer;
  - chunk sizes that are not plain hex (``6_0``, ``+5``, ``-5``, ``0x5``, spaces): 400, because Python's
    ``int(x, 16)`` accepts several of them;
  - the CRLF after each chunk's data is checked, not skipped;
  - trailers are read to the empty line and dropped.
Every line is read with a length cap, so a client cannot make hookd buffer an endless line.
"""

import re

from .api import BadFraming, BodyTooLarge, Headers, Reject, Request

MAX_HEADER_LINES = 100
MAX_CHUNK_LINE = 4096      # size + extensions; h11 allows 20 hex digits, extensions are rarely used at all
MAX_TRAILER_BYTES = 16384  # trailers are discarded; more than this is abuse (h11 caps a head at 16 KiB)
LEARNS = 4                 # see Reader._learn
LEARN_BYTES = 4096         # a head longer than this is not remembered between requests (Reader._learn)
RECV_SIZE = 8192           # one receive's buffer per connection; what is buffered is at most this beyond one line
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
# A whole chunk line as _chunk_size takes it: the size, any extensions without NUL, CR or LF, CRLF.
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\r\n\x00]*)?\r\n")
# The CRLF that ends a chunk's data and the next chunk line, in one match.
_CHUNK_END_AND_LINE = re.compile(rb"\r\n([0-9A-Fa-f]{1,16})(?:;[^\r\n\x00]*)?\r\n")
_DIGITS = re.compile(r"[0-9]{1,18}")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_OTHER_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
# A whole field line: token ":" OWS value OWS (CR)LF, the value being runs of VCHAR and obs-text separated
# by SP/HTAB (RFC 9110 5.5), so one match both checks the line and trims the value. The trailing OWS is
# only allowed after a non-empty value: with an empty value, two OWS in a row could split a run of
# blanks in n ways, and a line of 16 KiB of blanks ending in a bad byte would cost seconds (quadratic
# backtracking); this way every run of blanks has one reading and a failing match stays linear.
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*"
                    rb"(?:([\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)[ \t]*)?\r?\n")
# The same rules over a whole head with CRLF line ends, decoded as latin-1 (one character per byte, so
# names and values come out as str): the request line, then each field line, which must start right
# after a LF. A field match holds exactly one LF (its last byte), so as many matches as the block has
# LFs means every line matched whole; anything else goes through the line-by-line path for its reason.
_REQUEST_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) (HTTP/1\.[01])\r\n")
_FIELD_LINE = re.compile(r"(?<=\n)([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*"
                         r"(?:([\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)[ \t]*)?\r\n")
_BODY_METHODS = ("POST", "PUT", "PATCH")


class BadRequest(Reject):
    status = 400


class HeadTooLarge(Reject):
    status = 431


class VersionNotSupported(Reject):
    status = 505


class UnsupportedCoding(Reject):
    status = 501


class LengthRequired(Reject):
    status = 411


class ClientGone(Exception):
    """The connection ended (or read_timeout shut it) before the request was complete."""


class Reader:
    """One connection's requests, in order: ``head()``, then at most one ``body()`` per head.
    ``recv_into`` is the socket's (``recv_into(buffer)``: the number of bytes received into it, 0 at the
    end of the stream)."""

    def __init__(self, recv_into, max_header_bytes, send_continue=None):
        self.recv_into, self.max_header_bytes, self.send_continue = recv_into, max_header_bytes, send_continue
        self.unread = False
        self._head = None
        self._data, self._pos = bytearray(), 0  # received, and how much of it is used
        self._receive = bytearray(RECV_SIZE)  # reused by every receive, so none allocates
        # The first lines this connection's heads begin with, checked once (``_learn``): (their bytes,
        # method, target, version, (their fields, their Headers index), (path, query string)), or None;
        # the last head read whole, as text; how many times more a head that does not begin with them
        # may be compared with the last one.
        self._known, self._last, self._learns = None, None, LEARNS

    def head(self):
        """The next request's head, or None at a clean end of stream (or a read_timeout cut) before
        its first byte. Raises BadRequest, HeadTooLarge, VersionNotSupported or ClientGone."""
        self.unread, self._head = False, None
        data, pos = self._data, self._pos
        if pos == len(data):
            if not self._fill():
                return None
            data, pos = self._data, 0
        end = data.find(b"\r\n\r\n", pos, pos + self.max_header_bytes)
        if end >= 0:  # the whole head is here: the common case in two matches
            known = self._known
            if known is not None and data.startswith(known[0], pos):  # the connection's usual first lines
                text = data[pos + len(known[0]) - 1:end + 2].decode("latin-1")  # from their last LF on
                items = _FIELD_LINE.findall(text, 1)
                if len(items) == text.count("\n", 1) and len(items) + len(known[4][0]) <= MAX_HEADER_LINES:
                    self._pos, self._learns = end + 4, LEARNS
                    return self._parsed(known[1], known[2], known[3], Headers(items, known[4]), known[5])
            text = data[pos:end + 2].decode("latin-1")
            m = _REQUEST_LINE.match(text)
            if m is not None:
                method, target, version = m.groups()
                fields = m.end()
                items = _FIELD_LINE.findall(text, fields)
                if len(items) == text.count("\n", fields) and len(items) <= MAX_HEADER_LINES \
                        and _target_ok(method, target):
                    self._pos = end + 4
                    if self._learns and len(text) <= LEARN_BYTES:
                        self._learn(text, method, target, version, items)
                    return self._parsed(method, target, version, Headers(items), _split_target(target))
        return self._head_by_lines()

    def _learn(self, text, method, target, version, items):
        """After a head read whole (``text``, every line checked): the lines it begins with that the last
        such head began with too, the request line first, become ``_known``, and a later head that begins
        with their bytes has only its other lines checked: they are the same bytes, and each line is
        judged alone. Comparing costs about what a head that begins with them saves, so a connection
        whose heads keep differing compares only LEARNS times more after its last such head."""
        last, self._last = self._last, text
        if last is None:
            return
        self._learns -= 1
        same = 0
        while True:
            eol = text.find("\n", same) + 1
            if not eol or text[same:eol] != last[same:eol]:
                break
            same = eol
        if same:
            before = Headers(items[:text.count("\n", 0, same) - 1])
            self._known = (text[:same].encode("latin-1"), method, target, version, (before.items(), before.first),
                           _split_target(target))

    def _head_by_lines(self):
        """``head`` one line at a time: a head still arriving, or one that is not plain."""
        budget = [self.max_header_bytes]
        line = self._line(budget, first=True)
        while line == b"":  # RFC 9112 §2.2: empty lines before a request line are ignored
            line = self._line(budget)
        if line is None:
            return None
        parts = line.split(b" ")
        if len(parts) != 3:
            raise BadRequest("request line is not METHOD SP TARGET SP VERSION")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            if _OTHER_VERSION.fullmatch(version):
                raise VersionNotSupported("HTTP version %s not supported" % version.decode("ascii"))
            raise BadRequest("bad HTTP version")
        if not _TOKEN.fullmatch(method):
            raise BadRequest("method is not a token")
        if not _TARGET.fullmatch(target) or not _target_ok(method.decode("ascii"), target.decode("ascii")):
            raise BadRequest("bad request target")
        items, readline, field, left = [], self._readline, _FIELD.fullmatch, budget[0]
        while True:  # one regex per line; _refuse says why a line does not match
            raw = readline(left + 1)
            m = field(raw) if len(raw) <= left else None
            if m is None:
                if (raw == b"\r\n" or raw == b"\n") and len(raw) <= left:
                    break
                budget[0] = left
                self._refuse(raw, budget)
            left -= len(raw)
            if len(items) >= MAX_HEADER_LINES:
                raise HeadTooLarge("more than %d header lines" % MAX_HEADER_LINES)
            name, value = m.group(1, 2)
            items.append((name.decode("ascii"), value.decode("latin-1") if value else ""))
        target = target.decode("ascii")
        return self._parsed(method.decode("ascii"), target, version.decode("ascii"), Headers(items),
                            _split_target(target))

    def _parsed(self, method, target, version, headers, path_and_query):
        """The head as an ``api.Request`` (the server fills in its query, body and client): with the path
        and query string split from the target, whether the connection stays open, whether the client
        waits for 100 Continue. The headers that frame the body are looked up here once."""
        first = headers.first
        if headers.repeated:  # a name came twice: the framing headers are judged by all their values
            by_name = headers.by_name
            hosts, connection = by_name.get("host"), by_name.get("connection")
            te, cl = by_name.get("transfer-encoding"), by_name.get("content-length")
        else:  # each name once (nearly every request): one value each, no index of lists built
            hosts, connection, te, cl = (first.get("host"), first.get("connection"), first.get("transfer-encoding"),
                                         first.get("content-length"))
            hosts = hosts if hosts is None else [hosts]
            connection = connection if connection is None else [connection]
            te = te if te is None else [te]
            cl = cl if cl is None else [cl]
        if (len(hosts) != 1) if hosts else version == "HTTP/1.1":
            raise BadRequest("more than one Host header" if hosts else "HTTP/1.1 request without Host")
        path, query = path_and_query
        tokens = {t.strip(" \t").lower() for v in connection for t in v.split(",")} if connection else ()
        expect = first.get("expect")
        self._head = Request(method, path, None, headers, None, None, target, query, version,
                             "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens,
                             version == "HTTP/1.1" and expect is not None and
                             expect.strip(" \t").lower() == "100-continue")
        self._te, self._cl = te, cl
        self.unread = te is not None or (cl is not None and cl != ["0"])
        return self._head

    def _refuse(self, raw, budget):
        """Raise the reason a header line does not match _FIELD (the slow path of ``head``): the end of
        the stream (ClientGone), the budget (431), a bare CR, obs-fold, no colon, a name that is not a
        token, or a control byte in the value (400)."""
        line = self._strip(raw, budget)
        if line[:1] in (b" ", b"\t"):
            raise BadRequest("obs-fold (a header line starting with whitespace)")
        name, colon, value = line.partition(b":")
        if not colon:
            raise BadRequest("header line without a colon")
        if not _TOKEN.fullmatch(name):
            raise BadRequest("header name is not a token (or whitespace before the colon)")
        raise BadRequest("control character in header %s" % name[:40].decode("ascii"))

    def _line(self, budget, first=False):
        """One head line without its line end; None at end of stream before the first byte of a
        request. A CR not followed by LF is 400; more than the budget left is 431."""
        return self._strip(self._readline(budget[0] + 1), budget, first)

    def _strip(self, raw, budget, first=False):
        """``raw`` (a line as read) without its line end, taken from the budget."""
        if not raw:
            if first:
                return None
            raise ClientGone("connection closed inside the request head")
        if len(raw) > budget[0]:
            raise HeadTooLarge("request head over max_header_bytes %d" % self.max_header_bytes)
        budget[0] -= len(raw)
        if raw[-1:] != b"\n":
            raise ClientGone("connection closed inside the request head")
        line = raw[:-2] if raw[-2:] == b"\r\n" else raw[:-1]
        if b"\r" in line:
            raise BadRequest("CR not followed by LF in the request head")
        return line

    def body(self, max_body, unframed_ok=False):
        """The body of the last head, read whole (b"" when it has none); says 100 Continue first when
        the client waits for it. A POST with neither Content-Length nor Transfer-Encoding is 411, or,
        with ``unframed_ok`` (a route that takes such requests), an empty body (RFC 9112 §6.3: a request
        without either has none). Either way ``unread`` stays true, so the connection is closed after
        the answer and whatever the client sends after the head is never read as a request.
        Raises Reject (the framing), or ClientGone."""
        req = self._head
        kind, length = _framing(self._te, self._cl, req.version, max_body)
        if kind is None:
            if req.method in _BODY_METHODS:  # a body delimited by closing may follow: never read it as a request
                self.unread = True
                if unframed_ok:
                    return b""
                raise LengthRequired("neither Content-Length nor chunked body")
            return b""
        if req.expect_continue and self.send_continue is not None:
            self.send_continue()
        if kind == "length":
            data = self._read(length)
            if len(data) != length:
                raise ClientGone("body ended after %d of %d bytes" % (len(data), length))
        else:
            data = self._chunked(max_body)
        self.unread = False
        return data

    def _chunked(self, max_body):
        """Decode a chunked body (RFC 9112 §7.1). A chunk line already in the buffer is taken with one
        match (what _chunk_size accepts, within MAX_CHUNK_LINE); anything else is read line by line, which
        also says why a line is refused. The chunks are copied into one buffer as they come: a list of
        parts held an object per chunk, ~160 bytes a body byte for 1-byte chunks (review R1). A body that
        is in the buffer whole (the usual case) is taken by ``_buffered_chunks`` first."""
        body = self._buffered_chunks(max_body)
        if body is not None:
            return body
        body, total, chunk_line = bytearray(), 0, _CHUNK_LINE.match
        while True:
            m = chunk_line(self._data, self._pos, self._pos + MAX_CHUNK_LINE)
            if m is not None:
                self._pos = m.end()
                size = int(m.group(1), 16)
            else:
                size = _chunk_size(self._chunk_line())
            if size == 0:
                if self._data[self._pos:self._pos + 2] == b"\r\n":  # no trailers (the common case)
                    self._pos += 2
                else:
                    self._skip_trailers()
                return bytes(body)
            total += size
            if total > max_body:
                raise BodyTooLarge("chunked body over max_body %d" % max_body)
            buffered, pos = self._data, self._pos
            end = pos + size
            if end + 2 <= len(buffered):  # the chunk and its CRLF are here already (the common case)
                data, crlf = buffered[pos:end], buffered[end:end + 2]
                self._pos = end + 2
            else:
                data = self._read(size)
                if len(data) != size:
                    raise ClientGone("chunk ended after %d of %d bytes" % (len(data), size))
                crlf = self._read(2)
            if crlf != b"\r\n":
                raise BadFraming("chunk data not followed by CRLF")
            body += data

    def _buffered_chunks(self, max_body):
        """The chunked body when all of it, to its last chunk and the empty line after it (no trailers),
        is in the buffer already; else None, with nothing taken, and ``_chunked`` reads it and says why it
        refuses it. One match a chunk: the CRLF after a chunk's data is checked with the next chunk line
        (what ``_chunked`` checks with a match, a slice and a comparison), and a plain ``0`` last chunk
        with no trailers after the CRLF is one comparison. The chunks' bytes are joined once at the end."""
        data, pos = self._data, self._pos
        m = _CHUNK_LINE.match(data, pos, pos + MAX_CHUNK_LINE)
        if m is None:
            return None
        parts, total = [], 0
        while True:
            start, size = m.end(), int(m[1], 16)
            if not size:
                if data.startswith(b"\r\n", start):
                    self._pos = start + 2
                    return b"".join(parts)
                return None  # trailers
            total += size
            if total > max_body:
                return None
            end = start + size
            parts.append(data[start:end])
            if data.startswith(b"\r\n0\r\n\r\n", end):
                self._pos = end + 7
                return b"".join(parts)
            m = _CHUNK_END_AND_LINE.match(data, end, end + 2 + MAX_CHUNK_LINE)
            if m is None:
                return None

    def _chunk_line(self):
        """One CRLF-terminated line without its CRLF; an over-long line or a bare LF is an error."""
        line = self._readline(MAX_CHUNK_LINE + 1)
        if not line:
            raise ClientGone("connection closed inside a chunked body")
        if len(line) > MAX_CHUNK_LINE:
            raise BadFraming("chunk line longer than %d bytes" % MAX_CHUNK_LINE)
        if not line.endswith(b"\r\n"):
            if line.endswith(b"\n"):
                raise BadFraming("chunk line ends with a bare LF")
            raise ClientGone("connection closed inside a chunk line")
        return line[:-2]

    def _skip_trailers(self):
        """Read trailer fields up to the empty line and drop them (RFC 9112 §7.1.2)."""
        seen = 0
        while True:
            line = self._chunk_line()
            if not line:
                return
            seen += len(line) + 2
            if seen > MAX_TRAILER_BYTES:
                raise BadFraming("trailers over %d bytes" % MAX_TRAILER_BYTES)
            if b":" not in line or line[:1] in (b" ", b"\t"):
                raise BadFraming("malformed trailer line")

    # -- the receive buffer -----------------------------------------------------------------------
    def _fill(self):
        """Receive more after what is buffered; False at the end of the stream."""
        n = self.recv_into(self._receive)
        if not n:
            return False
        chunk = self._receive[:n]
        data, pos = self._data, self._pos
        if pos == len(data):
            self._data = chunk
        else:  # a line arriving in pieces: append to what is left, never copy it all again
            del data[:pos]
            data += chunk
        self._pos = 0
        return True

    def _readline(self, limit):
        """Up to ``limit`` bytes, through the first LF; fewer only at the end of the stream."""
        data, pos = self._data, self._pos
        start = pos  # where the look for the LF goes on: what came before has none
        while True:
            end = data.find(b"\n", start, pos + limit)
            if end >= 0:
                self._pos = end + 1
                return bytes(data[pos:end + 1])
            if len(data) - pos >= limit:
                self._pos = pos + limit
                return bytes(data[pos:pos + limit])
            seen = len(data) - pos
            if not self._fill():
                self._pos = len(data)
                return bytes(data[pos:])
            data, pos = self._data, self._pos
            start = pos + seen

    def _read(self, n):
        """``n`` bytes; fewer only at the end of the stream. What is not buffered yet is received straight
        into the result (at most n bytes, which the caller bounds)."""
        data, pos = self._data, self._pos
        if len(data) - pos >= n:
            self._pos = pos + n
            return bytes(data[pos:pos + n])
        got = len(data) - pos
        out = bytearray(n)
        out[:got] = data[pos:]
        self._data, self._pos = bytearray(), 0
        with memoryview(out) as view:
            while got < n:
                k = self.recv_into(view[got:])
                if not k:
                    break
                got += k
        return bytes(out) if got == n else bytes(out[:got])


def _target_ok(method, target):
    """origin-form, absolute-form with http(s), or ``*`` for OPTIONS (RFC 9112 §3.2)."""
    return target[:1] == "/" or target.startswith(("http://", "https://")) or (target == "*" and method == "OPTIONS")


def _split_target(target):
    """(path, query string) of a request target; an absolute-form target gives its path."""
    path = target
    if target[:1] != "/" and target.startswith(("http://", "https://")):
        rest = target.split("//", 1)[1]
        path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    path, _, query = path.partition("?")
    if "#" in path:
        path = path.partition("#")[0]
    return path, query


def body_framing(headers, request_version, max_body):
    """Decide how the body is framed: ("length", n), ("chunked", None), or (None, 0) when the head
    announces no body. Raises Reject."""
    return _framing(headers.get_all("Transfer-Encoding"), headers.get_all("Content-Length"), request_version,
                    max_body)


def _framing(te_values, cl_values, request_version, max_body):
    """``body_framing`` from the Transfer-Encoding and Content-Length values (None when absent)."""
    if te_values:
        if cl_values:
            raise BadFraming("both Transfer-Encoding and Content-Length")
        if te_values == ["chunked"] and request_version == "HTTP/1.1":  # the common case, checked below too
            return "chunked", None
        codings = [c.strip(" \t").lower() for v in te_values for c in v.split(",") if c.strip(" \t")]
        if any(c != "chunked" for c in codings):
            raise UnsupportedCoding("transfer coding %r not supported" % ",".join(codings)[:80])
        if not codings:
            raise BadFraming("empty Transfer-Encoding")
        if len(codings) != 1:
            raise BadFraming("chunked applied more than once")
        if request_version != "HTTP/1.1":
            raise BadFraming("chunked body on %s" % request_version)
        return "chunked", None
    if not cl_values:
        return None, 0
    if len(cl_values) != 1:
        raise BadFraming("repeated Content-Length")
    if not _DIGITS.fullmatch(cl_values[0]):
        raise BadFraming("Content-Length is not a number")
    length = int(cl_values[0])
    if length > max_body:
        raise BodyTooLarge("Content-Length %d over max_body %d" % (length, max_body))
    return "length", length


def _chunk_size(line):
    """The size before any ';extension'; strict hex (RFC 9112: chunk-size = 1*HEXDIG)."""
    size = line.split(b";", 1)[0]
    if not _HEX.fullmatch(size):
        raise BadFraming("bad chunk size %r" % size[:20])
    ext = line[len(size):]
    if b"\0" in ext or b"\r" in ext or b"\n" in ext:
        raise BadFraming("control character in chunk extension")
    return int(size, 16)
