"""Framing fixtures: every raw request in tests/framing/{valid,invalid} fed whole, line by line and byte by
byte to hookd's request reader (head and body), and the same three ways to the real daemon over a socket.

A fixture is NAME.http (the raw request; real newlines are ignored, escapes \\r \\n \\xHH are bytes) with
NAME.json (valid: the status and decoded body) or NAME.txt (invalid: "STATUS ExceptionName", then why).
A new parser edge case is a new pair of files and no new test code.
"""

import glob
import http.client
import json
import os
import re
import socket
import tracemalloc
import unittest

from hookd_core import framing
from hookd_core.api import Reject
from tests.support import Daemon, wait_until

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "framing")
MAX_BODY = 1024
MAX_HEAD = 2048


def load_raw(path):
    with open(path, encoding="ascii") as f:
        text = f.read().replace("\n", "")
    return re.sub(rb"\\(r|n|0|\\|x[0-9a-fA-F]{2})",
                  lambda m: {b"r": b"\r", b"n": b"\n", b"0": b"\0", b"\\": b"\\"}.get(
                      m.group(1), bytes([int(m.group(1)[1:], 16)]) if m.group(1)[:1] == b"x" else b""),
                  text.encode("ascii"))


def fixtures(kind):
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, kind, "*.http"))):
        name = os.path.basename(path)[:-5]
        if kind == "valid":
            with open(path[:-5] + ".json") as f:
                expect = json.load(f)
        else:
            with open(path[:-5] + ".txt") as f:
                first = f.readline().split()
            expect = {"status": int(first[0]), "exception": first[1]}
        out.append((name, load_raw(path), expect))
    return out


class Trickle:
    """A socket's ``recv_into`` that hands out the data in the given pieces: one piece (or as much of it
    as fits) per call, 0 at the end."""

    def __init__(self, pieces):
        self.pieces = [p for p in pieces if p]

    def recv_into(self, buffer):
        if not self.pieces:
            return 0
        n = min(len(buffer), len(self.pieces[0]))
        buffer[:n], self.pieces[0] = self.pieces[0][:n], self.pieces[0][n:]
        if not self.pieces[0]:
            self.pieces.pop(0)
        return n


def feeds(data):
    return {
        "whole": [data],
        "lines": [l for l in re.split(rb"(?<=\n)", data)],
        "bytes": [data[i:i + 1] for i in range(len(data))],
    }


def parse(data, pieces):
    """hookd's request reader over the pieces: the head, then the body. Returns the body or raises."""
    reader = framing.Reader(Trickle(pieces).recv_into, MAX_HEAD)
    reader.head()
    return reader.body(MAX_BODY)


class FramingUnitTest(unittest.TestCase):
    def test_corpus_is_there(self):
        self.assertGreaterEqual(len(fixtures("valid")), 8)
        self.assertGreaterEqual(len(fixtures("invalid")), 20)

    def test_valid_fixtures_decode_the_same_in_every_feed(self):
        for name, data, expect in fixtures("valid"):
            for mode, pieces in feeds(data).items():
                with self.subTest(fixture=name, feed=mode):
                    self.assertEqual(parse(data, pieces), expect["body"].encode("utf-8"))

    def test_invalid_fixtures_are_refused_with_their_status_in_every_feed(self):
        for name, data, expect in fixtures("invalid"):
            for mode, pieces in feeds(data).items():
                with self.subTest(fixture=name, feed=mode):
                    with self.assertRaises(Reject) as cm:
                        parse(data, pieces)
                    self.assertEqual(cm.exception.status, expect["status"])
                    self.assertEqual(cm.exception.__class__.__name__, expect["exception"])

    def test_a_whole_head_reads_as_it_does_line_by_line(self):
        """The one-match path (a whole head already received) and the line-by-line path agree on every
        valid fixture: the same method, target, version, headers, keep-alive and body."""
        def head_and_body(pieces):
            reader = framing.Reader(Trickle(pieces).recv_into, MAX_HEAD)
            head = reader.head()
            return (head.method, head.target, head.path, head.query_string, head.version, head.headers.items(),
                    head.keep_alive, head.expect_continue, reader.body(MAX_BODY))
        for name, data, _ in fixtures("valid"):
            with self.subTest(fixture=name):
                whole = head_and_body([data])
                self.assertEqual(whole, head_and_body(feeds(data)["bytes"]))
                self.assertEqual(whole, head_and_body(feeds(data)["lines"]))

    def test_pipelined_requests_are_read_in_order_from_one_receive(self):
        """A receive may hold the end of one request and the start of the next: what follows a body is
        kept for the next head, whichever way it arrives."""
        cl = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nfirst"
        chunked = b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsecond\r\n0\r\n\r\n"
        bare = b"GET /c?q=1 HTTP/1.1\nHost: x\n\n"
        data = cl + chunked + bare + cl
        for mode, pieces in dict(feeds(data), halves=[data[:70], data[70:]]).items():
            with self.subTest(feed=mode):
                reader = framing.Reader(Trickle(pieces).recv_into, MAX_HEAD)
                got = []
                while True:
                    head = reader.head()
                    if head is None:
                        break
                    got.append((head.path, head.query_string, reader.body(MAX_BODY)))
                self.assertEqual(got, [("/a", "", b"first"), ("/b", "", b"second"), ("/c", "q=1", b""),
                                       ("/a", "", b"first")])

    def test_a_head_after_known_first_lines_reads_as_it_does_alone(self):
        """Once two heads on a connection began with the same lines, a head that begins with those bytes
        has only its other lines matched: for every fixture and every run of its first lines, a head read
        after two heads of those lines (the warm-ups, no body, differing in one line after them) gives what
        a reader of its own gives, the same request or the same refusal."""
        def read(reader):
            try:
                head = reader.head()
                return ("head", head.method, head.target, head.path, head.query_string, head.version,
                        head.headers.items(), head.headers.first, head.keep_alive, head.expect_continue,
                        reader.body(MAX_BODY))
            except Reject as e:
                return ("refused", e.__class__.__name__, e.status)

        def plain_head(data):  # a head a reader of its own takes, that announces no body
            reader = framing.Reader(Trickle([data]).recv_into, MAX_HEAD)
            try:
                return reader.head() is not None and not reader.unread and reader.body(MAX_BODY) == b""
            except Reject:
                return False
        learnt = 0
        for kind in ("valid", "invalid"):
            for name, data, _ in fixtures(kind):
                head = data.split(b"\r\n\r\n", 1)[0]
                lines = re.split(rb"(?<=\n)", head)
                for k in range(1, len(lines)):
                    first = b"".join(lines[:k])
                    for more in (b"", b"Host: w\r\n", b"Content-Length: 0\r\n", b"Host: w\r\nContent-Length: 0\r\n"):
                        warm = [first + b"X-Warm: %d\r\n%s\r\n" % (i, more) for i in (1, 2)]
                        if plain_head(warm[0]) and plain_head(warm[1]):
                            break
                    else:
                        continue
                    with self.subTest(fixture=name, first_lines=k):
                        reader = framing.Reader(Trickle([warm[0] + warm[1] + data]).recv_into, MAX_HEAD)
                        self.assertEqual(read(reader)[0], "head")
                        self.assertEqual(read(reader)[0], "head")
                        learnt += reader._known is not None and reader._known[0] == first
                        self.assertEqual(read(reader), read(framing.Reader(Trickle([data]).recv_into, MAX_HEAD)))
        self.assertGreater(learnt, 100)  # the path under test was taken

    def test_an_endless_head_is_refused_within_bounded_reads(self):
        """A client that never ends its head (one endless line, or endless lines) is refused with 431
        after at most max_header_bytes plus one receive: nothing it sends is buffered beyond that."""
        class Endless:
            def __init__(self, start, filler):
                self.start, self.filler, self.handed = start, filler, 0

            def recv_into(self, buffer):
                n = len(buffer)
                buffer[:n] = (self.start + self.filler * (n // len(self.filler) + 1))[:n]
                self.start = b""
                self.handed += n
                return n
        for start, filler in ((b"POST / HTTP/1.1\r\nX-Long: ", b"a"), (b"", b"b" * 999),
                              (b"POST / HTTP/1.1\r\n", b"X-A: b\r\n")):
            for cap in (MAX_HEAD, 200000):
                with self.subTest(start=start, filler=filler[:10], max_header_bytes=cap):
                    client = Endless(start, filler)
                    with self.assertRaises(framing.HeadTooLarge):
                        framing.Reader(client.recv_into, cap).head()
                    self.assertLessEqual(client.handed, cap + framing.RECV_SIZE)

    def test_a_body_longer_than_a_receive_is_read_whole(self):
        body = bytes(range(256)) * 1200
        for data in (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
                     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                     % (len(body), body)):
            reader = framing.Reader(Trickle([data[:1000], data[1000:100000], data[100000:]]).recv_into, MAX_HEAD)
            reader.head()
            self.assertEqual(reader.body(len(body)), body)
            self.assertIsNone(reader.head())

    def test_many_small_chunks_take_memory_like_the_body_not_per_chunk(self):
        # review R1: a body of 1-byte chunks kept one object per chunk until the last (~160 bytes a body
        # byte: 1 MiB of max_body took ~170 MB) before any signature check; now what the reader holds
        # grows with the body, not with the number of chunks
        n = 64 * 1024
        data = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * n + b"0\r\n\r\n"
        reader = framing.Reader(Trickle([data[i:i + 4096] for i in range(0, len(data), 4096)]).recv_into, MAX_HEAD)
        reader.head()
        tracemalloc.start()
        try:
            body = reader.body(n)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(body, b"x" * n)
        self.assertLess(peak, 4 * n + 64 * 1024)

    def test_truncated_chunked_body_is_client_gone_not_a_body(self):
        data = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"
        with self.assertRaises(framing.ClientGone):
            parse(data, [data])


def exchange(port, data, feed="whole"):
    """Send a raw request in the pieces of ``feed`` (whole, lines, bytes); return (status, body) of the
    one response, and its Connection header."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for piece in feeds(data)[feed]:
                s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and closed; its answer is still to be read
        resp = http.client.HTTPResponse(s)
        resp.begin()
        body = resp.read()
        return resp.status, body, resp.getheader("Connection")


class FramingDaemonTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon("[hookd]\nmax_body = %d\nmax_header_bytes = %d\nworkers = 1\n[hook:t]\nverify = none\nallow_unsigned = true\n"
                       "dedupe = none\n" % (MAX_BODY, MAX_HEAD)).start()

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def test_valid_fixtures_are_stored_byte_exact_in_every_feed(self):
        for name, data, expect in fixtures("valid"):
            for feed in ("whole", "lines", "bytes"):
                with self.subTest(fixture=name, feed=feed):
                    status, body, _ = exchange(self.d.port, data, feed)
                    self.assertEqual(status, 202, body)
                    event = self.d.event(json.loads(body)["id"])
                    self.assertEqual(event["body"], expect["body"])

    def test_invalid_fixtures_get_their_status_and_store_nothing(self):
        before = len(self.d.events())
        for name, data, expect in fixtures("invalid"):
            for feed in ("whole", "lines", "bytes"):
                with self.subTest(fixture=name, feed=feed):
                    status, body, connection = exchange(self.d.port, data, feed)
                    self.assertEqual(status, expect["status"], body)
                    self.assertEqual(connection, "close")
        self.assertEqual(len(self.d.events()), before)
        status, _, _ = exchange(self.d.port, fixtures("valid")[0][1])
        self.assertEqual(status, 202, "daemon still serves after the corpus")
        wait_until(lambda: "400 hook:t" in self.d.log(), 5, message="one log line per refusal")


if __name__ == "__main__":
    unittest.main()
