"""The core end to end: the real daemon as a subprocess, SPEC §4's status table row by row, keep-alive,
retries and dead events, kill -9 without losing an acknowledged event, SIGTERM draining, SIGHUP reload,
the admin API and the CLI.

Every row of the status table checks three things: the status, that nothing was stored, and that the
daemon still serves the next good request.
"""

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import unittest

from tests.support import Daemon, raw_exchange, request, wait_until

TOKEN = "tok-7f3a9c1e55"
APPEND = r'''
import os, sys, json
event = json.load(sys.stdin)
with open(sys.argv[1], "a") as f:
    f.write(os.environ["HOOKD_EVENT_ID"] + " " + os.environ["HOOKD_ATTEMPT"] + "\n")
'''
FLAKY = r'''
import os, sys
# fails until it has been called N times for this event, then succeeds
count_file = os.path.join(sys.argv[1], "count-" + os.environ["HOOKD_EVENT_ID"])
n = int(open(count_file).read()) + 1 if os.path.exists(count_file) else 1
open(count_file, "w").write(str(n))
sys.exit(0 if n > int(sys.argv[2]) else 3)
'''
SLOW = r'''
import os, sys, time
open(sys.argv[1] + ".started", "w").close()
time.sleep(float(sys.argv[2]))
open(sys.argv[1], "a").write(os.environ["HOOKD_EVENT_ID"] + "\n")
'''


def script(tmp, name, text):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def hook_config(tmp, extra_hookd="", command=None, section_extra=""):
    out = os.path.join(tmp, "out.txt")
    cmd = command or "%s %s %s" % (sys.executable, script(tmp, "append.py", APPEND), out)
    return ("[hookd]\nworkers = 2\nretry.base_delay = 0.05\nretry.max_delay = 0.2\nretry.max_attempts = 3\n"
            "read_timeout = 2\nmax_body = 4096\n%s\n[hook:t]\nverify = token\nsecret = %s\ncommand = %s\n%s"
            % (extra_hookd, TOKEN, cmd, section_extra)), out


def slow_daemon(prefix, extra_hookd=""):
    """A daemon whose [hook:t] command takes 1.5 s; returns (daemon, the command's output file)."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    out = os.path.join(tmp, "slow.txt")
    cmd = "%s %s %s 1.5" % (sys.executable, script(tmp, "slow.py", SLOW), out)
    text, _ = hook_config(tmp, extra_hookd, command=cmd)
    return Daemon(text.replace("workers = 2\n", "") if "workers" in extra_hookd else text, tmpdir=tmp), out


def auth():
    return {"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"}


def lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [l.split()[0] for l in f.read().splitlines() if l.strip()]


class StatusTableTest(unittest.TestCase):
    """SPEC §4, one test per row."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="hookd-status-")
        text, cls.out = hook_config(cls.tmp, "max_connections = 4\n")
        text += ("[iconik]\nurl = http://127.0.0.1:9\napp_id = a\nauth_token = b\nsecret.header = X-Secret\n"
                 "secret.key = iconik-secret-1\n")
        cls.d = Daemon(text, tmpdir=cls.tmp).start()

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def setUp(self):
        self.before = len(self.d.events())

    def assertNothingStoredAndStillServing(self):
        self.assertEqual(len(self.d.events()), self.before, "something was stored")
        status, _, body = self.d.post("/hooks/t", b'{"still": "%f"}' % time.time(), auth())
        self.assertEqual(status, 202, body)

    def test_202_new_event_is_stored_and_its_command_runs(self):
        status, headers, body = self.d.post("/hooks/t", b'{"n": 1}', auth())
        self.assertEqual(status, 202)
        reply = json.loads(body)
        self.assertEqual(reply["status"], "queued")
        self.assertEqual(headers["content-length"], str(len(body)))
        self.d.wait_status(reply["id"], "done")
        wait_until(lambda: str(reply["id"]) in lines(self.out), 10, message="command ran")

    def test_duplicate_is_answered_and_runs_nothing(self):
        body = b'{"dup": "%f"}' % time.time()
        first = json.loads(self.d.post("/hooks/t", body, auth())[2])
        self.d.wait_status(first["id"], "done")
        status, _, raw = self.d.post("/hooks/t", body, auth())
        self.assertIn(status, (200, 202))
        self.assertEqual(json.loads(raw)["status"], "duplicate")
        self.assertEqual(json.loads(raw)["id"], first["id"])
        time.sleep(0.3)  # give a wrongly queued job the chance to run before counting
        self.assertEqual(lines(self.out).count(str(first["id"])), 1)

    def test_401_wrong_or_missing_token(self):
        for headers in ({"Authorization": "Bearer nope"}, {}):
            status, _, _ = self.d.post("/hooks/t", b'{"x": 1}', headers)
            self.assertEqual(status, 401)
        self.assertNothingStoredAndStillServing()
        self.assertNotIn("nope", self.d.log())

    def test_404_unknown_path_and_unconfigured_integration(self):
        for path in ("/nothing", "/hooks/other", "/preservica", "/camio/tasks/x"):
            self.assertEqual(self.d.post(path, b"{}", auth())[0], 404, path)
        self.assertNothingStoredAndStillServing()

    def test_405_with_allow(self):
        status, headers, _ = request("PUT", self.d.url + "/hooks/t", b"{}", auth())
        self.assertEqual(status, 405)
        self.assertIn("POST", headers["allow"])
        self.assertNothingStoredAndStillServing()

    def test_408_slow_body_is_cut_at_read_timeout(self):
        with socket.create_connection(("127.0.0.1", self.d.port), timeout=10) as s:
            s.sendall(b"POST /hooks/t HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                      b"Content-Length: 10\r\n\r\n{\"a\"" % TOKEN.encode())
            started = time.monotonic()
            data = s.recv(4096)
            self.assertTrue(data.startswith(b"HTTP/1.1 408"), data)
            self.assertLess(time.monotonic() - started, 6)
            self.assertIn(b"Connection: close", data)
        self.assertNothingStoredAndStillServing()

    def test_408_trickled_headers_hit_the_whole_request_deadline(self):
        with socket.create_connection(("127.0.0.1", self.d.port), timeout=10) as s:
            started = time.monotonic()
            got = b""
            for ch in b"POST /hooks/t HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n":
                try:
                    s.sendall(bytes([ch]))
                except OSError:
                    break
                time.sleep(0.1)
                if time.monotonic() - started > 5:
                    break
            got = s.recv(4096)
            self.assertTrue(got.startswith(b"HTTP/1.1 408"), got)
            self.assertLess(time.monotonic() - started, 5)
        self.assertNothingStoredAndStillServing()

    def test_411_no_length(self):
        status, _, _ = raw_exchange("127.0.0.1", self.d.port,
                                    b"POST /hooks/t HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n"
                                    % TOKEN.encode())
        self.assertEqual(status, 411)
        self.assertNothingStoredAndStillServing()

    def test_413_before_reading_the_body(self):
        status, _, _ = raw_exchange("127.0.0.1", self.d.port,
                                    b"POST /hooks/t HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n")
        self.assertEqual(status, 413)
        self.assertNothingStoredAndStillServing()

    def test_400_malformed_framing(self):
        status, headers, _ = raw_exchange(
            "127.0.0.1", self.d.port, b"POST /hooks/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer %s\r\n\r\n6_0\r\n" % TOKEN.encode() + b"x" * 96 + b"\r\n0\r\n\r\n")
        self.assertEqual(status, 400)
        self.assertEqual(headers.get("connection"), "close")
        self.assertNothingStoredAndStillServing()

    def test_400_unparsable_and_422_wrong_shape(self):
        secret = {"X-Secret": "iconik-secret-1"}
        self.assertEqual(self.d.post("/iconik", b"{not json", secret)[0], 400)
        self.assertEqual(self.d.post("/iconik", b"[1, 2]", secret)[0], 422)
        self.assertNothingStoredAndStillServing()

    def test_501_other_transfer_coding(self):
        status, _, _ = raw_exchange("127.0.0.1", self.d.port, b"POST /hooks/t HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: gzip\r\n\r\n")
        self.assertEqual(status, 501)
        self.assertNothingStoredAndStillServing()

    def test_503_too_many_connections(self):
        idle = [socket.create_connection(("127.0.0.1", self.d.port)) for _ in range(4)]
        try:
            time.sleep(0.2)  # let the server take the four before the fifth arrives
            with socket.create_connection(("127.0.0.1", self.d.port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                data = s.recv(4096)
            self.assertTrue(data.startswith(b"HTTP/1.1 503"), data)
            self.assertIn(b"Retry-After", data)
        finally:
            for s in idle:
                s.close()
        wait_until(lambda: self.d.get("/healthz")[0] == 200, 10, message="slots freed")
        self.assertNothingStoredAndStillServing()

    def test_expect_100_continue_refused_for_unknown_route(self):
        with socket.create_connection(("127.0.0.1", self.d.port), timeout=5) as s:
            s.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            data = s.recv(4096)
        self.assertTrue(data.startswith(b"HTTP/1.1 404"), data)
        self.assertNotIn(b"100 Continue", data)

    def test_keep_alive_two_requests_one_connection(self):
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.d.port, timeout=5)
        try:
            for i in range(2):
                conn.request("POST", "/hooks/t", b'{"ka": %d, "t": %f}' % (i, time.time()), auth())
                resp = conn.getresponse()
                resp.read()
                self.assertEqual(resp.status, 202)
            self.assertIsNotNone(conn.sock, "server closed a keep-alive connection")
        finally:
            conn.close()


class QueueLimitTest(unittest.TestCase):
    def test_503_when_queue_limit_reached_and_recovers(self):
        d, out = slow_daemon("hookd-ql-", "queue_limit = 2\nworkers = 1\n")
        d.start()
        try:
            codes = [d.post("/hooks/t", b'{"q": %d}' % i, auth()) for i in range(3)]
            self.assertEqual([c[0] for c in codes[:2]], [202, 202])
            self.assertEqual(codes[2][0], 503)
            self.assertIn("retry-after", codes[2][1])
            wait_until(lambda: len(lines(out)) == 2, 15, message="queue drained")
            self.assertEqual(d.post("/hooks/t", b'{"q": 9}', auth())[0], 202)
            self.assertEqual(len(d.events()), 3)
        finally:
            d.stop()


class RetryTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="hookd-retry-")
        flaky = script(self.tmp, "flaky.py", FLAKY)
        text, _ = hook_config(self.tmp, command="%s %s %s 2" % (sys.executable, flaky, self.tmp))
        text += ("[hook:never]\nverify = token\nsecret = %s\ncommand = %s %s %s 99\n"
                 % (TOKEN, sys.executable, flaky, self.tmp))
        self.d = Daemon(text, tmpdir=self.tmp).start()

    def tearDown(self):
        self.d.stop()

    def test_fails_twice_then_done_with_three_attempts(self):
        eid = json.loads(self.d.post("/hooks/t", b'{"f": 1}', auth())[2])["id"]
        event = self.d.wait_status(eid, "done")
        self.assertEqual(event["attempts"], 3)

    def test_always_failing_goes_dead_and_retry_runs_it_again(self):
        eid = json.loads(self.d.post("/hooks/never", b'{"f": 2}', auth())[2])["id"]
        event = self.d.wait_status(eid, "dead")
        self.assertEqual(event["attempts"], 3)
        self.assertIn("exit", event["last_error"])
        counter = os.path.join(self.tmp, "count-%d" % eid)
        self.assertEqual(open(counter).read(), "3")
        r = self.d.cli("retry", str(eid))
        self.assertEqual(r.returncode, 0, r.stderr)
        wait_until(lambda: open(counter).read() == "6", 15, message="retried event ran again")
        self.d.wait_status(eid, "dead")
        self.assertEqual(self.d.cli("retry", "999999").returncode, 1)


class CrashTest(unittest.TestCase):
    def test_kill_9_after_500_acknowledged_events_loses_none(self):
        tmp = tempfile.mkdtemp(prefix="hookd-crash-")
        text, out = hook_config(tmp, "workers = 4\n")
        d = Daemon(text.replace("workers = 2\n", ""), tmpdir=tmp).start()
        acked, lock = [], threading.Lock()

        def send(start):
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=20)
            for i in range(start, 500, 8):
                conn.request("POST", "/hooks/t", b'{"crash": %d}' % i, auth())
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 202:
                    with lock:
                        acked.append(json.loads(body)["id"])
            conn.close()
        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        d.kill9()
        self.assertEqual(len(acked), 500)
        done_before = {e["id"] for e in d.events("--status", "done")}
        d.start()
        try:
            wait_until(lambda: set(map(str, acked)) <= set(lines(out)), 90, interval=0.3,
                       message="every acknowledged event processed after restart")
            ran = lines(out)
            for eid in done_before:
                self.assertEqual(ran.count(str(eid)), 1, "done event %d ran twice" % eid)
            self.assertEqual({e["status"] for e in d.events()}, {"done"})
        finally:
            d.stop()


class LifecycleTest(unittest.TestCase):
    def test_sigterm_lets_a_running_job_finish_and_exits_0(self):
        d, out = slow_daemon("hookd-term-")
        d.start()
        eid = json.loads(d.post("/hooks/t", b'{"t": 1}', auth())[2])["id"]
        wait_until(lambda: os.path.exists(out + ".started"), 10, message="job started")
        self.assertEqual(d.stop(signal.SIGTERM), 0)
        self.assertEqual(lines(out), [str(eid)])
        d.start()
        try:
            self.assertEqual(d.event(eid)["status"], "done")
            self.assertEqual(d.event(eid)["attempts"], 1)
        finally:
            d.stop()

    def test_sigterm_as_soon_as_the_port_accepts_stops_cleanly(self):
        """SIGTERM's handler is in place before any listener serves: a SIGTERM the moment the webhook port
        accepts a connection drains and exits 0, never the default action (killed, -15)."""
        for round_ in range(12):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
            probe.close()
            d = Daemon("")
            d._spawn(["127.0.0.1:%d" % port])

            def accepts():
                if d.proc.poll() is not None:
                    return True
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return True
                except OSError:
                    return False
            wait_until(accepts, 20, interval=0.001, message="the webhook port to accept")
            d.signal(signal.SIGTERM)
            self.assertEqual(d.proc.wait(40), 0, "round %d:\n%s" % (round_, d.log()[-2000:]))
            wait_until(lambda: d.log().rstrip().endswith("stopped"), 10, message="the stopped line")

    def test_sighup_reloads_configuration(self):
        tmp = tempfile.mkdtemp(prefix="hookd-hup-")
        text, _ = hook_config(tmp)
        d = Daemon(text, tmpdir=tmp).start()
        try:
            self.assertEqual(d.post("/hooks/new", b"{}", auth())[0], 404)
            with open(d.config_path, "a") as f:
                f.write("[hook:new]\nverify = token\nsecret = %s\n" % TOKEN)
            d.signal(signal.SIGHUP)
            wait_until(lambda: d.post("/hooks/new", b'{"h": 1}', auth())[0] == 202, 10, message="reloaded")
        finally:
            d.stop()

    def test_route_with_nothing_to_do_is_stored_done_and_never_claimed(self):
        tmp = tempfile.mkdtemp(prefix="hookd-idle-")
        d = Daemon("[hook:log]\nverify = token\nsecret = %s\n" % TOKEN, tmpdir=tmp).start()
        try:
            status, _, body = d.post("/hooks/log", b'{"only": "stored"}', auth())
            self.assertEqual(status, 202)
            self.assertEqual(json.loads(body)["status"], "queued")
            event = d.event(json.loads(body)["id"])
            self.assertEqual((event["status"], event["attempts"]), ("done", 0))
            self.assertIn("no work", event["note"])
            self.assertEqual(event["payload"], {"only": "stored"})
        finally:
            d.stop()

    def test_no_config_file_starts_with_everything_disabled(self):
        tmp = tempfile.mkdtemp(prefix="hookd-none-")
        d = Daemon("", tmpdir=tmp)
        os.remove(d.config_path)
        d.start()
        try:
            self.assertRegex(d.log(), "no configuration file .*disabled")
            self.assertEqual(d.post("/hooks/t", b"{}")[0], 404)
            self.assertEqual(d.get("/healthz")[0], 200)
        finally:
            d.stop()


class AdminAndCliTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="hookd-admin-")
        text, cls.out = hook_config(cls.tmp, "admin.token = adm-55aa\n")
        cls.d = Daemon(text, tmpdir=cls.tmp).start()
        cls.eid = json.loads(cls.d.post("/hooks/t", b'{"admin": true}', auth())[2])["id"]
        cls.d.wait_status(cls.eid, "done")

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def admin(self, path, method="GET", body=None, headers=None):
        return self.d.admin(method, path, body, dict({"Authorization": "Bearer adm-55aa"}, **(headers or {})))

    def test_health_ready_metrics(self):
        self.assertEqual(self.admin("/healthz")[0], 200)
        self.assertEqual(self.admin("/readyz")[0], 200)
        status, _, body = self.admin("/metrics")
        self.assertEqual(status, 200)
        text = body.decode()
        for name in ("hookd_requests_total{route=\"hook:t\",code=\"202\"}", "hookd_events_total",
                     "hookd_queue_depth{status=\"queued\"}", "hookd_oldest_queued_seconds",
                     "hookd_job_seconds_bucket", "hookd_verify_failures_total"):
            self.assertIn(name, text)

    def test_events_api_matches_cli(self):
        eid = json.loads(self.d.post("/hooks/t", b'{"api": true}', auth())[2])["id"]
        status, _, body = self.admin("/events?route=hook:t&limit=5")
        self.assertEqual(status, 200)
        api = json.loads(body)
        cli = self.d.events("--route", "hook:t")
        self.assertEqual(api[0]["id"], cli[0]["id"])
        for key in ("id", "route", "status", "attempts", "received_at", "last_error"):
            self.assertIn(key, cli[0])
        self.assertRegex(cli[0]["received_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
        self.assertEqual(api[0]["id"], eid)
        one = json.loads(self.admin("/events/%d" % eid)[2])
        self.assertEqual(one["payload"], {"api": True})
        self.assertNotIn("authorization", one["headers"])
        self.assertEqual(self.admin("/events/999999")[0], 404)

    def test_admin_token_is_needed_from_loopback_too(self):
        for headers in ({}, {"Authorization": "Bearer adm-55ab"}, {"Authorization": "adm-55aa"}):
            status, got, _ = self.d.admin("GET", "/events/%d" % self.eid, headers=headers)
            self.assertEqual(status, 401, headers)
        self.assertEqual(self.admin("/events/%d" % self.eid)[0], 200)

    def test_event_replay_prune(self):
        r = self.d.cli("event", str(self.eid))
        self.assertEqual(r.returncode, 0)
        self.assertIn("hook:t", r.stdout)
        r = self.d.cli("replay", str(self.eid))
        self.assertEqual(r.returncode, 0, r.stderr)
        new = int(r.stdout.strip())
        self.assertNotEqual(new, self.eid)
        self.d.wait_status(new, "done")
        self.assertEqual(self.d.event(new)["payload"], {"admin": True})
        r = self.d.cli("prune", "--days", "0")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.d.cli("event", str(self.eid)).returncode, 1)

    def test_usage_errors_exit_2(self):
        self.assertEqual(self.d.cli("events", "--status", "bogus").returncode, 2)
        self.assertEqual(self.d.cli("retry").returncode, 2)
        self.assertEqual(self.d.cli("event").returncode, 2)


# Fails with terminal escapes (set the window title, clear the screen) and a bidi override in its last words.
HOSTILE = ("import sys; sys.stdin.read(); sys.stderr.write('\\x1b]0;owned\\x07\\x1b[2J\\u202eevil\\n'); sys.exit(3)")


class TerminalEscapeTest(unittest.TestCase):
    """What a sender or a job wrote never reaches the operator's terminal raw: ``events`` and ``event``
    print its control characters escaped."""

    def test_a_hostile_last_error_and_body_are_printed_escaped(self):
        tmp = tempfile.mkdtemp(prefix="hookd-esc-")
        self.addCleanup(shutil.rmtree, tmp, True)
        text, _ = hook_config(tmp, command="%s %s" % (sys.executable, script(tmp, "hostile.py", HOSTILE)))
        d = Daemon(text, tmpdir=tmp).start()
        self.addCleanup(d.stop)
        eid = json.loads(d.post("/hooks/t", b"\x1b[2Jplain\nline two", dict(auth(), **{"Content-Type": "text/plain"}))[2])["id"]
        wait_until(lambda: "owned" in (d.event(eid).get("last_error") or ""), 20, message="the job's first failure")
        for argv in (("events",), ("event", str(eid))):
            r = d.cli(*argv)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertFalse(any(c in r.stdout for c in "\x1b\x07\u202e"), r.stdout)
            self.assertIn("\\x1b]0;owned\\x07", r.stdout)
        self.assertIn("\\x1b[2Jplain\nline two", d.cli("event", str(eid)).stdout)


class CheckConfigTest(unittest.TestCase):
    def test_problems_one_line_each_exit_1(self):
        tmp = tempfile.mkdtemp(prefix="hookd-cc-")
        path = os.path.join(tmp, "bad.properties")
        with open(path, "w") as f:
            f.write("[hookd]\nworkers = many\nlog.format = xml\nbogus = 1\njob_idle_after = soon\n[hook:a]\nverify = none\n"
                    "[nonsense]\nx = 1\n")
        os.chmod(path, 0o600)
        from tests.support import HOOKD
        import subprocess
        r = subprocess.run([sys.executable, HOOKD, "check-config", "--config", path], capture_output=True,
                           text=True, timeout=30)
        self.assertEqual(r.returncode, 1)
        out = r.stdout
        self.assertIn("workers", out)
        self.assertIn("log.format", out)
        self.assertIn("job_idle_after must be off or a number of seconds, at least 0", out)
        self.assertIn("allow_unsigned", out)
        self.assertIn("unknown key bogus", out)
        self.assertIn("unknown section [nonsense]", out)

    def test_env_file_and_cred_values(self):
        tmp = tempfile.mkdtemp(prefix="hookd-cc2-")
        with open(os.path.join(tmp, "secret"), "w") as f:
            f.write("from-file\n")
        os.makedirs(os.path.join(tmp, "creds"))
        with open(os.path.join(tmp, "creds", "tok"), "w") as f:
            f.write("from-cred")
        from hookd_core import config
        self.assertEqual(config.resolve("file:" + os.path.join(tmp, "secret")), "from-file")
        self.assertEqual(config.resolve("env:X_HOOKD", {"X_HOOKD": "from-env"}), "from-env")
        self.assertEqual(config.resolve("cred:tok", {"CREDENTIALS_DIRECTORY": os.path.join(tmp, "creds")}),
                         "from-cred")
        with self.assertRaises(config.ConfigError):
            config.resolve("cred:../secret", {"CREDENTIALS_DIRECTORY": os.path.join(tmp, "creds")})
        with self.assertRaises(config.ConfigError):
            config.resolve("env:NOT_SET_ANYWHERE", {})


if __name__ == "__main__":
    unittest.main()
