"""The HTTP edge (issue 13), black box against the real daemon: each defect of the report reproduced as
a user or an attacker would, then the admin listener's rules (SPEC §4.1, §4.2).

Framing rules themselves live in the fixture corpus (tests/framing/, fed by test_framing); the tests here
are the scenarios around them: a body that is itself a request, a header split by a bare CR, the admin
API looked for on the webhook port, bodies of every media type, what reaches the log.
"""

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import unittest

from tests.support import HOOKD, Daemon, unix_request

TOKEN = "tok-edge-4d1c9e"
ADMIN = "adm-edge-77b2f0"
CONFIG = """[hookd]
workers = 1
read_timeout = 3
max_body = 65536
admin.token = %s

[hook:open]
verify = none
allow_unsigned = true
dedupe = none

[hook:t]
verify = token
secret = %s
""" % (ADMIN, TOKEN)


def read_to_eof(sock, limit=5.0):
    """Everything the server sends until it closes (or ``limit`` seconds of silence)."""
    sock.settimeout(limit)
    out = b""
    while True:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return out
        except ConnectionResetError:
            return out
        if not data:
            return out
        out += data


def statuses(stream):
    """The status codes of every response in a byte stream."""
    return [int(line.split()[1]) for line in stream.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


def inner_request(marker):
    body = json.dumps({"smuggled": marker}).encode()
    return (b"POST /hooks/open HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class EdgeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(CONFIG).start()

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def admin(self, method, path, body=None, headers=None):
        h = {"Authorization": "Bearer " + ADMIN}
        h.update(headers or {})
        return self.d.admin(method, path, body, h)

    def stored(self, text):
        return [e for e in self.d.events("--route", "hook:open") if text in (self.d.event(e["id"]).get("body") or "")]

    def send(self, data):
        with socket.create_connection(("127.0.0.1", self.d.port), timeout=10) as s:
            s.sendall(data)
            return read_to_eof(s)

    # -- the report, bullet by bullet -----------------------------------------------------------------
    def test_a_body_is_never_parsed_as_the_next_request(self):
        """404, 405 and an admin path on the webhook port, each with a body that is a whole request."""
        for i, head in enumerate((b"POST /nope HTTP/1.1\r\nHost: x\r\n",
                                  b"PUT /hooks/open HTTP/1.1\r\nHost: x\r\n",
                                  b"GET /events HTTP/1.1\r\nHost: x\r\n",
                                  b"GET /healthz HTTP/1.1\r\nHost: x\r\n")):
            marker = "smuggle-%d-%f" % (i, time.time())
            inner = inner_request(marker)
            got = self.send(head + b"Content-Length: %d\r\n\r\n" % len(inner) + inner)
            with self.subTest(head=head):
                self.assertEqual(len(statuses(got)), 1, got)
                self.assertNotIn(202, statuses(got))
                self.assertEqual(self.stored(marker), [])

    def test_a_bare_cr_never_splits_a_header(self):
        body = b'{"cr": 1}'
        got = self.send(b"POST /hooks/open HTTP/1.1\r\nHost: x\r\nX-A: a\rTransfer-Encoding: chunked\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertEqual(statuses(got), [400], got)

    def test_length_and_coding_values_keep_unicode_whitespace(self):
        for value in (b"\x0b9", b"9\x0c", b"9\xa0", b"\x859"):
            got = self.send(b"POST /hooks/open HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n{\"v\": 99}"
                            % value)
            self.assertEqual(statuses(got), [400], (value, got))
        got = self.send(b"POST /hooks/open HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\xa0\r\n\r\n"
                        b"2\r\n{}\r\n0\r\n\r\n")
        self.assertEqual(statuses(got), [501], got)

    def test_http11_needs_exactly_one_host(self):
        for hosts in (b"", b"Host: a\r\nHost: b\r\n"):
            got = self.send(b"POST /hooks/open HTTP/1.1\r\n%sContent-Length: 2\r\n\r\n{}" % hosts)
            self.assertEqual(statuses(got), [400], got)

    def test_multipart_and_form_bodies_are_stored_byte_exact(self):
        form = b"a=1&b=%20two&c=caf%C3%A9&d=" + str(time.time()).encode()
        part = bytes(range(256)) + b"\r\n--notyet\r\n"
        multipart = (b"--B0und\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\none\r\n"
                     b"--B0und\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x.bin\"\r\n"
                     b"Content-Type: application/octet-stream\r\n\r\n" + part + b"\r\n--B0und--\r\n")
        for body, ctype in ((form, "application/x-www-form-urlencoded"),
                            (multipart, "multipart/form-data; boundary=B0und")):
            status, _, data = self.d.post("/hooks/open", body, {"Content-Type": ctype})
            self.assertEqual(status, 202, data)
            event = self.d.event(json.loads(data)["id"])
            import base64
            stored = event["body"].encode("utf-8") if "body" in event else base64.b64decode(event["body_base64"])
            self.assertEqual(stored, body)
            self.assertEqual(event["content_type"], ctype)

    def test_control_bytes_from_a_request_never_reach_the_log_raw(self):
        self.send(b"GET /nope\x1b[31mred\x1b[0m HTTP/1.1\r\nHost: x\r\n\r\n")
        self.send(b"GET /x\x07y HTTP/1.1\r\nHost: x\r\n\r\n")
        self.send(b"POST /nope%1b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        self.d.wait_log(r"404 - /nope%1b")
        text = self.d.log()
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\x07", text)

    def test_admin_api_is_not_on_the_webhook_port(self):
        eid = json.loads(self.d.post("/hooks/open", b'{"here": 1}')[2])["id"]
        for path in ("/events", "/events/%d" % eid, "/metrics", "/zencoder/jobs/1"):
            for headers in ({}, {"Authorization": "Bearer " + ADMIN}):
                self.assertEqual(self.d.get(path, headers)[0], 404, path)
        self.assertEqual(self.d.get("/healthz")[0], 200)
        self.assertEqual(self.d.get("/readyz")[0], 200)
        self.assertEqual(self.admin("GET", "/events/%d" % eid)[0], 200)

    def test_expect_100_continue_only_for_a_head_that_will_be_read(self):
        with socket.create_connection(("127.0.0.1", self.d.port), timeout=5) as s:
            s.sendall(b"POST /hooks/open HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n"
                      b"Expect: 100-continue\r\n\r\n")
            got = read_to_eof(s)
        self.assertEqual(statuses(got), [413], got)
        with socket.create_connection(("127.0.0.1", self.d.port), timeout=5) as s:
            s.sendall(b"POST /hooks/open HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\nConnection: close\r\n"
                      b"Expect: 100-continue\r\n\r\n")
            first = s.recv(4096)
            self.assertEqual(first, b"HTTP/1.1 100 Continue\r\n\r\n")
            s.sendall(b'{"c": 100}'[:9])
            self.assertEqual(statuses(read_to_eof(s)), [202])

    # -- the admin listener ---------------------------------------------------------------------------
    def test_admin_token_is_needed_from_loopback(self):
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN}):
            status, got, _ = self.d.admin("GET", "/metrics", headers=headers)
            self.assertEqual(status, 401, headers)
            self.assertEqual(got.get("www-authenticate"), "Bearer")
        self.assertEqual(self.admin("GET", "/metrics")[0], 200)

    def test_wrong_method_is_405_with_allow(self):
        for path in ("/metrics", "/events", "/events/1", "/healthz", "/readyz"):
            status, headers, _ = self.admin("POST", path, b"{}", {"Content-Type": "application/json"})
            self.assertEqual((status, headers.get("allow")), (405, "GET"), path)
        status, headers, _ = self.admin("GET", "/events/1/retry")
        self.assertEqual((status, headers.get("allow")), (405, "POST"))

    def test_admin_posts_need_json_and_retry_replay_work(self):
        eid = json.loads(self.d.post("/hooks/open", b'{"replay": "me"}')[2])["id"]
        for ctype in ({}, {"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}):
            self.assertEqual(self.admin("POST", "/events/%d/replay" % eid, b"{}", ctype)[0], 415, ctype)
        status, _, data = self.admin("POST", "/events/%d/replay" % eid, b"{}",
                                     {"Content-Type": "application/json; charset=utf-8"})
        self.assertEqual(status, 202, data)
        new = json.loads(data)["id"]
        self.assertEqual(self.d.event(new)["payload"], {"replay": "me"})
        status, _, data = self.admin("POST", "/events/%d/retry" % eid, b"{}", {"Content-Type": "application/json"})
        self.assertEqual(status, 409, data)
        self.assertEqual(self.admin("POST", "/events/99999999/replay", b"{}",
                                    {"Content-Type": "application/json"})[0], 404)

    def test_events_query_is_validated(self):
        for query in ("limit=abc", "limit=-1", "limit=0", "limit=1.5", "limit=", "status=bogus"):
            status, _, data = self.admin("GET", "/events?" + query)
            if query == "limit=":
                self.assertEqual(status, 200, query)  # empty means the default
                continue
            self.assertEqual(status, 400, query)
            self.assertIn("error", json.loads(data))
        status, _, data = self.admin("GET", "/events?limit=99999999999999999999")
        self.assertEqual(status, 400)
        status, _, data = self.admin("GET", "/events?limit=999999999")
        self.assertEqual(status, 200)


class AdminListenerTest(unittest.TestCase):
    def test_unix_socket_is_private_and_serves(self):
        tmp = tempfile.mkdtemp(prefix="hookd-adminsock-")
        path = os.path.join(tmp, "admin.sock")
        d = Daemon("[hookd]\nadmin.listen = unix:%s\n" % path, tmpdir=tmp).start()
        try:
            self.assertEqual(d.admin_url, "unix:" + path)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
            self.assertEqual(unix_request(path, "GET", "/healthz")[0], 200)
            self.assertEqual(d.get("/metrics")[0], 404)
        finally:
            self.assertEqual(d.stop(), 0)
        self.assertFalse(os.path.exists(path), "the socket file is removed on stop")

    def test_empty_admin_listen_turns_the_admin_api_off(self):
        d = Daemon("[hookd]\nadmin.listen =\n").start()
        try:
            self.assertIsNone(d.admin_url)
            self.assertIn("admin API off", d.log())
            self.assertEqual(d.get("/events")[0], 404)
        finally:
            d.stop()

    def test_check_config_refuses_a_public_admin_listener_without_token(self):
        tmp = tempfile.mkdtemp(prefix="hookd-admincc-")
        path = os.path.join(tmp, "c.properties")
        for text, code in (("admin.listen = 0.0.0.0:8001\n", 1), ("admin.listen = 192.0.2.1:8001\n", 1),
                           ("admin.listen = 0.0.0.0:8001\nadmin.token = long-enough-token\n", 0),
                           ("admin.listen = 127.0.0.1:8001\n", 0), ("admin.listen = [::1]:8001\n", 0),
                           ("admin.listen = unix:/run/hookd/admin.sock\n", 0),
                           ("admin.listen = unix:relative.sock\n", 1), ("admin.listen = nonsense\n", 1)):
            with open(path, "w") as f:
                f.write("[hookd]\n" + text)
            os.chmod(path, 0o600)
            r = subprocess.run([sys.executable, HOOKD, "check-config", "--config", path], capture_output=True,
                               text=True, timeout=30)
            self.assertEqual(r.returncode, code, (text, r.stdout, r.stderr))
            if code:
                self.assertIn("admin.listen", r.stdout + r.stderr)


if __name__ == "__main__":
    unittest.main()
