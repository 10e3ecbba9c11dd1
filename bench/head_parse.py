#!/usr/bin/env python3
"""CPU per request of hookd's request reader against the stdlib path it replaced, on one typical head.

Strategy: timeit over an in-memory stream, so only parsing is measured (no socket, no thread): a signed
Standard Webhooks POST as Svix sends it behind a proxy (13 header lines, a 512-byte body). "stdlib" is
what hookd did before issue 13: ``BaseHTTPRequestHandler.parse_request`` (``http.client.parse_headers``
and the ``email`` parser underneath), a walk over the parsed headers for smuggling vectors, an index of
them, the framing decision and the body read, over a buffered stream. "hookd" is ``framing.Reader``:
``head()`` then ``body()``, receiving with an in-memory stream's ``readinto`` as it does with a socket's
``recv_into``. The cost of the buffered stream alone is printed too. CPU time (process_time), best of 7 runs.

    python3 bench/head_parse.py [--number N]
"""

import argparse
import http.server
import io
import os
import re
import sys
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hookd_core import framing  # noqa: E402
from hookd_core.api import Headers  # noqa: E402

BODY = b'{"type": "invoice.paid", "data": {"id": "in_1", "pad": "' + b"x" * 460 + b'"}}'
HEAD = (b"POST /hooks/bench HTTP/1.1\r\nHost: hooks.example.org\r\nUser-Agent: Svix-Webhooks/1.24.0\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\nAccept: */*\r\n"
        b"webhook-id: msg_2KWPBgLlAfxdpx2AI54pPJ85f4W\r\nwebhook-timestamp: 1732946400\r\n"
        b"webhook-signature: v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\nAccept-Encoding: gzip\r\n"
        b"Connection: keep-alive\r\n\r\n" % len(BODY))
REQUEST = HEAD + BODY
MAX_BODY = 1 << 20
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class StdlibHandler(http.server.BaseHTTPRequestHandler):
    def __init__(self):  # parse only: no socket, no server
        pass


def stdlib_path():
    """The pre-issue-13 path: parse_request, the smuggling checks, the index, framing, body."""
    h = StdlibHandler()
    h.rfile = io.BufferedReader(io.BytesIO(REQUEST))
    h.raw_requestline = h.rfile.readline(65537)
    h.parse_request()
    if h.headers.defects or h.headers.get_payload():
        raise AssertionError("malformed")
    for name, value in h.headers.raw_items():
        if not _TOKEN.fullmatch(name) or "\r" in value or "\n" in value or "\0" in value:
            raise AssertionError("bad header")
    headers = Headers(h.headers.raw_items())
    kind, length = framing.body_framing(headers, h.request_version, MAX_BODY)
    return h.rfile.read(length)


def hookd_path():
    reader = framing.Reader(io.BytesIO(REQUEST).readinto, 16384)
    reader.head()
    return reader.body(MAX_BODY)


def stream_only():
    return io.BufferedReader(io.BytesIO(REQUEST)).read()


def best_us(fn, number):
    return min(timeit.repeat(fn, timer=time.process_time, number=number, repeat=7)) / number * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--number", type=int, default=20000)
    ns = p.parse_args()
    assert stdlib_path() == hookd_path() == BODY
    base = best_us(stream_only, ns.number)
    old, new = best_us(stdlib_path, ns.number), best_us(hookd_path, ns.number)
    print("python %s, %d header lines, %d-byte body, best of 7 x %d" % (
        sys.version.split()[0], HEAD.count(b"\r\n") - 2, len(BODY), ns.number))
    print("stdlib parse_request path: %6.1f us per request" % old)
    print("hookd framing.Reader:      %6.1f us per request  (%.2fx)" % (new, old / new))
    print("(the buffered stream alone: %.1f us)" % base)


if __name__ == "__main__":
    main()
