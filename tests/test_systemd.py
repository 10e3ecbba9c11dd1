"""Tests for hookd as a systemd service, without systemd: sd_notify, socket activation, the watchdog, the unit.

Strategy: the test plays systemd's part. It binds the notify socket itself (a path, and an abstract name)
and reads what hookd sends; it binds the listening socket itself and hands it to hookd as fd 3 through a
tiny ``python3 -c`` wrapper that sets ``LISTEN_PID`` to its own pid and then ``execv``s hookd (same pid).
The pure helpers (``watchdog_ok``, ``Watchdog``, ``watchdog_interval``) are called with plain numbers.
The unit file is scored with the real ``systemd-analyze security --offline=yes``, and the claim that
``MemoryDenyWriteExecute=yes`` leaves ffmpeg working is checked under the kernel's own W^X switch.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from hookd_core import systemd
from tests import support

ROOT = support.ROOT
UNIT = os.path.join(ROOT, "systemd", "hookd.service")
SOCKET_UNIT = os.path.join(ROOT, "systemd", "hookd.socket")
MAX_SCORE = 1.2  # SPEC §7 allows 1.5; issue 16 kept it at 1.1, sched_setscheduler (job_idle_after) costs 0.1

# Runs in the child: move the passed socket to fd 3, claim it with LISTEN_PID (execv keeps the pid).
ACTIVATE = ("import os, sys\n"
            "fd = int(sys.argv[1])\n"
            "if fd != 3:\n"
            "    os.dup2(fd, 3)\n"
            "    os.close(fd)\n"
            "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES='hookd.socket')\n"
            "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n")


class NotifyReceiver:
    """The test's stand-in for systemd's notify socket: a bound AF_UNIX datagram socket whose messages
    are collected, with arrival times, by a thread. ``address`` is what goes into $NOTIFY_SOCKET."""

    def __init__(self, abstract=False, on_message=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = "hookd-test-%d-%d" % (os.getpid(), id(self))
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.dir = tempfile.mkdtemp(prefix="hookd-notify-")
            self.address = os.path.join(self.dir, "notify")
            self.sock.bind(self.address)
        self.sock.settimeout(0.2)
        self.messages = []  # (monotonic time, text)
        self.on_message = on_message
        self.lock = threading.Lock()
        self.closed = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.closed.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            text = data.decode("utf-8", "replace")
            if self.on_message:
                self.on_message(text)
            with self.lock:
                self.messages.append((time.monotonic(), text))

    def texts(self):
        with self.lock:
            return [t for _, t in self.messages]

    def times_of(self, text):
        with self.lock:
            return [at for at, t in self.messages if text in t.split("\n")]

    def wait_for(self, text, timeout=15):
        return support.wait_until(lambda: text in "\n".join(self.texts()).split("\n"), timeout,
                                  message="%s on the notify socket (got %r)" % (text, self.texts()[-5:]))

    def close(self):
        self.closed.set()
        self.sock.close()
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)


def listening_ports(pid):
    """TCP ports on which process ``pid`` holds a socket in LISTEN state, read from /proc."""
    inodes = set()
    fd_dir = "/proc/%d/fd" % pid
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m.group(1))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


class ActivatedDaemon(support.Daemon):
    """hookd started the way systemd starts it from hookd.socket: the test's listening socket as fd 3."""

    def __init__(self, config_text, listener, **kw):
        super().__init__(config_text, **kw)
        self.listener = listener

    def start(self, timeout=15):
        fd = self.listener.fileno()
        self.port = None
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ACTIVATE, str(fd), support.HOOKD, "--config", self.config_path],
            cwd=self.tmp, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(fd,))
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        support.wait_until(lambda: self.port or self.proc.poll() is not None, timeout,
                           message="activated daemon to listen")
        if self.port is None:
            raise AssertionError("daemon exited with %s:\n%s" % (self.proc.returncode, self.log()))
        return self


def tcp_listener():
    """A listening TCP socket on 127.0.0.1 (port 0), as systemd would hold it for hookd.socket."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


# -- sd_notify --------------------------------------------------------------------------------------------

class NotifyTest(unittest.TestCase):
    def test_notify_reaches_a_path_socket(self):
        r = NotifyReceiver()
        self.addCleanup(r.close)
        self.assertTrue(systemd.notify("READY=1\nSTATUS=0 queued", {"NOTIFY_SOCKET": r.address}))
        r.wait_for("STATUS=0 queued", 5)
        self.assertEqual(r.texts(), ["READY=1\nSTATUS=0 queued"])

    def test_notify_reaches_an_abstract_socket(self):
        r = NotifyReceiver(abstract=True)
        self.addCleanup(r.close)
        self.assertTrue(r.address.startswith("@"))
        self.assertTrue(systemd.notify("WATCHDOG=1", {"NOTIFY_SOCKET": r.address}))
        r.wait_for("WATCHDOG=1", 5)

    def test_notify_uses_os_environ_by_default(self):
        r = NotifyReceiver()
        self.addCleanup(r.close)
        old = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = r.address
        try:
            self.assertTrue(systemd.notify("STOPPING=1"))
        finally:
            if old is None:
                del os.environ["NOTIFY_SOCKET"]
            else:
                os.environ["NOTIFY_SOCKET"] = old
        r.wait_for("STOPPING=1", 5)

    def test_notify_without_a_socket_is_false_and_never_raises(self):
        cases = [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "/nonexistent/dir/notify"},
                 {"NOTIFY_SOCKET": "@" + "x" * 300}, {"NOTIFY_SOCKET": "/tmp/a\0b"},
                 {"NOTIFY_SOCKET": "relative/path"}, {"NOTIFY_SOCKET": "vsock:2:1234"}]
        for env in cases:
            with self.subTest(env=env):
                self.assertFalse(systemd.notify("READY=1", env))

    def test_notify_refuses_empty_and_oversized_messages(self):
        r = NotifyReceiver()
        self.addCleanup(r.close)
        env = {"NOTIFY_SOCKET": r.address}
        self.assertFalse(systemd.notify("", env))
        self.assertFalse(systemd.notify("STATUS=" + "x" * 10000, env))
        self.assertTrue(systemd.notify("STATUS=ok", env))
        r.wait_for("STATUS=ok", 5)
        self.assertEqual(r.texts(), ["STATUS=ok"])


# -- socket activation ------------------------------------------------------------------------------------

# The child adopts fd 3 through listen_sockets(), reports what it saw, then serves one connection.
CHILD = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from hookd_core import systemd
socks = systemd.listen_sockets()
report = {"count": len(socks), "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
          "inheritable": [s.get_inheritable() for s in socks]}
if socks:
    report["addr"] = list(socks[0].getsockname())
    conn, _ = socks[0].accept()
    conn.sendall(b"hello from " + str(os.getpid()).encode())
    conn.close()
print(json.dumps(report), flush=True)
"""


class ListenSocketsTest(unittest.TestCase):
    def run_child(self, listener, pid_expr="str(os.getpid())"):
        wrapper = ACTIVATE.replace("str(os.getpid())", pid_expr)
        fd = listener.fileno()
        return subprocess.Popen([sys.executable, "-c", wrapper, str(fd), "-c", CHILD, ROOT],
                                stdout=subprocess.PIPE, pass_fds=(fd,), text=True)

    def test_child_adopts_fd3_serves_it_and_unsets_the_variables(self):
        listener = tcp_listener()
        self.addCleanup(listener.close)
        child = self.run_child(listener)
        with socket.create_connection(listener.getsockname(), timeout=10) as c:
            c.settimeout(10)
            greeting = c.recv(100)
        out, _ = child.communicate(timeout=20)
        report = json.loads(out)
        self.assertEqual(greeting, b"hello from %d" % child.pid)
        self.assertEqual(report["count"], 1)
        self.assertEqual(report["addr"], list(listener.getsockname()))
        self.assertEqual(report["env"], [])
        self.assertEqual(report["inheritable"], [False])

    def test_variables_for_another_pid_are_ignored_and_kept(self):
        listener = tcp_listener()
        self.addCleanup(listener.close)
        child = self.run_child(listener, pid_expr="'1'")
        out, _ = child.communicate(timeout=20)
        report = json.loads(out)
        self.assertEqual(report["count"], 0)
        self.assertEqual(report["env"], ["LISTEN_FDNAMES", "LISTEN_FDS", "LISTEN_PID"])

    def test_garbage_variables_give_no_sockets(self):
        for env in [{}, {"LISTEN_PID": str(os.getpid())}, {"LISTEN_PID": "x", "LISTEN_FDS": "1"},
                    {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "-1"},
                    {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}]:
            with self.subTest(env=env):
                self.assertEqual(systemd.listen_sockets(dict(env)), [])

    def test_non_socket_fds_are_skipped(self):
        # fd 3.. in this process are whatever the test runner has open: adopt none that is not a socket.
        spare = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, spare)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(spare - 2)}
        socks = systemd.listen_sockets(env)
        try:
            self.assertEqual(env, {})
            self.assertNotIn(spare, [s.fileno() for s in socks])
        finally:
            for s in socks:
                s.detach()  # the fds belong to the test runner: do not close them


# -- the watchdog -----------------------------------------------------------------------------------------

class WatchdogTest(unittest.TestCase):
    def test_interval_is_half_of_watchdog_usec(self):
        self.assertEqual(systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}), 15.0)
        self.assertEqual(systemd.watchdog_interval({"WATCHDOG_USEC": "400000",
                                                    "WATCHDOG_PID": str(os.getpid())}), 0.2)

    def test_interval_is_none_when_off_or_for_another_process(self):
        for env in [{}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "abc"},
                    {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)},
                    {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}]:
            with self.subTest(env=env):
                self.assertIsNone(systemd.watchdog_interval(env))

    def test_watchdog_ok_table(self):
        now = 1000.0
        cases = [  # (last_progress, busy, job_timeout, healthy)
            ([], [], 10, True),                                      # no workers yet
            ([0.0, 0.0], [False, False], 10, True),                  # idle for ages: healthy
            ([995.0, 0.0], [True, False], 10, True),                 # busy, recent progress
            ([985.0, 999.0], [True, True], 10, False),               # one busy past its timeout
            ([985.0, 999.0], [True, True], [20, 10], True),          # per-job timeouts
            ([985.0, 999.0], [True, True], [5, 10], False),
            ([None], [True], 10, False),                             # busy, never reported
            ([990.0], [True], 10, True),                             # exactly at the limit
        ]
        for last, busy, timeout, healthy in cases:
            with self.subTest(last=last, busy=busy, timeout=timeout):
                self.assertIs(systemd.watchdog_ok(last, busy, timeout, now), healthy)

    def test_pings_at_the_interval_only_while_healthy(self):
        sent = []
        clock = [100.0]
        dog = systemd.Watchdog({"WATCHDOG_USEC": "2000000"}, send=lambda s: sent.append(s) or True,
                               clock=lambda: clock[0])
        self.assertTrue(dog.enabled)
        self.assertTrue(dog.tick(True))          # first tick pings at once
        clock[0] += 0.5
        self.assertFalse(dog.tick(True))         # not due yet (interval 1 s)
        clock[0] += 0.6
        self.assertTrue(dog.tick(True))
        clock[0] += 1.1
        self.assertFalse(dog.tick(False))        # due, but the pool is stuck: withheld
        clock[0] += 5
        self.assertFalse(dog.tick(False))
        self.assertEqual(dog.missed, 2)
        self.assertTrue(dog.tick(True))          # recovered: pings again
        self.assertEqual(sent, ["WATCHDOG=1"] * 3)

    def test_disabled_watchdog_never_sends(self):
        sent = []
        dog = systemd.Watchdog({}, send=sent.append)
        self.assertFalse(dog.enabled)
        self.assertFalse(dog.tick(True, now=1.0))
        self.assertEqual(sent, [])

    def test_default_sender_reaches_the_notify_socket(self):
        r = NotifyReceiver(abstract=True)
        self.addCleanup(r.close)
        dog = systemd.Watchdog({"WATCHDOG_USEC": "1000000", "NOTIFY_SOCKET": r.address})
        self.assertTrue(dog.tick(True))
        r.wait_for("WATCHDOG=1", 5)


# -- the unit files ---------------------------------------------------------------------------------------

def unit_settings(path):
    """[(key, value)] of a unit file, comments and section headers left out."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", ";", "[")) and "=" in line:
                key, value = line.split("=", 1)
                out.append((key.strip(), value.strip()))
    return out


class UnitFileTest(unittest.TestCase):
    def test_service_has_the_required_directives(self):
        settings = dict(unit_settings(UNIT))
        for key, value in [("Type", "notify"), ("NotifyAccess", "main"), ("DynamicUser", "yes"),
                           ("StateDirectory", "hookd"), ("Restart", "on-failure"),
                           ("ExecReload", "/bin/kill -HUP $MAINPID"),
                           ("LoadCredential", "credentials.properties:/etc/hookd/credentials.properties"),
                           ("MemoryDenyWriteExecute", "yes")]:
            self.assertEqual(settings.get(key), value, key)
        self.assertIn("WatchdogSec", settings)
        self.assertIn("%d/credentials.properties", settings["Environment"])
        self.assertIn("${HOOKD_CONFIG}", settings["ExecStart"])

    def test_children_are_bounded_and_kept_from_metadata_and_the_admin_api(self):
        settings = unit_settings(UNIT)
        values = dict(settings)
        self.assertRegex(values.get("MemoryMax", ""), r"^\d+[KMG]$")
        self.assertRegex(values.get("TasksMax", ""), r"^\d+$")
        denied = " ".join(v for k, v in settings if k == "IPAddressDeny").split()
        self.assertIn("169.254.0.0/16", denied)
        self.assertEqual(values.get("RuntimeDirectory"), "hookd")  # the admin API's unix socket lives there
        self.assertEqual(values.get("RuntimeDirectoryMode"), "0700")

    def test_stop_timeout_exceeds_shutdown_grace(self):
        from hookd_core.config import HOOKD_KEYS
        stop = dict(unit_settings(UNIT))["TimeoutStopSec"]
        self.assertTrue(stop.endswith("s"), stop)
        self.assertGreater(int(stop[:-1]), int(HOOKD_KEYS["shutdown_grace"]))

    def test_every_setting_line_is_commented(self):
        # Obvious lines aside, each directive has a comment right above it or within its block.
        obvious = {"Description", "WantedBy", "Accept"}
        with open(UNIT) as f:
            lines = [l.rstrip("\n") for l in f]
        for i, line in enumerate(lines):
            if not line or line.startswith(("#", "[")) or line.split("=")[0] in obvious:
                continue
            block = lines[max(0, i - 12):i]
            self.assertTrue(any(l.startswith("#") for l in block), "no comment near: %s" % line)

    def test_socket_unit_listens_and_is_not_per_connection(self):
        settings = dict(unit_settings(SOCKET_UNIT))
        self.assertIn("ListenStream", settings)
        self.assertEqual(settings.get("Accept"), "no")

    def test_the_admin_listener_is_not_a_socket_of_the_socket_unit(self):
        listens = [k for k, _ in unit_settings(SOCKET_UNIT) if k.startswith("Listen")]
        self.assertEqual(listens, ["ListenStream"], "one socket: the webhook port (hookd binds admin.listen)")
        self.assertEqual(dict(unit_settings(UNIT)).get("RuntimeDirectory"), "hookd",
                         "/run/hookd for admin.listen = unix:/run/hookd/admin.sock")

    def test_exposure_score(self):
        tool = shutil.which("systemd-analyze")
        if not tool:
            self.skipTest("systemd-analyze is not installed on this machine")
        r = subprocess.run([tool, "security", "--offline=yes", UNIT], capture_output=True, text=True,
                           timeout=120)
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", r.stdout + r.stderr)
        self.assertIsNotNone(m, r.stdout[-2000:] + r.stderr[-2000:])
        score = float(m.group(1))
        print("\nsystemd-analyze security --offline=yes systemd/hookd.service: %.1f %s"
              % (score, m.group(2)), file=sys.stderr)
        self.assertLessEqual(score, MAX_SCORE)

    def test_the_filter_lets_hookd_lower_its_jobs_and_keeps_the_rest_of_resources(self):
        """The unit's SystemCallFilter= lines in order (the first an allow list; ~ takes away, a later allow
        line gives back), each @group expanded by systemd-analyze itself: sched_setscheduler is the one call
        of @resources left (job_idle_after), and it is allowed."""
        tool = shutil.which("systemd-analyze")
        if not tool:
            self.skipTest("systemd-analyze is not installed on this machine")
        groups = {}

        def calls(item):
            if not item.startswith("@"):
                return {item}
            if item not in groups:
                out = subprocess.run([tool, "syscall-filter", item], capture_output=True, text=True, timeout=60)
                listed = [l.strip() for l in out.stdout.splitlines()[1:] if l.strip() and not l.strip().startswith("#")]
                self.assertTrue(listed, out.stdout + out.stderr)
                groups[item] = set().union(*(calls(l) for l in listed))
            return groups[item]

        allowed = None
        for key, value in unit_settings(UNIT):
            if key == "SystemCallFilter":
                named = set().union(*(calls(i) for i in value.lstrip("~").split()))
                if allowed is None:
                    self.assertFalse(value.startswith("~"), "the first filter line is an allow list")
                    allowed = named
                elif value.startswith("~"):
                    allowed -= named
                else:
                    allowed |= named
        self.assertEqual(calls("@resources") & allowed, {"sched_setscheduler"})
        self.assertFalse(calls("@privileged") & allowed)
        values = dict(unit_settings(UNIT))  # and a job made idle cannot raise itself back
        self.assertEqual((values.get("LimitNICE"), values.get("LimitRTPRIO"), values.get("RestrictRealtime")),
                         ("0", "0", "yes"))

    def test_verify_finds_no_problem(self):
        tool = shutil.which("systemd-analyze")
        if not tool:
            self.skipTest("systemd-analyze is not installed on this machine")
        r = subprocess.run([tool, "verify", UNIT, SOCKET_UNIT], capture_output=True, text=True,
                           timeout=120)
        # /opt/hookd is not installed on a test machine; anything else is a mistake in the units.
        problems = [l for l in (r.stdout + r.stderr).splitlines()
                    if l.strip() and "/opt/hookd" not in l and "Failed to prepare filename" not in l]
        self.assertEqual(problems, [])


# Applies the kernel's W^X rule (prctl PR_SET_MDWE, Linux 6.3+: what MemoryDenyWriteExecute=yes
# enforces with seccomp) to itself, proves it holds, then execs the program given.
MDWE = ("import ctypes, mmap, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"
        "    sys.exit(77)\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    sys.exit(78)\n"
        "except OSError:\n"
        "    pass\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n")


class MemoryDenyWriteExecuteTest(unittest.TestCase):
    def run_mdwe(self, argv, timeout=120):
        r = subprocess.run([sys.executable, "-c", MDWE] + argv, capture_output=True, timeout=timeout)
        if r.returncode == 77:
            self.skipTest("this kernel has no PR_SET_MDWE (Linux 6.3+)")
        self.assertNotEqual(r.returncode, 78, "W+X memory was still allowed: the rule did not apply")
        return r

    def test_ffmpeg_libx264_encodes_without_wx_memory(self):
        ffmpeg = shutil.which("ffmpeg")
        if not ffmpeg:
            self.skipTest("ffmpeg is not installed")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "clip.mp4")
            r = self.run_mdwe([ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                               "testsrc=size=160x120:rate=10", "-t", "1", "-c:v", "libx264",
                               "-pix_fmt", "yuv420p", out])
            self.assertEqual(r.returncode, 0, r.stderr[-2000:])
            self.assertGreater(os.path.getsize(out), 1000)

    def test_hookd_modules_import_without_wx_memory(self):
        code = ("import sys; sys.path.insert(0, %r)\n"
                "import sqlite3, ssl, http.server, json, hmac, hookd_core.systemd, hookd_core.config\n"
                "print('ok')" % ROOT)
        r = self.run_mdwe([sys.executable, "-c", code])
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertEqual(r.stdout.strip(), b"ok")


# -- the daemon end to end --------------------------------------------------------------------------------

CONFIG = """[hookd]
workers = 2
shutdown_grace = 5
retry.base_delay = 0.05
retry.max_delay = 0.2

[hook:ping]
verify = none
allow_unsigned = true
command = %(python)s %(tmp)s/env.py
"""

ENV_SCRIPT = """import json, os, sys
sys.stdin.read()
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "env-" + os.environ["HOOKD_EVENT_ID"]), "w") as f:
    json.dump(sorted(os.environ), f)
"""


class DaemonTestBase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="hookd-sd-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        with open(os.path.join(self.tmp, "env.py"), "w") as f:
            f.write(ENV_SCRIPT)
        self.config = CONFIG % {"python": sys.executable, "tmp": self.tmp}

    def daemon(self, cls=support.Daemon, **kw):
        d = cls(self.config, tmpdir=self.tmp, **kw)
        self.addCleanup(self._stop, d)
        return d

    @staticmethod
    def _stop(d):
        if d.proc is not None and d.proc.poll() is None:
            d.kill9()


class DaemonNotifyTest(DaemonTestBase):
    def test_ready_after_listening_status_watchdog_and_stopping(self):
        seen = {}
        holder = {}

        def on_message(text):  # runs as each datagram arrives: is hookd listening at READY=1 time?
            if "READY=1" in text.split("\n") and "d" in holder:
                seen["ports_at_ready"] = listening_ports(holder["d"].proc.pid)

        r = NotifyReceiver(abstract=True, on_message=on_message)
        self.addCleanup(r.close)
        d = self.daemon(env={"NOTIFY_SOCKET": r.address, "WATCHDOG_USEC": "400000"})
        holder["d"] = d
        d.start()
        r.wait_for("READY=1")
        self.assertIn(d.port, seen.get("ports_at_ready", set()), "READY=1 came before hookd listened")
        support.wait_until(lambda: len(r.times_of("WATCHDOG=1")) >= 3, 15, message="3 watchdog pings")
        self.assertTrue(any(t.startswith("STATUS=") for m in r.texts() for t in m.split("\n")), r.texts())
        self.assertEqual(d.stop(), 0)
        r.wait_for("STOPPING=1", 5)
        ready, stopping = r.times_of("READY=1")[0], r.times_of("STOPPING=1")[0]
        self.assertLess(ready, stopping)
        self.assertEqual(len(r.times_of("READY=1")), 1)

    def test_no_notify_socket_is_fine(self):
        d = self.daemon().start()
        status, _, _ = d.get("/healthz")
        self.assertEqual(status, 200)
        self.assertEqual(d.stop(), 0)


class SocketActivationTest(DaemonTestBase):
    def test_serves_the_inherited_socket_and_children_do_not_inherit_it(self):
        listener = tcp_listener()
        self.addCleanup(listener.close)
        d = self.daemon(ActivatedDaemon, listener=listener).start()
        self.assertEqual(d.port, listener.getsockname()[1])
        status, _, body = support.post(d.url + "/hooks/ping", b'{"n": 1}')
        self.assertEqual(status, 202, body)
        event_id = json.loads(body)["id"]
        d.wait_status(event_id, "done")
        with open(os.path.join(self.tmp, "env-%s" % event_id)) as f:
            env = json.load(f)
        self.assertFalse([k for k in env if k.startswith("LISTEN_")], env)
        self.assertEqual(d.admin("GET", "/healthz")[0], 200, "hookd binds its admin listener itself")
        self.assertEqual(d.get("/metrics")[0], 404, "never on the inherited webhook socket")
        self.assertEqual(d.stop(), 0)

    def test_restart_on_the_same_socket_refuses_no_connection(self):
        listener = tcp_listener()
        self.addCleanup(listener.close)
        addr = listener.getsockname()
        first = self.daemon(ActivatedDaemon, listener=listener).start()
        self.assertEqual(first.post("/hooks/ping", b'{"round": 0}')[0], 202)
        first.signal(signal.SIGTERM)

        def send(s, i):
            body = b'{"round": %d}' % i
            s.sendall(b"POST /hooks/ping HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        # A connection made while hookd stops (the old process may already have accepted it, then it
        # serves it), and one made while no hookd runs (the held socket queues it for the next one).
        pending = [socket.create_connection(addr, timeout=30)]
        send(pending[0], 1)
        self.assertEqual(first.proc.wait(40), 0)
        pending.append(socket.create_connection(addr, timeout=30))
        send(pending[1], 2)
        second = self.daemon(ActivatedDaemon, listener=listener).start()
        for s in pending:
            with s:
                reply = read_reply(s)
            self.assertRegex(reply, rb"^HTTP/1\.1 202 ", reply[:200])
        ids = [e["id"] for e in second.events()]
        self.assertEqual(len(ids), 3)
        for event_id in ids:
            second.wait_status(event_id, "done")
        self.assertEqual(second.stop(), 0)


def read_reply(sock):
    """Everything the server sends until it closes the connection (bounded by the socket timeout)."""
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


if __name__ == "__main__":
    unittest.main()
