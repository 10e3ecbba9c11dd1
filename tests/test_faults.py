"""The fault and abuse suite: what the real daemon survives, with a count of every fault injected.

Strategy: each case starts the real ``hookd.py`` (support.Daemon) with short timeouts and a few
``[hook:NAME]`` sections whose ``command`` action is a tiny script (append the event id to a file, fail,
hang, leave a grandchild behind), then injects one kind of fault: kill -9 under load, a full disk or
refused writes at commit time, failing and hanging jobs, an upstream that never answers, slow and idle
and vanishing clients, thousands of seeded malformed requests. Every case then checks the two promises
that matter: the daemon keeps serving good requests, and no acknowledged (2xx) event is lost. Counts go
into ``LEDGER`` and a table is printed when the module finishes (docs/operations.md, "Reliability").
The last case scans every log line the suite produced for every secret, token and signature it used.
Randomness comes from ``random.Random(fixed seed)``, so a failure can be replayed.
"""

import base64
import collections
import http.client
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from tests import support

ADMIN_TOKEN = "adm-7Qe2kR9vXz3LmN5p"
TOKEN_SECRET = "tok-Hq8sW2nV4cJ6yB1d"
HMAC_SECRET = "hm-Zr5tP0gK8fD3wS7a"
WRONG_TOKEN = "tok-wrong-Lk2Jh8Gf4Ds6"
SECRETS = {ADMIN_TOKEN, TOKEN_SECRET, HMAC_SECRET, WRONG_TOKEN}  # signatures are added as they are made

LEDGER = collections.OrderedDict()  # case -> {"injected", "acknowledged", "lost"}
DAEMONS = []  # every daemon of the suite, for the log scan

SCRIPTS = {
    "append.py": """import os, sys
sys.stdin.buffer.read()
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "processed.txt"), "a") as f:
    f.write(os.environ["HOOKD_EVENT_ID"] + "\\n")
""",
    "fail.py": "import sys\nsys.stdin.buffer.read()\nsys.exit(3)\n",
    "hang.py": """import os, sys, time
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hang-%s.pid" % os.environ["HOOKD_EVENT_ID"]), "w") as f:
    f.write(str(os.getpid()))
time.sleep(60)
""",
    # Leaves a grandchild in its own session that keeps stdout and stderr open, then hangs.
    "escape.py": """import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(12)"], start_new_session=True)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "escape-%s.pid" % os.environ["HOOKD_EVENT_ID"]), "w") as f:
    f.write(str(child.pid))
time.sleep(60)
""",
}

BASE_CONFIG = """[hookd]
workers = 3
read_timeout = %(read_timeout)s
max_connections = %(max_connections)s
max_body = 65536
shutdown_grace = 3
retry.max_attempts = %(attempts)s
retry.base_delay = 0.05
retry.max_delay = 0.2
admin.token = %(admin)s

[hook:work]
verify = token
token.header = X-Hook-Token
secret = %(token)s
command = %(python)s %(tmp)s/append.py

[hook:signed]
verify = hmac
secret = %(hmac)s
signature.header = X-Signature
signature.prefix = sha256=
command = %(python)s %(tmp)s/append.py

[hook:fuzz]
verify = none
allow_unsigned = true

[hook:smuggled]
verify = none
allow_unsigned = true

[hook:cut]
verify = none
allow_unsigned = true
"""

JOBS_CONFIG = """
[hook:fail]
verify = none
allow_unsigned = true
command = %(python)s %(tmp)s/fail.py

[hook:hang]
verify = none
allow_unsigned = true
command = %(python)s %(tmp)s/hang.py
command.timeout = 1

[hook:escape]
verify = none
allow_unsigned = true
command = %(python)s %(tmp)s/escape.py
command.timeout = 1

[hook:raise]
verify = none
allow_unsigned = true
command = %(tmp)s/no-such-program --flag
"""

STALL_CONFIG = """
[hook:stall]
verify = none
allow_unsigned = true
forward = %(upstream)s/stall
forward.timeout = 1
"""


def record(case, injected=0, acknowledged=0, lost=0):
    row = LEDGER.setdefault(case, {"injected": 0, "acknowledged": 0, "lost": 0})
    row["injected"] += injected
    row["acknowledged"] += acknowledged
    row["lost"] += lost


def tearDownModule():
    if not LEDGER:
        return
    lines = ["", "Reliability (tests/test_faults.py)", "",
             "| fault | injected | events acknowledged | events lost |", "|---|---|---|---|"]
    for case, row in LEDGER.items():
        lines.append("| %s | %d | %d | %d |" % (case, row["injected"], row["acknowledged"], row["lost"]))
    print("\n".join(lines), file=sys.stderr)


class FaultCase(unittest.TestCase):
    """One daemon per class, its scripts in a temporary directory; helpers every case uses."""

    read_timeout = 2
    max_connections = 16
    attempts = 2
    extra_config = ""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="hookd-fault-")
        for name, text in SCRIPTS.items():
            with open(os.path.join(cls.tmp, name), "w") as f:
                f.write(text)
        cls.upstream, cls.d = None, None
        try:
            cls.prepare()
            cls.d = support.Daemon(cls.config_text(), tmpdir=cls.tmp, state_dir=cls.state_dir())
            DAEMONS.append(cls.d)
            cls.d.start()
        except BaseException:  # tearDownClass does not run after a failed (or skipped) setUpClass
            if cls.d is not None and cls.d.proc is not None and cls.d.proc.poll() is None:
                cls.d.kill9()
            if cls.upstream:
                cls.upstream.close()
            cls.cleanup_more()
            shutil.rmtree(cls.tmp, ignore_errors=True)
            raise

    @classmethod
    def prepare(cls):
        """Hook for subclasses: runs before the daemon starts."""

    @classmethod
    def state_dir(cls):
        return None

    @classmethod
    def config_text(cls):
        values = {"read_timeout": cls.read_timeout, "max_connections": cls.max_connections,
                  "attempts": cls.attempts, "admin": ADMIN_TOKEN, "token": TOKEN_SECRET,
                  "hmac": HMAC_SECRET, "python": sys.executable, "tmp": cls.tmp,
                  "upstream": cls.upstream.url if cls.upstream else ""}
        return (BASE_CONFIG + cls.extra_config) % values

    @classmethod
    def tearDownClass(cls):
        try:
            if cls.d.proc is not None and cls.d.proc.poll() is None:
                cls.d.stop(timeout=30)
        finally:
            if cls.upstream:
                cls.upstream.close()
            cls.cleanup_more()
            shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def cleanup_more(cls):
        """Hook for subclasses: runs after the daemon stopped."""

    # -- helpers ---------------------------------------------------------------------------------------
    def post_work(self, marker, timeout=20):
        """POST a good, signed event to /hooks/work; (status, event id or None)."""
        body = json.dumps({"marker": marker}).encode()
        status, _, data = support.post(self.d.url + "/hooks/work", body,
                                       {"X-Hook-Token": TOKEN_SECRET, "Content-Type": "application/json"},
                                       timeout=timeout)
        event_id = json.loads(data).get("id") if status in (200, 202) else None
        return status, event_id

    def post_to(self, route, n):
        status, _, data = self.d.post("/hooks/%s" % route, json.dumps({"n": n}).encode())
        self.assertEqual(status, 202, data)
        return json.loads(data)["id"]

    def admin(self, path):
        status, _, data = self.d.admin("GET", path, headers={"Authorization": "Bearer " + ADMIN_TOKEN})
        self.assertEqual(status, 200, data[:300])
        return json.loads(data)

    def statuses(self, hook):
        """{event id: status} of the events of ``[hook:HOOK]``."""
        return {e["id"]: e["status"] for e in self.admin("/events?route=hook:%s&limit=100000" % hook)}

    def processed(self):
        try:
            with open(os.path.join(self.tmp, "processed.txt")) as f:
                return collections.Counter(int(line) for line in f if line.strip())
        except FileNotFoundError:
            return collections.Counter()

    def wait_done(self, ids, route="work", timeout=60):
        """Wait until every id in ``ids`` is done and was processed; returns the set of ids that are not."""
        ids = set(ids)

        def settled():
            st = self.statuses(route)
            return all(st.get(i) == "done" for i in ids) and set(self.processed()) >= ids
        try:
            support.wait_until(settled, timeout, interval=0.2, message="%d events to be done" % len(ids))
        except AssertionError:
            pass
        st, done = self.statuses(route), set(self.processed())
        return {i for i in ids if st.get(i) != "done" or i not in done}

    def assert_serving(self):
        """The daemon is alive, answers a good webhook with 202, and runs its job."""
        self.assertIsNone(self.d.proc.poll(), "daemon died:\n" + self.d.log()[-3000:])
        status, event_id = self.post_work("still-serving-%s-%f" % (self.id(), time.time()))
        self.assertEqual(status, 202, self.d.log()[-2000:])
        self.assertEqual(self.wait_done([event_id], timeout=30), set(), self.d.log()[-3000:])


# -- kill -9 under concurrent load ------------------------------------------------------------------------

class KillNineTest(FaultCase):
    ROUNDS, CLIENTS, SEED = 4, 4, 1009

    def load(self, stop, acked, round_no, client):
        for seq in range(400):
            if stop.is_set():
                return
            try:
                status, event_id = self.post_work("r%d-c%d-%d" % (round_no, client, seq), timeout=5)
            except (OSError, http.client.HTTPException):
                return  # the daemon is gone: this request was not acknowledged
            if status == 202:
                acked.append(event_id)

    def test_every_acknowledged_event_survives_kill_9(self):
        rng = random.Random(self.SEED)
        acked = []
        for round_no in range(self.ROUNDS):
            if round_no:
                self.d.start()
            stop = threading.Event()
            clients = [threading.Thread(target=self.load, args=(stop, acked, round_no, c))
                       for c in range(self.CLIENTS)]
            for t in clients:
                t.start()
            before = len(acked)
            support.wait_until(lambda: len(acked) > before, 20, message="load to be acknowledged")
            deadline = time.monotonic() + rng.uniform(0.05, 0.8)  # a random moment under load
            support.wait_until(lambda: time.monotonic() >= deadline, 5, interval=0.01)
            self.d.kill9()
            stop.set()
            for t in clients:
                t.join(30)
            record("kill -9 under concurrent load", injected=1)
        self.d.start()
        lost = self.wait_done(acked, timeout=120)
        record("kill -9 under concurrent load", acknowledged=len(acked), lost=len(lost))
        self.assertEqual(lost, set(), "acknowledged but never done: %s" % sorted(lost)[:20])
        self.assertGreaterEqual(len(acked), self.ROUNDS)
        self.assert_serving()


# -- disk full, and writes refused, at commit time ----------------------------------------------------------

class CommitFaultMixin:
    """Posts during the fault must get 503 (or 202 only when truly committed); nothing half-written."""

    def post_during_fault(self, case, count, pad):
        answers = []
        for i in range(count):
            body = json.dumps({"marker": "%s-%d" % (case, i), "pad": "p" * pad}).encode()
            status, _, data = support.post(self.d.url + "/hooks/work", body, {"X-Hook-Token": TOKEN_SECRET})
            self.assertIn(status, (202, 503), "%s: got %s %r" % (case, status, data[:200]))
            answers.append((status, json.loads(data).get("id") if status == 202 else None,
                            "%s-%d" % (case, i)))
        return answers

    def check_nothing_half_written(self, answers):
        refused = {marker for status, _, marker in answers if status == 503}
        stored = set()
        for e in self.admin("/events?route=hook:work&limit=100000"):
            full = self.admin("/events/%d" % e["id"])
            stored.add((full.get("payload") or {}).get("marker"))
        self.assertEqual(refused & stored, set(), "refused with 503 but stored anyway")
        self.assertEqual(self.integrity(), "ok")

    def integrity(self):
        import sqlite3
        paths = [os.path.join(root, f) for root, _, files in os.walk(self.d.state_dir) for f in files
                 if f.endswith((".db", ".sqlite", ".sqlite3"))]
        self.assertTrue(paths, "no database file under %s" % self.d.state_dir)
        conn = sqlite3.connect("file:%s?mode=ro" % paths[0], uri=True, timeout=10)
        try:
            return conn.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            conn.close()


class DiskFullTest(CommitFaultMixin, FaultCase):
    """The state directory is a small tmpfs; a filler file takes the last free byte."""

    @classmethod
    def state_dir(cls):
        return os.path.join(cls.tmp, "state")

    @classmethod
    def prepare(cls):
        os.makedirs(cls.state_dir())
        if os.geteuid() != 0 or not shutil.which("mount"):
            raise unittest.SkipTest("mounting a small tmpfs needs root and mount(8)")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", cls.state_dir()],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise unittest.SkipTest("cannot mount a tmpfs here: %s" % r.stderr.strip())
        cls.mounted = True

    @classmethod
    def cleanup_more(cls):
        if getattr(cls, "mounted", False):
            subprocess.run(["umount", "-l", cls.state_dir()], capture_output=True, timeout=30)

    def fill(self):
        path = os.path.join(self.d.state_dir, "filler")
        with open(path, "wb", buffering=0) as f:
            for size in (65536, 512, 1):  # big blocks, then the last crumbs
                try:
                    while f.write(b"\0" * size):
                        pass
                except OSError:
                    pass
        return path

    def test_disk_full_at_commit_gets_503_then_recovers(self):
        before = [self.post_work("before-full-%d" % i) for i in range(5)]
        self.assertEqual({s for s, _ in before}, {202})
        filler = self.fill()
        self.addCleanup(lambda: os.path.exists(filler) and os.unlink(filler))
        answers = []
        for batch in range(10):  # until the WAL must grow into the full disk (bounded)
            answers += self.post_during_fault("full-%d" % batch, 10, 6000)
            if any(s == 503 for s, _, _ in answers):
                break
        refused = sum(1 for s, _, _ in answers if s == 503)
        self.assertGreater(refused, 0, "no 503 with a full disk")
        os.unlink(filler)
        support.wait_until(lambda: self.post_work("after-full")[0] == 202, 30, interval=0.3,
                           message="a 202 once space is back")
        acked = [i for _, i in before] + [i for s, i, _ in answers if s == 202]
        lost = self.wait_done(acked)
        record("disk full at commit (tmpfs ENOSPC)", injected=refused, acknowledged=len(acked), lost=len(lost))
        self.assertEqual(lost, set())
        self.check_nothing_half_written(answers)
        self.assert_serving()


class WritesRefusedTest(CommitFaultMixin, FaultCase):
    """Every file write of the daemon fails (RLIMIT_FSIZE of 1 byte set from outside with prlimit:
    EFBIG, as on a quota or a read-only database), then the limit is lifted."""

    def test_refused_writes_at_commit_get_503_then_recover(self):
        before = [self.post_work("before-limit-%d" % i) for i in range(5)]
        self.assertEqual({s for s, _ in before}, {202})
        pid = self.d.proc.pid
        old = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, old[1]))
        restored = []
        self.addCleanup(lambda: restored or self.d.proc.poll() is not None
                        or resource.prlimit(pid, resource.RLIMIT_FSIZE, old))
        answers = self.post_during_fault("limit", 20, 100)
        refused = sum(1 for s, _, _ in answers if s == 503)
        self.assertEqual(refused, len(answers), "a 2xx while no write can succeed")
        # the scheduler's writes (requeueing the outcomes refused meanwhile) fail too: one clear line, never a traceback
        self.d.wait_log(r"ERROR scheduler", timeout=30)
        log = self.d.log()
        self.assertRegex(log, r"ERROR scheduler[^\n]*: database write failed: ", log[-3000:])
        self.assertNotIn("Traceback", log)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, old)
        restored.append(True)
        self.d.wait_log(r"INFO scheduler: the database takes writes again", timeout=30)  # and says so
        support.wait_until(lambda: self.post_work("after-limit")[0] == 202, 30, interval=0.3,
                           message="a 202 once writes work again")
        acked = [i for _, i in before]
        lost = self.wait_done(acked)
        record("database writes refused at commit (EFBIG)", injected=refused, acknowledged=len(acked),
               lost=len(lost))
        self.assertEqual(lost, set())
        self.check_nothing_half_written(answers)
        self.assert_serving()


class OutcomeRefusedTest(FaultCase):
    """A job ran, but the database refused to store its outcome: the event must not stay 'running'
    until a restart; it is queued again once writes work, runs again and ends done."""

    def test_outcome_refused_by_the_database_is_requeued(self):
        import sqlite3
        db = sqlite3.connect(os.path.join(self.d.state_dir, "hookd.sqlite3"), isolation_level=None)
        self.addCleanup(db.close)
        db.execute("CREATE TRIGGER refuse_done BEFORE UPDATE OF status ON events WHEN NEW.status = 'done'"
                   " BEGIN SELECT RAISE(ABORT, 'injected: outcome refused'); END")
        dropped = []
        self.addCleanup(lambda: dropped or db.execute("DROP TRIGGER IF EXISTS refuse_done"))
        status, event_id = self.post_work("refused-outcome")
        self.assertEqual(status, 202)
        support.wait_until(lambda: self.processed()[event_id] >= 1, 30, message="the job to run once")
        support.wait_until(lambda: "outcome" in self.d.log() or "injected" in self.d.log(), 10,
                           message="the refused outcome to be logged")
        db.execute("DROP TRIGGER refuse_done")
        dropped.append(True)
        lost = self.wait_done([event_id], timeout=30)
        record("job outcome refused by the database", injected=1, acknowledged=1, lost=len(lost))
        self.assertEqual(lost, set(), self.d.log()[-2000:])


# -- jobs that fail, hang, outlive their timeout; an upstream that never answers ------------------------

class JobFaultTest(FaultCase):
    extra_config = JOBS_CONFIG
    attempts = 2

    def assert_ends(self, route, event_id, status, timeout, case):
        try:
            event = self.d.wait_status(event_id, status, timeout=timeout)
        finally:
            final = self.statuses(route).get(event_id)
            record(case, injected=1, acknowledged=1, lost=0 if final in ("done", "dead") else 1)
        return event

    def test_failing_command_is_retried_then_dead(self):
        event_id = self.post_to("fail", 1)
        event = self.assert_ends("fail", event_id, "dead", 30, "job exits non-zero")
        self.assertEqual(event["attempts"], self.attempts)
        self.assert_serving()

    def test_missing_program_raises_in_the_worker_then_dead(self):
        event_id = self.post_to("raise", 1)
        self.assert_ends("raise", event_id, "dead", 30, "job raises (program missing)")
        self.assertNotIn(TOKEN_SECRET, self.d.log())
        self.assert_serving()

    def test_hanging_command_is_killed_at_its_timeout(self):
        event_id = self.post_to("hang", 1)
        started = time.monotonic()
        self.assert_ends("hang", event_id, "dead", 30, "job hangs past command.timeout")
        # two attempts of 1 s each plus short backoffs: far below the script's 60 s sleep
        self.assertLess(time.monotonic() - started, 20)
        with open(os.path.join(self.tmp, "hang-%d.pid" % event_id)) as f:
            pid = int(f.read())
        support.wait_until(lambda: not os.path.exists("/proc/%d" % pid) or _zombie(pid), 10,
                           message="the hung command to be killed")
        self.assert_serving()

    def test_command_leaving_a_grandchild_ends_at_its_timeout(self):
        event_id = self.post_to("escape", 1)
        self.addCleanup(self.kill_grandchild, event_id)
        started = time.monotonic()
        # The grandchild holds the job's stdout for 12 s; the job must still end at command.timeout.
        self.assert_ends("escape", event_id, ("retry", "dead"), 8, "job leaves a grandchild past its timeout")
        self.assertLess(time.monotonic() - started, 8)
        self.assert_serving()

    def kill_grandchild(self, event_id):
        path = os.path.join(self.tmp, "escape-%d.pid" % event_id)
        if os.path.exists(path):
            with open(path) as f:
                try:
                    os.kill(int(f.read()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass


class StallingUpstreamTest(FaultCase):
    """An upstream that accepts the connection and never answers (twice), then recovers."""
    extra_config = STALL_CONFIG
    attempts = 4

    @classmethod
    def prepare(cls):
        cls.stall_count = 0

        def respond(rec):  # the first two forwards are held open and never answered
            cls.stall_count += 1
            return (None, b"") if cls.stall_count <= 2 else (200, b"{}")
        cls.upstream = support.FakeUpstream(respond=respond)

    def test_upstream_that_never_answers_is_retried_until_it_does(self):
        event_id = self.post_to("stall", 1)
        self.assertEqual(self.post_work("during-stall")[0], 202)  # intake goes on meanwhile
        try:
            self.d.wait_status(event_id, "done", timeout=30)
        finally:
            final = self.statuses("stall").get(event_id)
            record("upstream accepts and never answers", injected=min(self.stall_count, 2), acknowledged=1,
                   lost=0 if final in ("done", "dead") else 1)
        self.assertEqual(self.upstream.count("/stall"), 3)
        self.assert_serving()


def _zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


# -- slow, idle and vanishing clients ----------------------------------------------------------------------

def trickle(port, prefix, slow, interval=0.1, limit=15.0):
    """Send ``prefix``, then ``slow`` one byte per ``interval`` until the server answers; then read to EOF.
    Returns (seconds until the first reply byte, everything received)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        s.sendall(prefix)
        for i in range(len(slow)):
            readable, _, _ = select.select([s], [], [], interval)
            if readable:
                break
            try:
                s.send(slow[i:i + 1])
            except OSError:
                break
        select.select([s], [], [], max(0.0, limit - (time.monotonic() - started)))
        answered = time.monotonic() - started
        return answered, read_to_eof(s)


def read_to_eof(sock, limit=1 << 20):
    chunks, total = [], 0
    while total < limit:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


class ClientFaultTest(FaultCase):
    read_timeout = 2
    max_connections = 8

    def test_headers_trickled_past_read_timeout_get_408_and_close(self):
        results = []
        t = threading.Thread(target=lambda: results.append(trickle(
            self.d.port, b"POST /hooks/work HTTP/1.1\r\n", b"Host: x\r\nX-Pad: " + b"a" * 400)))
        t.start()
        self.assertEqual(self.post_work("beside-slow-headers")[0], 202)  # others are not held up
        t.join(30)
        answered, data = results[0]
        record("slow client: headers trickled", injected=1)
        self.assertRegex(data, rb"^HTTP/1\.1 408 ")
        self.assertLess(answered, self.read_timeout + 4)
        self.assert_serving()

    def test_body_trickled_past_read_timeout_gets_408_and_close(self):
        head = (b"POST /hooks/work HTTP/1.1\r\nHost: x\r\nX-Hook-Token: %s\r\nContent-Length: 300\r\n\r\n"
                % TOKEN_SECRET.encode())
        answered, data = trickle(self.d.port, head, b"{" + b" " * 298 + b"}")
        record("slow client: body trickled", injected=1)
        self.assertRegex(data, rb"^HTTP/1\.1 408 ")
        self.assertLess(answered, self.read_timeout + 4)
        self.assert_serving()

    def test_chunked_body_trickled_gets_408(self):
        head = b"POST /hooks/cut HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        answered, data = trickle(self.d.port, head, b"1\r\na\r\n" * 100)
        record("slow client: body trickled", injected=1)
        self.assertRegex(data, rb"^HTTP/1\.1 408 ")
        self.assertLess(answered, self.read_timeout + 4)
        self.assertEqual(self.statuses("cut"), {})

    def test_idle_keepalive_connections_past_max_connections(self):
        idle = []
        self.addCleanup(lambda: [s.close() for s in idle])
        for _ in range(self.max_connections):  # each does one request, then sits idle, kept alive
            s = socket.create_connection(("127.0.0.1", self.d.port), timeout=10)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertRegex(read_one_response(s), rb"^HTTP/1\.1 200 ")
            idle.append(s)
        with socket.create_connection(("127.0.0.1", self.d.port), timeout=10) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = read_to_eof(extra)
        record("idle keep-alive connections past max_connections", injected=self.max_connections + 1)
        self.assertRegex(reply, rb"^HTTP/1\.1 503 ")
        self.assertIn(b"Retry-After:", reply)
        for s in idle:
            s.close()
        idle.clear()
        support.wait_until(lambda: self.post_work("after-idle")[0] == 202, 15, interval=0.2,
                           message="a 202 once the idle connections closed")
        self.assert_serving()

    def test_idle_connections_are_dropped_after_read_timeout(self):
        s = socket.create_connection(("127.0.0.1", self.d.port), timeout=self.read_timeout + 10)
        with s:
            started = time.monotonic()
            data = read_to_eof(s)  # we send nothing: the server must hang up on its own
        record("idle connection never sends a request", injected=1)
        self.assertLess(time.monotonic() - started, self.read_timeout + 6, data)
        self.assert_serving()

    def test_clients_disconnecting_mid_body(self):
        rng = random.Random(77)
        cases = 0
        for i in range(30):
            body = json.dumps({"cut": i, "pad": "z" * rng.randint(10, 3000)}).encode()
            cut = rng.randint(0, len(body) - 1)
            if i % 2:
                head = b"POST /hooks/cut HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                data = head + body[:cut]
            else:
                head = b"POST /hooks/cut HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                data = head + b"%x\r\n" % len(body) + body[:cut]
            s = socket.create_connection(("127.0.0.1", self.d.port), timeout=10)
            s.sendall(data)
            if i % 3 == 0:  # abortive close: RST instead of FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            cases += 1
        record("client disconnects mid-body", injected=cases)
        self.assert_serving()
        self.assertEqual(self.statuses("cut"), {}, "a cut-off body was stored")


def read_one_response(sock):
    """Read exactly one Content-Length-framed response from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    need = int(m.group(1)) if m else 0
    while len(rest) < need:
        piece = sock.recv(65536)
        if not piece:
            break
        rest += piece
    return head + b"\r\n\r\n" + rest


# -- framing fuzz -------------------------------------------------------------------------------------------

SMUGGLED = (b"POST /hooks/smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n"
            b'{"smuggled": true}')
HEAD_JUNK = [b"\0", b"\xff\xfe", b"\xc3\x28", b"\r", b"\n", b"\r\n", b" ", b"\x7f", b"\xe2\x82"]
TE_VALUES = ["chunked, chunked", "gzip, chunked", "Chunked", " chunked", "chunked ", "identity", "xchunked",
             "chunked;q=1", "\tchunked", "chunked, identity", "", "gzip"]
SIZE_VALUES = ["0x%x", "+%x", "-%x", " %x", "%x ", "%x_0", "0%x", "%X", "1%x", "%x;ext=1",
               "%x;a=\"b\"", "FFFFFFFFFFFFFFFFFFFF", "", "g"]


class FuzzRequest:
    """A request as parts, so that a mutation can change one of them and framing stays computable."""

    def __init__(self, rng, case):
        self.rng = rng
        self.method, self.target, self.version = "POST", "/hooks/fuzz", "HTTP/1.1"
        self.body = json.dumps({"case": case, "pad": "x" * rng.choice([0, 7, 100, 2000])}).encode()
        self.chunked = rng.random() < 0.5
        self.headers = [("Host", "127.0.0.1"), ("Content-Type", "application/json")]
        self.cl = None          # a Content-Length text that differs from the real length
        self.sizes = None       # chunk size texts, when mutated
        self.chunk_eol = b"\r\n"
        self.trailer = b""
        self.suffix = b""       # bytes after the request (smuggling attempts)
        self.expected = {self.body}  # bodies a correct 2xx may have stored
        self.head_mutations = []

    def chunks(self):
        out, i = [], 0
        while i < len(self.body):
            n = self.rng.randint(1, 900)
            out.append(self.body[i:i + n])
            i += n
        return out

    def raw(self):
        head = ["%s %s %s" % (self.method, self.target, self.version)]
        framing = []
        if self.chunked:
            framing.append(("Transfer-Encoding", "chunked"))
        if not self.chunked or self.cl is not None:
            framing.append(("Content-Length", self.cl if self.cl is not None else str(len(self.body))))
        lines = head + ["%s: %s" % hv for hv in self.headers + framing]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        for where, junk in self.head_mutations:  # raw bytes in the head only; the body stays known
            pos = int(where * (len(data) - 4))
            data = data[:pos] + junk + data[pos:]
        return data + self.body_bytes() + self.suffix

    def body_bytes(self):
        if not self.chunked:
            return self.body
        out = b""
        for k, piece in enumerate(self.chunks()):
            size = "%x" % len(piece)
            if self.sizes:
                fmt = self.sizes[k % len(self.sizes)]
                size = fmt % len(piece) if "%" in fmt else fmt
            out += size.encode() + b"\r\n" + piece + self.chunk_eol
        return out + b"0\r\n" + self.trailer + b"\r\n"


def mutate(req, rng):
    """Apply one random mutation; returns its name."""
    kind = rng.choice(["cl", "cl_dup", "cl_te", "te", "te_dup", "size", "chunk_eol", "head_junk", "fold",
                       "huge_header", "many_headers", "version", "method", "colon_space", "trailer",
                       "smuggle", "big_body", "target"])
    if kind == "cl":
        n = len(req.body)
        req.cl = rng.choice(["%d" % (n - rng.randint(1, min(5, n))), "%d" % (n + rng.randint(1, 5)),
                             "-1", "+%d" % n, "0x%x" % n, " %d " % n, "%d, %d" % (n, n), "%d,%d" % (n, n + 1),
                             "1" + "0" * 30, "", "abc", "%d.0" % n])
        if req.cl.strip().isdigit() and int(req.cl) < n:
            req.expected.add(req.body[:int(req.cl)])
    elif kind == "cl_dup":
        req.headers.append(("Content-Length", rng.choice([str(len(req.body)), str(len(req.body) + 1)])))
    elif kind == "cl_te":
        req.chunked, req.cl = True, rng.choice(["4", "0", str(len(req.body))])
        req.suffix = SMUGGLED
    elif kind == "te":
        req.headers.append(("Transfer-Encoding", rng.choice(TE_VALUES)))
    elif kind == "te_dup":
        req.chunked = True
        req.headers.append(("Transfer-Encoding", rng.choice(TE_VALUES)))
    elif kind == "size":
        req.chunked = True
        req.sizes = [rng.choice(SIZE_VALUES) for _ in range(rng.randint(1, 3))]
    elif kind == "chunk_eol":
        req.chunked = True
        req.chunk_eol = rng.choice([b"", b"\n", b"\r", b"\r\n\r\n", b"xx", b" \r\n"])
    elif kind == "head_junk":
        req.head_mutations.append((rng.random(), rng.choice(HEAD_JUNK)))
    elif kind == "fold":
        req.headers.insert(rng.randint(1, len(req.headers)), ("X-Folded", "a\r\n continued"))
    elif kind == "huge_header":
        req.headers.append(("X-Big", "b" * rng.choice([8000, 70000, 300000])))
    elif kind == "many_headers":
        req.headers += [("X-N%d" % i, "v") for i in range(rng.choice([50, 200, 2000]))]
    elif kind == "version":
        req.version = rng.choice(["HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "HTTP/1", "http/1.1", "HTTP/1.10",
                                  "HTTP/0.9", "HTTP/1.1\0"])
    elif kind == "method":
        req.method = rng.choice(["post", "POST ", "P\xd6ST", "GET", "PUT", "CONNECT", "POST\t"])
    elif kind == "colon_space":
        req.headers.append((rng.choice(["Content-Length ", "Transfer-Encoding ", "X-A "]),
                            rng.choice(["5", "chunked", "b"])))
    elif kind == "trailer":
        req.chunked = True
        req.trailer = rng.choice([b"X-T: 1\r\n", b"Content-Length: 5\r\n", b"bad trailer\r\n",
                                  b"X-T: " + b"t" * 70000 + b"\r\n"])
    elif kind == "smuggle":
        req.chunked = True
        req.headers.append(("Content-Length", str(len(req.body_bytes()))))
        req.suffix = SMUGGLED
    elif kind == "big_body":
        req.body = json.dumps({"big": "y" * rng.choice([60000, 70000, 200000])}).encode()
        req.expected = {req.body}
    elif kind == "target":
        req.target = rng.choice(["/hooks/fuzz?x=%00", "/hooks/%66uzz", "//hooks/fuzz", "/hooks/fuzz/../fuzz",
                                 "*", "http://x/hooks/fuzz", "/hooks/fuzz#f", "/" + "a" * 70000])
    return kind


def parse_responses(data):
    """Split a byte stream into HTTP responses [(status, headers dict, body)]; raises ValueError."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("incomplete response head: %r" % data[:200])
        lines = head.split(b"\r\n")
        m = re.match(rb"HTTP/1\.[01] (\d{3}) ", lines[0] + b" ")
        if not m:
            raise ValueError("bad status line: %r" % lines[0][:200])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if "content-length" not in headers:
            raise ValueError("response without Content-Length: %r" % head[:300])
        n = int(headers["content-length"])
        if len(rest) < n:
            raise ValueError("response body shorter than its Content-Length")
        out.append((int(m.group(1)), headers, rest[:n]))
        data = rest[n:]
    return out


class FramingFuzzTest(FaultCase):
    read_timeout = 3
    max_connections = 32
    CASES, SEED = 2500, 4242

    def exchange(self, data):
        """Send ``data``, half-close, read until the server closes. Returns bytes; fails on a hang."""
        with socket.create_connection(("127.0.0.1", self.d.port), timeout=10) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server refused early (a huge head): what it sent is still readable
            started = time.monotonic()
            out = read_to_eof(s)
            self.assertLess(time.monotonic() - started, 9, "the server hung on %r" % data[:300])
            return out

    def test_seeded_framing_fuzz(self):
        rng = random.Random(self.SEED)
        accepted, kinds, closed = [], collections.Counter(), 0
        problems = collections.OrderedDict()  # what went wrong -> the first few cases showing it
        for case in range(self.CASES):
            req = FuzzRequest(rng, case)
            names = [] if case % 10 == 0 else [mutate(req, rng) for _ in range(rng.randint(1, 3))]
            kinds.update(names)
            raw = req.raw()
            replies, status = self.one_case(case, names, raw, problems)
            closed += replies == []
            if status in (200, 202):
                answer = json.loads(replies[0][2])
                if answer.get("status") in ("queued", "duplicate"):
                    accepted.append((case, answer["id"], req.expected, names, raw))
            if case % 250 == 0:
                self.assertIsNone(self.d.proc.poll(), "daemon died at case %d" % case)
        self.check_stored(accepted, problems)
        record("framing fuzz (mutated requests)", injected=self.CASES - self.CASES // 10,
               acknowledged=len(accepted))
        print("\nfuzz: %d cases, %d accepted, %d closed without answer; mutations %s"
              % (self.CASES, len(accepted), closed, dict(kinds)), file=sys.stderr)
        if os.environ.get("HOOKD_FUZZ_REPORT"):  # every problem case, for a closer look
            with open(os.environ["HOOKD_FUZZ_REPORT"], "w") as f:
                json.dump(problems, f, indent=1)
        self.assertEqual(problems, {}, "\n".join("%s (%d cases), e.g. %s" % (k, len(v), v[:3])
                                                  for k, v in problems.items()))
        self.assertEqual(self.statuses("smuggled"), {}, "a smuggled request was stored")
        self.assert_serving()

    def one_case(self, case, names, raw, problems):
        """Run one exchange; note each problem under its kind. Returns (replies or None, first status)."""
        def note(kind):
            problems.setdefault(kind, []).append("case %d %s: %r" % (case, names, raw[:300]))
        try:
            replies = parse_responses(self.exchange(raw))
        except ValueError as e:
            note("unparsable response: %s" % str(e).split(":")[0])
            return None, None
        if not replies:
            if not names:
                note("a valid request got no answer")
            return [], None
        for kind in reply_problems(names, replies):
            note(kind)
        return replies, replies[0][0]

    def check_stored(self, accepted, problems):
        for case, event_id, expected, names, raw in accepted:
            event = self.admin("/events/%d" % event_id)
            if "body" in event:
                stored = event["body"].encode("utf-8")
            else:
                stored = base64.b64decode(event.get("body_base64", ""))
            if stored not in expected:
                problems.setdefault("2xx but the stored body differs from the one sent", []).append(
                    "case %d %s: %r" % (case, names, raw[:300]))


def reply_problems(names, replies):
    """What is wrong with the responses to one (possibly mutated) request, as short kinds."""
    out = []
    if not names and replies[0][0] != 202:
        out.append("valid request answered %d" % replies[0][0])
    for status, _, _ in replies:
        if not (status in (200, 202) or 400 <= status < 500 or status in (501, 503, 505)):
            out.append("status %d for bad input" % status)
    if len(replies) > 1:
        if replies[0][1].get("connection", "").lower() == "close":
            out.append("answered again after Connection: close")
        if [s for s, _, _ in replies[1:] if 200 <= s < 300]:
            out.append("a second request was found in one request's bytes")
    return out


# -- secrets in logs ----------------------------------------------------------------------------------------

class ZzSecretsInLogsTest(FaultCase):
    """Runs last (alphabetical): exercises every secret once more, then scans every daemon's log."""

    def test_no_secret_token_or_signature_in_any_log(self):
        body = b'{"secret": "check"}'
        signature = "sha256=" + support.hmac_hex(HMAC_SECRET, body)
        bad_signature = "sha256=" + support.hmac_hex("not-the-secret", body)
        SECRETS.update({signature, signature[7:], bad_signature[7:]})
        self.assertEqual(self.d.post("/hooks/signed", body, {"X-Signature": signature})[0], 202)
        self.assertEqual(self.d.post("/hooks/signed", body + b" ", {"X-Signature": bad_signature})[0], 401)
        self.assertEqual(self.d.post("/hooks/work", body, {"X-Hook-Token": WRONG_TOKEN})[0], 401)
        self.assertEqual(self.d.post("/hooks/work", body, {"X-Hook-Token": "Bearer " + TOKEN_SECRET})[0], 202)
        self.d.admin("GET", "/metrics", headers={"Authorization": "Bearer " + WRONG_TOKEN})
        self.assertEqual(self.d.stop(), 0)
        record("secrets scanned in logs", injected=len(SECRETS))
        leaks = []
        for daemon in DAEMONS:
            text = daemon.log()
            self.assertTrue(text, "an empty log proves nothing")
            leaks += ["%s... in %s" % (s[:6], daemon.tmp) for s in SECRETS if s in text]
        self.assertEqual(leaks, [])


if __name__ == "__main__":
    unittest.main()
