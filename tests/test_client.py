"""Tests of hookd_core/client.py, the one outbound HTTP client: the whole-request deadline against a
loopback upstream that drips its answer one byte at a time (as forward, Teams and a vendor API call meet
it), kept-alive connections (forward), and the one status mapping every integration uses."""

import re
import select
import socket
import threading
import time
import unittest

from hookd_core import actions, client, proc
from hookd_core.api import Fail, Retry
from tests import support
from tests.support import FakeUpstream
from tests.test_actions import make_ctx

DRIP_ANSWER = b"HTTP/1.1 200 OK\r\n\r\nok"  # no length: the body ends at EOF; 21 bytes, 30 s at 1.5 s each


class Upstream:
    """A loopback server that reads each request (head, then a Content-Length body) and answers the k-th
    request on a connection with ``answers[k]``, the last of them one byte every ``interval`` seconds,
    then closes the connection (without saying so in the answer, as an upstream whose idle timeout
    passed does), or with ``endless`` sends it after the last answer again and again until the client
    goes. Counts connections and requests. Stops by itself when closed."""

    def __init__(self, answers, interval=0, endless=None):
        self.answers, self.interval, self.endless = answers, interval, endless
        self.connections = self.requests = self.ended = 0
        self.bodies = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.first = None  # the first connection's socket, to write on it unasked
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.first = self.first or conn
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            conn.settimeout(5)
            data = b""
            try:
                for k, answer in enumerate(self.answers):
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        data += chunk
                    head, data = data.split(b"\r\n\r\n", 1)
                    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                    length = int(length.group(1)) if length else 0
                    while len(data) < length:
                        data += conn.recv(65536)
                    self.bodies.append(data[:length])
                    data = data[length:]
                    self.requests += 1
                    last = k == len(self.answers) - 1
                    for i in range(len(answer)):
                        conn.sendall(answer[i:i + 1] if last and self.interval else answer[i:])
                        if not (last and self.interval):
                            break
                        if self.closed.wait(self.interval):
                            return
                while self.endless and not self.closed.is_set():
                    conn.sendall(self.endless)
            except OSError:
                return  # the client cut us off: what the deadline is for
            finally:
                conn.close()  # before it counts as ended: a test that waits for that then meets the close
                self.ended += 1

    def close(self):
        self.closed.set()
        self.sock.close()


class DeadlineTest(unittest.TestCase):
    """issue 16 #6: a timeout is a deadline for the whole request, not for each read."""

    def setUp(self):
        self.drip = Upstream([DRIP_ANSWER], interval=1.5)
        self.addCleanup(self.drip.close)

    def elapsed(self, fn):
        started = time.monotonic()
        with self.assertRaises(Retry) as cm:
            fn()
        return time.monotonic() - started, str(cm.exception)

    def test_request_ends_at_its_timeout(self):
        took, msg = self.elapsed(lambda: client.request("GET", self.drip.url + "/", timeout=2))
        self.assertLess(abs(took - 2), 1, "took %.1fs" % took)
        self.assertIn("within 2s", msg)

    def test_forward_timeout_2_ends_at_2s(self):
        ctx, hook = make_ctx(forward=self.drip.url + "/in", **{"forward.timeout": "2"})
        took, msg = self.elapsed(lambda: actions.forward(ctx, hook))
        self.assertLess(abs(took - 2), 1, "took %.1fs" % took)

    def test_teams_post_ends_at_its_timeout(self):
        took, _ = self.elapsed(lambda: actions.post_teams(self.drip.url + "/w", "adaptive",
                                                          {"title": "t"}, timeout=2))
        self.assertLess(abs(took - 2), 1, "took %.1fs" % took)

    def test_vendor_api_call_ends_at_its_timeout(self):
        api = client.Api(self.drip.url, timeout=2)
        took, _ = self.elapsed(lambda: api.call("GET", "/API/assets/v1/assets/a/"))
        self.assertLess(abs(took - 2), 1, "took %.1fs" % took)

    def test_an_answer_shorter_than_its_content_length_is_a_network_error(self):
        short = Upstream([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok"])
        self.addCleanup(short.close)
        with self.assertRaises(client.NetworkError) as cm:
            client.request("GET", short.url + "/", timeout=5)
        self.assertIn("IncompleteRead", str(cm.exception))

    def test_a_fast_answer_without_length_is_read_whole(self):
        fast = Upstream([DRIP_ANSWER])
        self.addCleanup(fast.close)
        reply = client.request("GET", fast.url + "/", timeout=5)
        self.assertEqual((reply.status, reply.body), (200, b"ok"))


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class KeepAliveTest(unittest.TestCase):
    """A forward keeps its connection for the next one: no connect per event."""

    def upstream(self, answers, interval=0):
        up = Upstream(answers, interval)
        self.addCleanup(up.close)
        return up

    def test_forwards_to_one_upstream_share_a_connection(self):
        up = self.upstream([OK] * 4)
        ctx, hook = make_ctx(forward=up.url + "/in")
        for _ in range(3):
            self.assertIn(": 200", actions.forward(ctx, hook))
        self.assertEqual((up.requests, up.connections), (3, 1))

    def test_a_connection_the_upstream_closed_while_idle_is_replaced(self):
        up = self.upstream([OK])  # one answer per connection, then it is closed
        for n in range(1, 4):
            reply = client.request("POST", up.url + "/in", body=b"{}", timeout=5, keep_alive=True)
            self.assertEqual((reply.status, reply.body), (200, b"ok"))
            support.wait_until(lambda: up.ended == n, message="the upstream closing its connection")
        self.assertEqual((up.requests, up.connections), (3, 3))  # each request reached the upstream once

    def test_a_kept_connection_never_used_again_is_closed_once_idle_too_long(self):
        """A forward to a URL nobody calls again (a reload removed it): its kept connection is closed
        within IDLE_SECONDS (2 s) and a tick of the deadlines thread, not kept open for ever. Old code
        closed it only when the next call to the same place found it stale: here the upstream's own 5 s
        read timeout was the first to end it."""
        up = self.upstream([OK, OK])
        started = time.monotonic()
        self.assertEqual(client.request("POST", up.url + "/in", body=b"{}", timeout=5, keep_alive=True).status, 200)
        support.wait_until(lambda: up.ended == 1, 4.5, message="the idle connection to be closed")
        self.assertGreaterEqual(time.monotonic() - started, client._Idle.IDLE_SECONDS)
        self.assertEqual([c for kept in client._idle._conns.values() for c, _ in kept if c.port == up.port], [])

    def test_bytes_sent_after_an_answer_are_never_read_as_the_next_answer(self):
        """An upstream that writes an answer nobody asked for on an idle kept connection: the next
        forward gets its own answer on a fresh connection, never the stray one."""
        up = self.upstream([OK, b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nfail"])
        self.assertEqual(client.request("POST", up.url + "/in", body=b"A", timeout=5, keep_alive=True).body, b"ok")
        up.first.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")  # unasked
        kept = [c for kept in client._idle._conns.values() for c, _ in kept if c.port == up.port]
        support.wait_until(lambda: select.select([kept[0].sock], [], [], 0)[0], message="the stray answer to arrive")
        reply = client.request("POST", up.url + "/in", body=b"B", timeout=5, keep_alive=True)
        self.assertEqual((reply.status, reply.body), (200, b"ok"))  # B's own answer, not "stray"
        self.assertEqual((up.bodies, up.connections), ([b"A", b"B"], 2))

    def test_a_connection_that_sent_more_than_its_answer_is_not_kept(self):
        """Bytes that came with an answer, past its end, were asked for by nobody: that connection is
        closed, not kept for the next forward (old code dropped them unread with http.client's buffer and
        sent the next request on it)."""
        up = self.upstream([OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray", OK])
        self.assertEqual(client.request("POST", up.url + "/in", body=b"A", timeout=5, keep_alive=True).body, b"ok")
        reply = client.request("POST", up.url + "/in", body=b"B", timeout=5, keep_alive=True)
        self.assertEqual((reply.status, reply.body), (200, b"ok"))
        self.assertEqual((up.bodies, up.connections), ([b"A", b"B"], 2))

    def test_a_request_the_upstream_took_whole_is_not_sent_twice(self):
        """Closed after reading the request, without an answer: the upstream may have acted on it, so it
        is a NetworkError (the event is retried later), never a second delivery inside one call."""
        up = self.upstream([OK, b""])  # reads the second request, then closes without answering
        client.request("POST", up.url + "/in", body=b"A", timeout=5, keep_alive=True)
        with self.assertRaises(client.NetworkError):
            client.request("POST", up.url + "/in", body=b"B", timeout=5, keep_alive=True)
        self.assertEqual(up.bodies, [b"A", b"B"])

    def test_an_answer_cut_off_on_a_kept_connection_is_not_sent_again(self):
        up = self.upstream([OK, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok"])
        reply = client.request("POST", up.url + "/in", body=b"{}", timeout=5, keep_alive=True)
        self.assertEqual(reply.status, 200)
        with self.assertRaises(client.NetworkError):
            client.request("POST", up.url + "/in", body=b"{}", timeout=5, keep_alive=True)
        self.assertEqual((up.requests, up.connections), (2, 1))

    def test_the_deadline_holds_on_a_kept_connection(self):
        up = self.upstream([OK, OK], interval=1.5)  # the second answer drips
        reply = client.request("POST", up.url + "/in", body=b"{}", timeout=2, keep_alive=True)
        self.assertEqual(reply.status, 200)
        took = time.monotonic()
        with self.assertRaises(client.NetworkError) as cm:
            client.request("POST", up.url + "/in", body=b"{}", timeout=2, keep_alive=True)
        took = time.monotonic() - took
        self.assertLess(abs(took - 2), 1, "took %.1fs" % took)
        self.assertIn("within 2s", str(cm.exception))
        self.assertEqual((up.requests, up.connections), (2, 1))  # the second went on the kept connection


class WireTest(unittest.TestCase):
    """The answer as an upstream may frame it, read by the client's own parser: every length rule of
    HTTP/1.1, and a clear NetworkError (or Retry when too large) for what is not an answer."""

    def ask(self, answer, method="POST", max_body=client.MAX_REPLY):
        up = Upstream([answer])  # the answer whole, then the connection closed
        self.addCleanup(up.close)
        return client.request(method, up.url + "/in", body=b"{}", timeout=5, max_body=max_body)

    def test_answers_framed_every_way_are_read_whole(self):
        cases = [
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nok\r\n3\r\n!!!\r\n0\r\n"
             b"Trailer: t\r\n\r\n", 200, b"ok!!!"),
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx", 201, b"x"),
            (b"HTTP/1.0 200 OK\r\n\r\nall of it", 200, b"all of it"),
            (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
            (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", 200, b"ok"),  # bare LF line ends
            (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nto the end", 200, b"to the end"),
        ]
        for answer, status, body in cases:
            reply = self.ask(answer)
            self.assertEqual((reply.status, reply.body), (status, body), answer)

    def test_headers_are_read_case_insensitively_folded_lines_joined(self):
        reply = self.ask(b"HTTP/1.1 503 Busy\r\nretry-after:\r\n  7\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
                         b"Content-Length: 0\r\n\r\n")
        self.assertEqual((reply.status, client.retry_after(reply)), (503, 7))
        self.assertEqual(reply.headers.get_all("set-cookie"), ["a=1", "b=2"])

    def test_what_is_not_an_answer_is_a_network_error(self):
        for answer in [b"garbage\r\n\r\n", b"HTTP/1.1 2000 Big\r\n\r\n", b"HTTP/2 200 OK\r\n\r\n",
                       b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n",
                       b"HTTP/1.1 200 OK\r\nX: y\r\n" + b" folded\r\n" * 100 + b"\r\n",  # every line counts
                       b"HTTP/1.1 200 OK\r\n" + b"no colon\r\n" * 101 + b"\r\n",
                       b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n",
                       b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nok",
                       b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n", b""]:
            with self.assertRaises(client.NetworkError, msg=answer[:40]):
                self.ask(answer)

    def test_an_answer_larger_than_max_body_is_refused_every_way(self):
        for answer in [b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + b"x" * 11,
                       b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 11,
                       b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nxxxxxx\r\n6\r\nxxxxxx\r\n0\r\n\r\n"]:
            with self.assertRaises(Retry) as cm:
                self.ask(answer, max_body=10)
            self.assertIn("larger than 10 bytes", str(cm.exception))
        self.assertEqual(self.ask(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + b"x" * 10, max_body=10).body,
                         b"x" * 10)

    def test_with_keep_any_size_of_answer_is_read_whole_and_only_its_start_kept(self):
        """Forward and Teams read only the status and an excerpt: a 2xx with a body of any size is their
        answer (review R2: read up to 64 MiB into memory before), and at most ``keep`` bytes of it stay."""
        big = b"x" * 300000
        for answer in [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big,
                       b"HTTP/1.1 200 OK\r\n\r\n" + big,
                       b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(big) + big +
                       b"\r\n5\r\nxxxxx\r\n0\r\n\r\n"]:
            up = Upstream([answer])
            self.addCleanup(up.close)
            reply = client.request("POST", up.url + "/in", body=b"{}", timeout=5, max_body=10,
                                   keep=actions.ANSWER_KEPT)
            self.assertEqual((reply.status, reply.body), (200, b"x" * actions.ANSWER_KEPT), answer[:40])
        with self.assertRaises(client.NetworkError):  # cut short is still cut short
            up = Upstream([b"HTTP/1.1 200 OK\r\nContent-Length: 400000\r\n\r\n" + big])
            self.addCleanup(up.close)
            client.request("POST", up.url + "/in", body=b"{}", timeout=5, keep=actions.ANSWER_KEPT)

    def test_with_keep_an_endless_answer_ends_after_a_bounded_read(self):
        """An answer that never ends (to EOF, or chunks without a last one) is read no further than ``keep``
        + KEEP_DRAIN bytes: the caller has its status and excerpt, and the connection is not kept (review
        R6: it was read until the deadline, a worker's whole forward.timeout spent reading)."""
        chunk = b"x" * 65536
        for head, piece in [(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n", chunk),
                            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                             b"%x\r\n" % len(chunk) + chunk + b"\r\n")]:
            up = Upstream([head + piece * 64], endless=piece)
            self.addCleanup(up.close)
            reply = client.request("POST", up.url + "/in", body=b"{}", timeout=20, keep_alive=True,
                                   keep=actions.ANSWER_KEPT)
            self.assertEqual((reply.status, reply.body), (200, b"x" * actions.ANSWER_KEPT), head)
            self.assertIsNone(client._idle.take((("http",) + client.split_url(up.url)[1:3] + (None,)), 1))

    def test_the_answer_to_a_head_has_no_body(self):
        reply = self.ask(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", method="HEAD")
        self.assertEqual((reply.status, reply.body), (200, b""))

    def test_a_request_that_could_break_its_framing_is_never_sent(self):
        up = Upstream([OK])
        self.addCleanup(up.close)
        with self.assertRaises(client.NetworkError):
            client.request("POST", up.url + "/in x", body=b"{}", timeout=5)
        with self.assertRaises(ValueError):
            client.request("POST", up.url + "/in", headers={"X-A": "1\r\nX-B: 2"}, body=b"{}", timeout=5)
        with self.assertRaises(ValueError):
            client.request("POST", up.url + "/in", headers={"X A:": "1"}, body=b"{}", timeout=5)
        self.assertEqual(up.requests, 0)


class TlsSetupTest(unittest.TestCase):
    """While an https connection is set up, OpenSSL may open CA files without close-on-exec: the client
    says so to proc, which then starts children with Popen (every other fd closed in the child)."""

    def test_an_https_connection_being_set_up_is_marked_for_proc(self):
        listener = socket.socket()  # accepts the TCP connection, never answers the ClientHello
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.addCleanup(listener.close)
        errors = []
        caller = threading.Thread(target=lambda: errors.append(self.assertRaises(
            client.NetworkError, client.request, "GET", "https://127.0.0.1:%d/" % listener.getsockname()[1],
            timeout=3)))
        caller.start()
        self.addCleanup(caller.join)
        support.wait_until(lambda: proc._uncloexec[0] == 1, 3, message="the handshake to be under way")
        caller.join(10)
        self.assertEqual((len(errors), proc._uncloexec[0]), (1, 0))


class StatusMappingTest(unittest.TestCase):
    """One mapping for every upstream: 401/403 dead with a clear error, 408/429/5xx retried honouring
    Retry-After, 3xx not followed (retried), anything else as the caller says (Fail by default)."""

    def setUp(self):
        self.up = FakeUpstream([(200, b"{}")])
        self.addCleanup(self.up.close)
        self.api = client.Api(self.up.url, timeout=5)

    def answer(self, status, body=b"", headers=None):
        self.up.script = [(status, body, headers or {})]
        return self.api.call("GET", "/x")

    def test_2xx_is_the_reply(self):
        reply = self.answer(201, b'{"id": 1}')
        self.assertIs(client.check(reply, "x"), reply)
        self.assertEqual(reply.json(), {"id": 1})

    def test_401_and_403_are_dead_with_what_to_check(self):
        for status in (401, 403):
            with self.assertRaises(Fail) as cm:
                client.check(self.answer(status, b'{"errors": ["Token is invalid"]}'), "iconik analyze",
                             refused="[iconik] app_id and auth_token")
            self.assertIn("iconik analyze answered %d: the credentials were refused" % status,
                          str(cm.exception))
            self.assertIn("[iconik] app_id and auth_token", str(cm.exception))

    def test_408_429_and_5xx_are_retried_with_retry_after(self):
        for status in (408, 429, 500, 502, 503):
            with self.assertRaises(Retry) as cm:
                client.check(self.answer(status, b"busy", {"Retry-After": "7"}), "x")
            self.assertEqual(cm.exception.after, 7)
        with self.assertRaises(Retry) as cm:
            client.check(self.answer(503, b"", {"Retry-After": "999999"}), "x")
        self.assertEqual(cm.exception.after, client.MAX_RETRY_AFTER)
        with self.assertRaises(Retry) as cm:
            client.check(self.answer(503, b"", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), "x")
        self.assertIsNone(cm.exception.after)

    def test_3xx_is_never_followed(self):
        with self.assertRaises(Retry) as cm:
            client.check(self.answer(307, b"", {"Location": "http://169.254.169.254/"}), "x")
        self.assertIn("redirects are not followed", str(cm.exception))
        self.assertEqual(self.up.count(), 1)

    def test_other_statuses_are_as_the_caller_says(self):
        reply = self.answer(422, b'{"errors": ["bad job"]}')
        with self.assertRaises(Fail) as cm:
            client.check(reply, "zencoder jobs")
        self.assertIn('422: {"errors": ["bad job"]}', str(cm.exception))
        with self.assertRaises(Retry):
            client.check(reply, "forward", other=Retry)

    def test_network_error_is_retry_and_other_hosts_fail(self):
        port = self.up.port
        self.up.close()
        with self.assertRaises(client.NetworkError):
            client.request("GET", "http://127.0.0.1:%d/" % port, timeout=2)
        with self.assertRaises(Fail):
            client.request("GET", "http://127.0.0.2:%d/" % port, allowed_hosts=["127.0.0.1"])


if __name__ == "__main__":
    unittest.main()
