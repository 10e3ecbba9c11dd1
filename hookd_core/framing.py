"""Reading a request body by hand: Content-Length or chunked, strictly, within a size limit.

Strategy (after gunicorn's ``set_body_reader`` and h11's ``ChunkedReader``): decide the framing once from
the headers, then read exactly that. Anything ambiguous is refused rather than guessed, because two
parsers that guess differently are how request smuggling happens (RFC 9112 §6.1, §6.3, §7.1):
  - Transfer-Encoding and Content-Length together: 400 (a CL.TE desync vector);
  - chunked on HTTP/1.0: 400 (1.0 has no chunked; a proxy may read it differently);
  - a coding other than ``chunked``: 501 (hookd decodes nothing else; the sender should not gzip);
  - a repeated or non-digit Content-Length: 400;
  - chunk sizes that are not plain hex (``6_0``, ``+5``, ``-5``, ``0x5``, spaces): 400, because Python's
    ``int(x, 16)`` accepts several of them;
  - the CRLF after each chunk's data is checked, not skipped;
  - trailers are read to the empty line and dropped.
Every line is read with a length cap, so a client cannot make hookd buffer an endless line.
"""

import re

from .api import BadFraming, BodyTooLarge, Reject

MAX_CHUNK_LINE = 4096      # size + extensions; h11 allows 20 hex digits, extensions are rarely used at all
MAX_TRAILER_BYTES = 16384  # trailers are discarded; more than this is abuse (h11 caps a head at 16 KiB)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(r"[0-9]{1,18}")


class UnsupportedCoding(Reject):
    status = 501


class LengthRequired(Reject):
    status = 411


class ClientGone(Exception):
    """The connection ended (or read_timeout shut it) before the body was complete."""


def body_framing(headers, request_version, max_body):
    """Decide how the body is framed: ("length", n) or ("chunked", None). Raises Reject."""
    te_values = headers.get_all("Transfer-Encoding") or []
    cl_values = headers.get_all("Content-Length") or []
    if te_values:
        if cl_values:
            raise BadFraming("both Transfer-Encoding and Content-Length")
        codings = [c.strip().lower() for v in te_values for c in v.split(",") if c.strip()]
        if any(c != "chunked" for c in codings):
            raise UnsupportedCoding("transfer coding %r not supported" % ",".join(codings))
        if len(codings) != 1:
            raise BadFraming("chunked applied more than once")
        if request_version != "HTTP/1.1":
            raise BadFraming("chunked body on %s" % request_version)
        return "chunked", None
    if not cl_values:
        raise LengthRequired("neither Content-Length nor chunked body")
    if len(cl_values) != 1:
        raise BadFraming("repeated Content-Length")
    value = cl_values[0].strip()
    if not _DIGITS.fullmatch(value):
        raise BadFraming("Content-Length is not a number")
    length = int(value)
    if length > max_body:
        raise BodyTooLarge("Content-Length %d over max_body %d" % (length, max_body))
    return "length", length


def read_body(rfile, framing, length, max_body):
    """Read the body as framed; returns bytes. Raises BadFraming, BodyTooLarge or ClientGone."""
    if framing == "length":
        data = rfile.read(length) if length else b""
        if len(data) != length:
            raise ClientGone("body ended after %d of %d bytes" % (len(data), length))
        return data
    return read_chunked(rfile, max_body)


def read_chunked(rfile, max_body):
    """Decode a chunked body (RFC 9112 §7.1) from a buffered binary file."""
    parts, total = [], 0
    while True:
        size = _chunk_size(_line(rfile, MAX_CHUNK_LINE))
        if size == 0:
            _skip_trailers(rfile)
            return b"".join(parts)
        total += size
        if total > max_body:
            raise BodyTooLarge("chunked body over max_body %d" % max_body)
        data = rfile.read(size)
        if len(data) != size:
            raise ClientGone("chunk ended after %d of %d bytes" % (len(data), size))
        if rfile.read(2) != b"\r\n":
            raise BadFraming("chunk data not followed by CRLF")
        parts.append(data)


def _line(rfile, limit):
    """One CRLF-terminated line without its CRLF; an over-long line or a bare LF is an error."""
    line = rfile.readline(limit + 1)
    if not line:
        raise ClientGone("connection closed inside a chunked body")
    if len(line) > limit:
        raise BadFraming("chunk line longer than %d bytes" % limit)
    if not line.endswith(b"\r\n"):
        if line.endswith(b"\n"):
            raise BadFraming("chunk line ends with a bare LF")
        raise ClientGone("connection closed inside a chunk line")
    return line[:-2]


def _chunk_size(line):
    """The size before any ';extension'; strict hex (RFC 9112: chunk-size = 1*HEXDIG)."""
    size = line.split(b";", 1)[0]
    if not _HEX.fullmatch(size):
        raise BadFraming("bad chunk size %r" % size[:20])
    ext = line[len(size):]
    if b"\0" in ext or b"\r" in ext or b"\n" in ext:
        raise BadFraming("control character in chunk extension")
    return int(size, 16)


def _skip_trailers(rfile):
    """Read trailer fields up to the empty line and drop them (RFC 9112 §7.1.2)."""
    seen = 0
    while True:
        line = _line(rfile, MAX_CHUNK_LINE)
        if not line:
            return
        seen += len(line) + 2
        if seen > MAX_TRAILER_BYTES:
            raise BadFraming("trailers over %d bytes" % MAX_TRAILER_BYTES)
        if b":" not in line or line[:1] in (b" ", b"\t"):
            raise BadFraming("malformed trailer line")
