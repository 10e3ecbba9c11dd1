"""Children hookd starts, held to SPEC §6 (command) and §7: a clean environment, bounded output, and no
process that outlives its job or hookd — on a timeout, on SIGTERM, and after a kill -9 and a restart.

The real daemon runs real programs (python3 scripts, ``head``, ``sleep``, ``setsid``, the real ffmpeg
recording tests/fake_camera.py). Processes are found and judged through /proc: a pid file the program
writes, or ffmpeg by the camera URL in its command line. ``proc`` is also called directly, as the
command action and the labelers call it.
"""

import errno
import hashlib
import json
import logging
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tracemalloc
import unittest

from hookd_core import actions, config, proc
from hookd_core.children import Registry
from hookd_core.store import Store
from tests import test_ixon
from tests.fake_camera import FakeCamera
from tests.support import Daemon, Worker, process_alive, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRETS = {"HOOK_SECRET": "hook-secret-0123456789", "ADMIN_TOKEN": "admin-token-0123456789",
           "CAMERA_PASSWORD": "camera-password-0123456789"}

DUMP_ENV = textwrap.dedent("""\
    import json, os, sys
    sys.stdin.read()
    with open(sys.argv[1] + "-" + os.environ.get("HOOKD_EVENT_ID", "x"), "w") as f:
        json.dump(dict(os.environ), f)
""")

# Writes its pid and the pid of a grandchild that left for its own session, then sleeps.
SLEEPER = textwrap.dedent("""\
    import os, subprocess, sys, time
    escaped = subprocess.Popen(["sleep", "30"], start_new_session=True)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write("%d %d" % (os.getpid(), escaped.pid))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    sys.stdin.read()
    os.execvp("sleep", ["sleep", "30"])
""")


def rss_peak_kb(pid):
    """VmHWM (the peak resident set size) of ``pid`` in kB, from /proc/PID/status."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM for %d" % pid)


def pids_with_cmdline(needle):
    """Live (non-zombie) processes whose command line contains ``needle``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle.encode() in cmdline and process_alive(int(name)):
            found.append(int(name))
    return found


def environ_of(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        return dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)


def read_pids(path):
    wait_until(lambda: os.path.exists(path), 20, message="the command to write %s" % path)
    with open(path) as f:
        return [int(p) for p in f.read().split()]


class Base(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="hookd-children-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def script(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def daemon(self, config, env=None):
        d = Daemon(config, tmpdir=self.tmp, env=env)
        self.addCleanup(lambda: d.proc and d.proc.poll() is None and d.kill9())
        return d.start()

    def assert_stop_leaves_nothing(self, d, pidfile):
        """The SLEEPER command of a running job wrote ``pidfile``: SIGTERM ``d`` (exit 0), and neither the
        command nor its setsid grandchild may be left."""
        pids = read_pids(pidfile)
        self.assertTrue(all(process_alive(p) for p in pids))
        self.assertEqual(d.stop(), 0)
        wait_until(lambda: not any(process_alive(p) for p in pids), 5,
                   message="the command %s to be gone after %s stopped" % (pids, d.__class__.__name__))

    def accepted(self, d, path="/hooks/job", body=b'{"n": 1}', headers=None):
        status, _, reply = d.post(path, body, dict({"Content-Type": "application/json"}, **(headers or {})))
        self.assertEqual(status, 202, reply)
        return json.loads(reply)["id"]


class EnvironmentTest(Base):
    def test_a_command_sees_no_secret_only_the_clean_environment(self):
        creds = os.path.join(self.tmp, "creds")
        os.mkdir(creds, 0o700)
        with open(os.path.join(creds, "hook"), "w") as f:
            f.write(SECRETS["HOOK_SECRET"])
        dump = self.script("dump.py", DUMP_ENV)
        out = os.path.join(self.tmp, "env")
        env = dict(SECRETS, CREDENTIALS_DIRECTORY=creds, NOTIFY_SOCKET=os.path.join(self.tmp, "no-notify"),
                   HOOKD_CONFIG=os.path.join(self.tmp, "credentials.properties"), WANTED="yes",
                   UNWANTED="no", LC_TIME="C", TZ="UTC", LANG="C.UTF-8")
        d = self.daemon(textwrap.dedent("""\
            [hookd]
            admin.token = env:ADMIN_TOKEN
            [hook:job]
            verify = token
            token.header = X-Token
            secret = cred:hook
            command = %s %s %s
            command.env = WANTED HOOK_SECRET
            """) % (sys.executable, dump, out), env=env)
        event_id = self.accepted(d, headers={"X-Token": SECRETS["HOOK_SECRET"]})
        d.wait_status(event_id, "done")
        with open("%s-%d" % (out, event_id)) as f:
            seen = json.load(f)
        allowed = {"PATH", "LANG", "TZ", "HOME", "WANTED"}
        extra = [k for k in seen if k not in allowed and not k.startswith(("LC_", "HOOKD_"))]
        self.assertEqual(extra, [], seen)
        self.assertEqual((seen["WANTED"], seen["LC_TIME"], seen["TZ"]), ("yes", "C", "UTC"))
        self.assertEqual(seen["HOOKD_EVENT_ID"], str(event_id))
        self.assertNotIn("HOOKD_CONFIG", seen)
        text = json.dumps(seen)
        for value in list(SECRETS.values()) + [creds]:
            self.assertNotIn(value, text)
        d.stop()

    def test_child_env_helper(self):
        environ = {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "TZ": "UTC", "LANG": "C", "SECRET": "xyz1234",
                   "HOOKD_CONFIG": "/c", "NOTIFY_SOCKET": "/n", "CREDENTIALS_DIRECTORY": "/d", "KEEP": "k"}
        env = proc.child_env({"HOOKD_ROUTE": "r"}, ["KEEP", "SECRET", "NOTIFY_SOCKET", "ABSENT"],
                             secrets=["xyz1234"], environ=environ)
        self.assertEqual(env, {"PATH": "/bin", "HOME": "/h", "LC_ALL": "C", "TZ": "UTC", "LANG": "C",
                               "HOOKD_ROUTE": "r", "KEEP": "k"})


    def test_check_config_refuses_command_env_names_never_passed(self):
        conf = config.Section("hook:t", {"command.env": "OK_NAME CREDENTIALS_DIRECTORY NOTIFY_SOCKET 1BAD"},
                              config.ACTION_KEYS)
        self.assertEqual(actions.check(conf), ["command.env: %s cannot be passed to a program" % n
                                               for n in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "1BAD")])


class OutputTest(Base):
    def test_400_mb_of_output_leaves_rss_flat(self):
        head = shutil.which("head")  # on stderr: a command's stdout is /dev/null, its stderr is read
        d = self.daemon("[hook:job]\nverify = none\nallow_unsigned = true\n"
                        "command = /bin/sh -c '%s -c 400000000 /dev/zero >&2'\ncommand.timeout = 120\n" % head)
        event_id = self.accepted(d)
        d.wait_status(event_id, "done", timeout=120)
        peak = rss_peak_kb(d.proc.pid)
        print("\ndaemon VmHWM after a command printed 400 MB: %.1f MB" % (peak / 1024.0), file=sys.stderr)
        self.assertLess(peak, 60 * 1024)
        d.stop()

    def test_output_past_the_cap_is_dropped_and_stdout_nobody_reads_is_dev_null(self):
        done = proc.run(["/bin/sh", "-c", "head -c 5000000 /dev/zero; head -c 4999999 /dev/zero >&2"], timeout=60)
        self.assertEqual((done.returncode, len(done.stdout), len(done.stderr)), (0, proc.MAX_OUTPUT, proc.STDERR_TAIL))
        probe = "import os, sys; sys.stdout.write('x' * 5000000); sys.stderr.write(os.readlink('/proc/self/fd/1'))"
        done = proc.run([sys.executable, "-c", probe], timeout=60, keep_stdout=False)
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, b"", b"/dev/null"))


    def test_stderr_keeps_its_last_words_in_bounded_memory(self):
        """stderr is where a program says why it failed, at its end: of 20 MB it keeps the last
        STDERR_TAIL bytes, and what the run holds at any time stays far below the 4 MB (the first
        MAX_OUTPUT bytes) it kept of each program before (review R6 addendum: 16 programs at once, 64 MB)."""
        probe = ("import sys\nw = sys.stderr.buffer.write\nfor _ in range(320):\n    w(b'e' * 65535 + b'\\n')\n"
                 "w(b'the real last line\\n')\nsys.exit(3)\n")
        # measured in a process of its own: tracemalloc counts every thread's allocations, and in this one
        # other tests' threads may be allocating meanwhile (the 1.13 MB once seen here on a busy machine
        # was the tree walk's buffer for each environment it read: LeftoverTest)
        measure = ("import json, sys, tracemalloc\nfrom hookd_core import proc\ntracemalloc.start()\n"
                   "done = proc.run([sys.executable, '-c', sys.argv[1]], timeout=120, keep_stdout=False)\n"
                   "peak = tracemalloc.get_traced_memory()[1]\n"
                   "json.dump([peak, done.returncode, done.stderr[-100:].decode(), len(done.stderr)], sys.stdout)\n")
        out = subprocess.run([sys.executable, "-c", measure, probe], cwd=ROOT, capture_output=True, timeout=180)
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        peak, returncode, last, kept = json.loads(out.stdout)
        self.assertLess(peak, 1 << 20, "bytes held at the peak of a run whose program wrote 20 MB of stderr")
        self.assertEqual(returncode, 3)
        self.assertTrue(last.endswith("e\nthe real last line\n"), last)
        self.assertEqual(kept, proc.STDERR_TAIL)


class StdinTest(Base):
    """stdin is fed as the program reads it, whatever its size, and never past the timeout."""

    def test_a_document_larger_than_a_pipe_reaches_the_program_whole(self):
        document = os.urandom(3 * 1024 * 1024)
        done = proc.run(["sha256sum"], stdin=document, timeout=60)
        self.assertEqual((done.returncode, done.timed_out), (0, False))
        self.assertEqual(done.stdout.split()[0].decode(), hashlib.sha256(document).hexdigest())

    def test_a_program_that_never_reads_a_large_document_times_out(self):
        done = proc.run(["sleep", "30"], stdin=b"x" * (3 * 1024 * 1024), timeout=1)
        self.assertTrue(done.timed_out)


class TimeoutTest(Base):
    def test_setsid_grandchild_is_killed_by_the_timeout(self):
        pidfile = os.path.join(self.tmp, "pid")
        argv = ["/bin/sh", "-c", "setsid sleep 60 & echo $! > %s; wait" % pidfile]
        done = proc.run(argv, timeout=1.5)
        self.assertTrue(done.timed_out)
        escaped = read_pids(pidfile)[0]
        wait_until(lambda: not process_alive(escaped), 5, message="setsid sleep %d to be killed" % escaped)


class LeftoverTest(Base):
    """A program that exits at once may leave processes behind; they are killed when it ends."""

    def test_an_orphan_in_its_own_session_is_killed_when_the_command_exits_0(self):
        pidfile = os.path.join(self.tmp, "pid")
        done = proc.run(["/bin/sh", "-c", "setsid sleep 60 >/dev/null 2>&1 & echo $! > %s" % pidfile],
                         timeout=10)
        self.assertEqual((done.returncode, done.timed_out), (0, False))
        escaped = read_pids(pidfile)[0]
        wait_until(lambda: not process_alive(escaped), 5, message="setsid sleep %d to be killed" % escaped)

    def test_an_orphan_is_killed_after_a_command_that_started_many_processes(self):
        pidfile = os.path.join(self.tmp, "pid")
        script = "i=0; while [ $i -lt 300 ]; do /bin/true; i=$((i+1)); done;" \
                 " setsid sleep 60 >/dev/null 2>&1 & echo $! > %s"
        done = proc.run(["/bin/sh", "-c", script % pidfile], timeout=60)
        self.assertEqual((done.returncode, done.timed_out), (0, False))
        escaped = read_pids(pidfile)[0]
        wait_until(lambda: not process_alive(escaped), 5, message="setsid sleep %d to be killed" % escaped)

    def test_a_walk_of_every_process_reads_each_environment_in_bounded_memory(self):
        """When more pids were handed out while a program ran than ``new_pids`` reads one by one (a busy
        host), ending it walks every process in /proc and reads each one's environment (up to 1 MiB) for
        its marker. What one such read holds is the environment's size in steps of READ_CHUNK, not a buffer
        of the 1 MiB limit for a few KB of text: that buffer, once a program, was the 1.13 MB peak that
        the stderr test above saw on a busy machine."""
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            carries = proc._carries(os.getpid(), "no-such-marker")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertFalse(carries)
        self.assertLess(peak, 2 * proc.READ_CHUNK + 4 * len(b"\0".join(
            b"%s=%s" % (k, v) for k, v in os.environb.items())))


# A shell (Python would set its own signals) that prints the fds it holds (one a line), its pid, group and
# session, and the mask of the signals it ignores. No pipeline: while `ls` ran, the shell still held the
# pipe's other end for the next command (fd 3 or 4 in 12 of 400 runs of a plain subprocess).
INSPECT = ["/bin/sh", "-c", "ls /proc/$$/fd; cut -d' ' -f1,5,6 /proc/$$/stat; grep SigIgn /proc/$$/status"]


def has_terminal():
    """True when this process has a controlling terminal (the suite run from a shell)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY))
        return True
    except OSError:
        return False


class StartTest(Base):
    """However ``run`` starts a program: its three pipes and nothing else, its own process group in hookd's
    session (in a session of its own, an autogroup would weigh it as much as all of hookd: IdleTest) unless
    hookd has a terminal, SIGPIPE and SIGXFSZ at their defaults (Python ignores both; a
    pipeline would never end)."""

    def inspect(self, out=None, popen=False, terminal=None):
        if out is None:
            done = proc.run(INSPECT, timeout=30)
            self.assertEqual(done.returncode, 0, done.stderr)
            out = done.stdout
        *fds, ids, ignored = out.decode().splitlines()
        pid, pgid, sid = ids.split()
        own = has_terminal() if terminal is None else terminal
        session = pid if own or (popen and sys.version_info < (3, 11)) else str(os.getsid(0))
        self.assertEqual((fds, pgid, sid), (["0", "1", "2"], pid, session))
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            self.assertFalse(int(ignored.split()[1], 16) & (1 << (sig - 1)), "signal %d ignored: %s" % (sig, ignored))

    def test_a_program_gets_its_pipes_a_group_and_default_signals(self):
        self.inspect()

    def test_no_inheritable_fd_reaches_it_even_while_one_may_be_opened(self):
        fd = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        os.set_inheritable(fd, True)  # what OpenSSL's fopen of a CA file leaves while a TLS call runs
        with proc.may_open_inheritable():
            self.inspect(popen=True)

    def test_an_fd_hookd_inherited_reaches_no_program(self):
        # a fresh process that holds an inheritable fd from the start, as one its parent left open
        code = ("import os, sys; fd = os.open(os.devnull, os.O_RDONLY); os.set_inheritable(fd, True); "
                "from hookd_core import proc; sys.stdout.buffer.write(proc.run(%r).stdout)" % INSPECT)
        self.inspect(subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, timeout=60).stdout)

    def test_a_child_of_a_hookd_with_a_terminal_has_none(self):
        """Started on a terminal (a shell, ``docker run -t``), hookd's children lead sessions of their own: in
        its session they could stop on SIGTTIN at /dev/tty, or type into the operator's shell (TIOCSTI)."""
        code = ("import sys; from hookd_core import proc; "
                "done = proc.run(['/bin/sh', '-c', 'if sh -c \\': </dev/tty\\' 2>/dev/null; then echo tty; else echo none; fi; ' + %r]); "
                "sys.stdout.write(done.stdout.decode())" % INSPECT[2])
        pid, master = pty.fork()
        if pid == 0:  # the child: a session leader whose controlling terminal is the pty
            try:
                os.chdir(ROOT)
                os.execv(sys.executable, [sys.executable, "-c", code])
            finally:
                os._exit(127)
        out = b""
        deadline = time.monotonic() + 60
        try:
            while select.select([master], [], [], max(0, deadline - time.monotonic()))[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child has exited and closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
        finally:
            os.close(master)
            if os.waitpid(pid, os.WNOHANG) == (0, 0):  # still there at the deadline (stopped, stuck)
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        tty, *rest = out.decode().replace("\r\n", "\n").splitlines()
        self.assertEqual(tty, "none", out)
        self.inspect("\n".join(rest).encode(), terminal=True)


# Prints its scheduling policy at its start; then, once it is SCHED_IDLE (or after 20 s), its own again, that of
# a thread it started at its start, of a thread it starts then, and of a process it started at its start.
SCHEDULING = textwrap.dedent("""\
    import os, subprocess, sys, threading, time
    WAIT = "import os, time\\nt = time.monotonic() + 20\\n" \\
           "while os.sched_getscheduler(0) != os.SCHED_IDLE and time.monotonic() < t:\\n    time.sleep(0.01)\\n"
    first, seen = os.sched_getscheduler(0), {}
    kid = subprocess.Popen([sys.executable, "-c", WAIT + "print(os.sched_getscheduler(0))"], stdout=subprocess.PIPE,
                           text=True)
    def early():
        exec(WAIT)
        seen["early"] = os.sched_getscheduler(0)
    started = threading.Thread(target=early)
    started.start()
    exec(WAIT)
    late = threading.Thread(target=lambda: seen.update(late=os.sched_getscheduler(0)))
    late.start()
    late.join()
    started.join()
    print(first, os.sched_getscheduler(0), seen["early"], seen["late"], kid.communicate()[0])
    """)


class IdleTest(Base):
    """``job_idle_after``: a program ``run`` starts that still runs after it goes SCHED_IDLE, with its threads
    (those it had and those it starts) and the processes it started (a CPU only when nothing else wants it:
    a busy job barely slows intake), however it was started: posix_spawn, or Popen (a working directory).
    A recording (``spawn``) keeps hookd's priority: a live stream cannot wait."""

    def scheduling(self, how, code=SCHEDULING):
        """The policies ``code`` printed."""
        argv = [sys.executable, "-c", code]
        if how == "spawn":
            child = proc.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                out = child.popen.communicate(timeout=60)[0]
            finally:
                proc.end(child)
        else:
            done = proc.run(argv, timeout=60, cwd=self.tmp if how == "popen" else None)
            self.assertEqual(done.returncode, 0, done.stderr)
            out = done.stdout
        return [int(n) for n in out.split()]

    def after(self, seconds):
        proc.idle_after(seconds, logging.getLogger("hookd"))
        self.addCleanup(proc.idle_after, None, None)

    def test_idle_at_once_however_started(self):
        self.after(0)
        for how in ("posix_spawn", "popen"):
            self.assertEqual(self.scheduling(how), [os.SCHED_IDLE] * 5, how)

    def test_idle_once_it_has_run_the_time_with_its_threads_and_what_it_started(self):
        self.after(1.0)
        for how in ("posix_spawn", "popen"):
            self.assertEqual(self.scheduling(how), [os.SCHED_OTHER] + [os.SCHED_IDLE] * 4, how)

    def test_a_program_done_in_time_never_goes_idle_nor_with_off_nor_a_recording(self):
        self.after(5.0)
        self.assertEqual(self.scheduling("posix_spawn", "import os; print(os.sched_getscheduler(0))"),
                         [os.SCHED_OTHER])
        self.after(0)
        quick = "import os, time; time.sleep(0.3); print(os.sched_getscheduler(0))"
        self.assertEqual(self.scheduling("spawn", quick), [os.SCHED_OTHER])
        self.after(None)
        self.assertEqual(self.scheduling("posix_spawn", quick), [os.SCHED_OTHER])

    def test_the_daemon_makes_a_command_idle_after_a_tenth_of_a_second_by_default(self):
        out = os.path.join(self.tmp, "policy")
        # /bin/sh reads its own policy (field 41 of its stat) within milliseconds of its start
        script = ("cut -d' ' -f41 /proc/$$/stat > %s.first; i=0; while [ $i -lt 400 ]; do"
                  " [ $(cut -d' ' -f41 /proc/$$/stat) = %d ] && break; sleep 0.05; i=$((i+1)); done;"
                  " cut -d' ' -f41 /proc/$$/stat > %s" % (out, os.SCHED_IDLE, out))
        with open(os.path.join(self.tmp, "policy.sh"), "w") as f:
            f.write(script + "\n")
        d = self.daemon(textwrap.dedent("""\
            [hookd]
            [hook:job]
            verify = none
            allow_unsigned = true
            command = /bin/sh %s
            """) % os.path.join(self.tmp, "policy.sh"))
        d.wait_status(self.accepted(d), "done")
        with open(out + ".first") as first, open(out) as last:
            self.assertEqual((int(first.read()), int(last.read())), (os.SCHED_OTHER, os.SCHED_IDLE))
        d.stop()


class GilKeepingCallsTest(unittest.TestCase):
    """The system calls a worker makes around its forks (closing pipe ends, reading /proc, reading a pipe
    the poll found ready, writing stdin) go to libc through a ``ctypes.PyDLL``, which keeps the GIL, and
    give what ``os``'s would: the bytes, the count, and the same OSError subclass by errno."""

    @unittest.skipUnless(proc.POSIX_SPAWN, "glibc only")
    def test_they_keep_the_gil_and_answer_as_os_does(self):
        import ctypes
        self.assertIsInstance(proc._libc()[1], ctypes.PyDLL)
        fd = proc._open("/proc/self/stat", os.O_RDONLY)
        try:
            self.assertFalse(os.get_inheritable(fd))
            self.assertEqual(proc._read_fd(fd, 4096).split()[0], str(os.getpid()).encode())
            self.assertEqual(proc._pread(fd, 4096, 0), os.pread(fd, 4096, 0))
            self.assertEqual(proc._pread(fd, 4096, 1 << 20), b"")
        finally:
            proc._close(fd)
        with self.assertRaises(OSError) as bad:
            proc._close(fd)
        self.assertEqual(bad.exception.errno, errno.EBADF)
        self.assertRaises(FileNotFoundError, proc._open, "/proc/self/no-such-file", os.O_RDONLY)
        r, w = os.pipe()
        os.set_blocking(w, False)
        self.assertEqual(proc._write_fd(w, memoryview(b"abc")), 3)
        self.assertEqual(proc._read_fd(r, 10), b"abc")
        with self.assertRaises(BlockingIOError):
            while True:
                proc._write_fd(w, b"x" * 65536)
        proc._close(r)
        self.assertRaises(BrokenPipeError, proc._write_fd, w, b"x")
        proc._close(w)
        r, w = os.pipe()
        pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", "read x; exit 7"], {},
                             file_actions=[(os.POSIX_SPAWN_DUP2, r, 0)])
        os.close(r)
        self.assertIsNone(proc._reaped(pid), "still running: not waited for")
        os.close(w)
        wait_until(lambda: os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None, 10,
                   message="the shell to exit")
        self.assertEqual(os.waitstatus_to_exitcode(proc._reaped(pid)), 7)
        self.assertRaises(ChildProcessError, proc._reaped, pid)


class SiblingTest(Base):
    """Jobs run side by side: ending one child's tree never touches another's, and still finds its own."""

    def test_an_orphan_without_the_marker_in_the_group_goes_and_a_sibling_lives_on(self):
        sibling_pid, orphan_pid = os.path.join(self.tmp, "sibling"), os.path.join(self.tmp, "orphan")
        results = []
        sibling = threading.Thread(target=lambda: results.append(proc.run(
            ["/bin/sh", "-c", "echo $$ > %s; sleep 3" % sibling_pid], timeout=60)))
        sibling.start()
        self.addCleanup(sibling.join)
        read_pids(sibling_pid)
        # exits 0 at once, leaving a sleep in its process group whose environment has no marker (Popen
        # returns once the sleep runs: only the group can find it)
        script = "import subprocess, sys; open(sys.argv[1], 'w').write(str(subprocess.Popen(['sleep', '60']," \
                 " env={}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid))"
        done = proc.run([sys.executable, "-c", script, orphan_pid], timeout=10)
        self.assertEqual((done.returncode, done.timed_out), (0, False))
        orphan = read_pids(orphan_pid)[0]
        wait_until(lambda: not process_alive(orphan), 5, message="the sleep %d left in the group to be killed" % orphan)
        sibling.join(30)
        self.assertEqual([(r.returncode, r.timed_out) for r in results], [(0, False)], "the sibling ran to its end")


class WaitTogetherTest(Base):
    """``proc.wait`` with several programs (a worker's batch of command jobs): each is fed, read and ended
    on its own, as soon as it is done; one past its deadline is killed, tree and all, and the others
    finish with their output."""

    def test_one_past_its_deadline_goes_and_the_others_finish_first(self):
        pidfile = os.path.join(self.tmp, "pid")
        stuck = proc.start(["/bin/sh", "-c", "setsid sleep 60 & echo $! > %s; wait" % pidfile], timeout=3)
        echo = proc.start(["/bin/cat"], stdin=b"y" * (3 * 1024 * 1024), timeout=60)  # more than a pipe holds
        failing = proc.start(["/bin/sh", "-c", "echo why >&2; exit 3"], timeout=60)
        runnings = [stuck, echo, failing]
        rounds = []
        while any(r.finished is None for r in runnings):
            proc.wait([r for r in runnings if r.finished is None])
            rounds.append([r.finished is not None for r in runnings])
        self.assertEqual(rounds[-1], [True] * 3)
        self.assertFalse(rounds[0][0], "the others are handed back before the stuck one's deadline")
        self.assertTrue(stuck.finished.timed_out)
        escaped = read_pids(pidfile)[0]
        wait_until(lambda: not process_alive(escaped), 5, message="setsid sleep %d to be killed" % escaped)
        self.assertEqual((echo.finished.returncode, echo.finished.timed_out), (0, False))
        self.assertEqual(echo.finished.stdout, b"y" * (3 * 1024 * 1024))
        self.assertEqual((failing.finished.returncode, failing.finished.stderr), (3, b"why\n"))
        for r in (stuck, echo, failing):
            self.assertFalse(process_alive(r.child.pid), "the program %d was reaped" % r.child.pid)

    def test_one_that_cannot_be_started_carries_its_error_and_the_others_run(self):
        before = proc.start(["/bin/sh", "-c", "echo before"], timeout=60)
        nul = proc.start(["/bin/echo", "a\0b"], timeout=60)  # posix_spawn: ValueError
        missing = proc.start([os.path.join(self.tmp, "nothing-here")], timeout=60)
        after = proc.start(["/bin/sh", "-c", "echo after"], timeout=60)
        runnings = [before, nul, missing, after]
        while any(r.finished is None and r.error is None for r in runnings):
            proc.wait([r for r in runnings if r.finished is None and r.error is None])
        self.assertIsInstance(nul.error, ValueError)
        self.assertIsInstance(missing.error, FileNotFoundError)
        self.assertEqual([before.finished.stdout, after.finished.stdout], [b"before\n", b"after\n"])
        with self.assertRaises(ValueError):
            proc.run(["/bin/echo", "a\0b"], timeout=60)


class RegistryTest(Base):
    """The store's record of a job's processes, as the next start reads it after a crash."""

    def test_a_child_whose_own_row_never_reached_the_store_is_killed_at_the_next_start(self):
        path, log = os.path.join(self.tmp, "hookd.sqlite3"), logging.getLogger("test-children")
        store = Store(path)
        registry = Registry(store, log)
        with registry.job("event 1"):
            child = proc.spawn(["sleep", "60"], stdin=proc.subprocess.DEVNULL)
        self.addCleanup(child.popen.wait)
        self.addCleanup(proc.kill_tree, child)
        # hookd died before the child's own row was committed: only what was durable before the fork is left
        store.write(lambda conn: conn.execute("DELETE FROM child_processes WHERE marker=?", (child.marker,)))
        store.close()
        again = Store(path)
        self.addCleanup(again.close)
        hit = Registry(again, log).kill_leftovers()
        wait_until(lambda: not process_alive(child.pid), 5, message="the sleep %d to be killed" % child.pid)
        self.assertEqual(sum(hit.values()), 1, hit)
        self.assertEqual(again.read(lambda conn: conn.execute("SELECT count(*) FROM child_processes").fetchone()[0]),
                         0)


class ShutdownTest(Base):
    def test_sigterm_leaves_no_process_behind(self):
        sleeper = self.script("sleeper.py", SLEEPER)
        pidfile = os.path.join(self.tmp, "pids")
        d = self.daemon("[hookd]\nshutdown_grace = 2\n[hook:job]\nverify = none\nallow_unsigned = true\n"
                        "command = %s %s %s\n" % (sys.executable, sleeper, pidfile))
        self.accepted(d)
        self.assert_stop_leaves_nothing(d, pidfile)


class AlertCommandShutdownTest(Base):
    def test_sigterm_leaves_no_alert_command_behind(self):
        sleeper = self.script("sleeper.py", SLEEPER)
        pidfile = os.path.join(self.tmp, "pids")
        d = self.daemon("[hookd]\nshutdown_grace = 1\nretry.max_attempts = 1\nalert.command = %s %s %s\n"
                        "[hook:job]\nverify = none\nallow_unsigned = true\ncommand = /bin/false\n"
                        % (sys.executable, sleeper, pidfile))
        self.accepted(d)  # dead at once: its alert command runs, and sleeps
        self.assert_stop_leaves_nothing(d, pidfile)


class RemoteWorkerShutdownTest(Base):
    """``hookd.py worker`` (SPEC §10) runs jobs on another host: its children never outlive it either."""

    def test_sigterm_of_a_worker_leaves_no_process_behind(self):
        sleeper = self.script("sleeper.py", SLEEPER)
        pidfile = os.path.join(self.tmp, "pids")
        os.makedirs(os.path.join(self.tmp, "first"))
        first = Daemon("[hookd]\nadmin.token = tok-12345678\n[hook:job]\nverify = none\nallow_unsigned = true\n"
                       "remote = true\ncommand = /bin/false\n", tmpdir=os.path.join(self.tmp, "first"))
        self.addCleanup(lambda: first.proc and first.proc.poll() is None and first.kill9())
        first.start()
        os.makedirs(os.path.join(self.tmp, "w"))
        w = Worker("[hookd]\nshutdown_grace = 1\n[hook:job]\nverify = none\nallow_unsigned = true\n"
                   "command = %s %s %s\n" % (sys.executable, sleeper, pidfile),
                   ["--from", first.admin_url, "--token", "tok-12345678", "--routes", "hook:job"],
                   tmpdir=os.path.join(self.tmp, "w"))
        self.addCleanup(lambda: w.proc and w.proc.poll() is None and w.kill9())
        w.start()
        self.accepted(first)
        self.assert_stop_leaves_nothing(w, pidfile)
        first.stop()


# Asks the admin API for /events, itself and from a grandchild in its own session; writes what each got.
ADMIN_PROBE = textwrap.dedent("""\
    import http.client, socket, subprocess, sys
    where, out = open(sys.argv[1]).read().strip(), sys.argv[2]
    if len(sys.argv) == 3:
        subprocess.run([sys.executable] + sys.argv + ["grandchild"], start_new_session=True, check=True)
    conn = http.client.HTTPConnection("localhost", timeout=10)
    if where.startswith("unix:"):
        conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.sock.connect(where[5:])
    else:
        conn = http.client.HTTPConnection(where[len("http://"):], timeout=10)
    try:
        conn.request("GET", "/events")
        got = str(conn.getresponse().status)
    except (OSError, http.client.HTTPException) as e:
        got = "refused: %s" % e.__class__.__name__
    with open(out + ("-grandchild" if len(sys.argv) > 3 else "-child"), "w") as f:
        f.write(got)
""")


class AdminTest(Base):
    """The admin API is hookd's operator's, not its children's: a job's process is refused on the admin
    listener (TCP on loopback, or a unix socket), while the operator is served."""

    def probe(self, listen):
        probe = self.script("probe.py", ADMIN_PROBE)
        where, out = os.path.join(self.tmp, "admin-address"), os.path.join(self.tmp, "got")
        d = self.daemon("[hookd]\nadmin.listen = %s\n[hook:job]\nverify = none\nallow_unsigned = true\n"
                        "command = %s %s %s %s\n" % (listen, sys.executable, probe, where, out))
        with open(where, "w") as f:
            f.write(d.admin_url)
        d.wait_status(self.accepted(d), "done")
        got = {}
        for who in ("child", "grandchild"):
            with open("%s-%s" % (out, who)) as f:
                got[who] = f.read()
        self.assertEqual(d.admin("GET", "/events")[0], 200)
        self.assertEqual(d.stop(), 0)
        return got

    def test_a_job_cannot_use_the_admin_api_on_loopback(self):
        got = self.probe("127.0.0.1:0")
        self.assertEqual(got, {"child": "403", "grandchild": "403"}, got)

    def test_a_job_cannot_use_the_admin_api_on_a_unix_socket(self):
        got = self.probe("unix:%s" % os.path.join(self.tmp, "admin.sock"))
        self.assertEqual(got, {"child": "403", "grandchild": "403"}, got)


class RestartTest(Base):
    def setUp(self):
        super().setUp()
        self.cam = FakeCamera(fps=10)
        self.addCleanup(self.cam.close)

    def test_kill_9_mid_recording_then_restart_leaves_one_ffmpeg(self):
        d = self.daemon("[hookd]\nadmin.token = env:ADMIN_TOKEN\nretry.base_delay = 0.05\n"
                        "[ixon]\nkey = %s\nstream.url = %s\nduration = 30\n"
                        % (test_ixon.KEY, self.cam.stream_url), env={"ADMIN_TOKEN": SECRETS["ADMIN_TOKEN"]})
        status, _, body = d.post("/ixon/webhook/" + test_ixon.KEY, json.dumps(test_ixon.MESSAGE).encode(),
                                 {"Content-Type": "application/json"})
        self.assertEqual(status, 202, body)
        first = wait_until(lambda: pids_with_cmdline(self.cam.stream_url), 20, message="ffmpeg to start")
        self.assertEqual(len(first), 1)
        seen = environ_of(first[0])
        self.assertNotIn(b"ADMIN_TOKEN", seen)
        self.assertNotIn(SECRETS["ADMIN_TOKEN"].encode(), b" ".join(seen.values()))
        d.kill9()
        self.assertTrue(process_alive(first[0]), "ffmpeg died with hookd: nothing to test")
        d.start()
        again = wait_until(lambda: [p for p in pids_with_cmdline(self.cam.stream_url) if p != first[0]], 30,
                           message="the recording to start again")
        self.assertFalse(process_alive(first[0]), "the old ffmpeg still records beside the new one")
        self.assertEqual(pids_with_cmdline(self.cam.stream_url), again)
        self.assertEqual(d.stop(), 0)


if __name__ == "__main__":
    unittest.main()
