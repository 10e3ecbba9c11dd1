"""Starting and ending every outside program hookd runs (commands, labelers, ffmpeg, ffprobe, alert commands).

Strategy: ``spawn`` is the one way a child starts: no shell, its own session (so its process group is
its own), a clean environment (``child_env``: PATH, LANG, LC_*, TZ, HOME, the job's HOOKD_* values and
the names a section lists in ``command.env``; never CREDENTIALS_DIRECTORY, NOTIFY_SOCKET or a variable
holding one of hookd's secrets), and a marker ``HOOKD_JOB=<random>`` that its descendants inherit.
``kill_tree`` ends a child and everything it started: its process group, every process descended from
those by parent pid (a grandchild that called ``setsid`` is still a descendant while its parent lives),
and every process that carries the child's marker (an orphan whose parent already exited). Each process
is checked against its start time in /proc/PID/stat before the signal, sent through a pidfd where the
kernel has them, so a reused pid is never hit. A thread that runs a job registers a watcher
(``watched_by``): each child it spawns is reported when it starts and ends, which is how the store
records a job's process groups (hookd_core/children.py). ``run`` writes stdin and reads stdout and
stderr as they arrive, keeping the first ``MAX_OUTPUT`` bytes of each and discarding the rest, so
memory stays flat whatever a program prints; at its timeout the whole tree gets SIGKILL.
"""

import contextlib
import os
import secrets as secrets_mod
import selectors
import signal
import subprocess
import threading
import time

MAX_OUTPUT = 4 * 1024 * 1024  # bytes kept of stdout and of stderr each; the rest is read and dropped
READ_CHUNK = 65536
WRITE_CHUNK = 65536
BASE_NAMES = ("PATH", "LANG", "TZ", "HOME")  # and every LC_*
NEVER = ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET")  # not passed even when command.env lists them
MARKER = "HOOKD_JOB"
KILL_ROUNDS = 5  # a tree that keeps forking while it is killed is scanned again, this many times
DEATH_WAIT = 1.0  # seconds each round waits for the killed processes to be gone

_local = threading.local()


class Finished:
    """returncode (None after a timeout), stdout/stderr (bytes, capped), timed_out (bool)."""

    def __init__(self, returncode, stdout, stderr, timed_out):
        self.returncode, self.stdout, self.stderr, self.timed_out = returncode, stdout, stderr, timed_out


class Child:
    """A started program: ``popen``, ``pid`` (= its process group), ``start`` (its start time in clock
    ticks since boot, from /proc), ``marker`` (the HOOKD_JOB value its descendants inherit)."""

    def __init__(self, popen, marker):
        self.popen, self.marker, self.pid = popen, marker, popen.pid
        self.start = start_time(popen.pid)


def child_env(hookd_vars=None, names=(), secrets=(), environ=None):
    """The environment of a child: PATH, LANG, LC_*, TZ, HOME from hookd's own, then the ``names`` a
    section lists (``command.env``) unless forbidden or holding a secret value, then ``hookd_vars``
    (HOOKD_EVENT_ID and the like). Nothing else of hookd's environment is passed."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k in BASE_NAMES or k.startswith("LC_")}
    for name in names:
        value = environ.get(name)
        if value is None or name in NEVER or any(s and s in value for s in secrets):
            continue
        env[name] = value
    env.update(hookd_vars or {})
    return env


def spawn(argv, env=None, **popen_args):
    """Start ``argv`` (a list, never a shell string) in its own session with ``env`` (default: the clean
    ``child_env()``) plus its marker, and report it to this thread's watcher. Raises OSError."""
    marker = secrets_mod.token_hex(8)
    env = dict(child_env() if env is None else env, **{MARKER: marker})
    watcher = getattr(_local, "watcher", None)
    if watcher is not None:
        watcher.starting(marker)  # recorded before the fork: a crash right after it still finds the child
    try:
        popen = subprocess.Popen(argv, env=env, start_new_session=True, close_fds=True, **popen_args)
    except BaseException:
        if watcher is not None:
            watcher.ended(marker)
        raise
    child = Child(popen, marker)
    if watcher is not None:
        watcher.started(child)
    return child


def end(child):
    """The child is finished with (exited, or given up on): kill what is left of its tree, reap it, and
    tell the watcher. Returns the exit code."""
    try:
        kill_tree(child)
        child.popen.wait()
    finally:
        watcher = getattr(_local, "watcher", None)
        if watcher is not None:
            watcher.ended(child.marker)
    return child.popen.returncode


@contextlib.contextmanager
def watched_by(watcher):
    """Children this thread spawns inside the block are reported to ``watcher``: ``starting(marker)``
    before the fork, ``started(child)`` once it runs, ``ended(marker)`` when it is gone."""
    old = getattr(_local, "watcher", None)
    _local.watcher = watcher
    try:
        yield watcher
    finally:
        _local.watcher = old


def run(argv, stdin=b"", timeout=300, env=None, cwd=None):
    """Run ``argv`` with ``stdin`` and wait at most ``timeout`` seconds for it and its output.

    At the timeout the whole tree gets SIGKILL. Raises OSError if the program cannot be started."""
    child = spawn(argv, env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        out, err, timed_out = _collect(child.popen, stdin, deadline)
        if not timed_out:  # the output ended; the program itself may still run (it closed its pipes)
            timed_out = not _exited(child.pid, deadline)
    finally:
        for pipe in (child.popen.stdin, child.popen.stdout, child.popen.stderr):
            pipe.close()
        code = end(child)
    if timed_out:
        return Finished(None if code is None or code < 0 else code, out.data(), err.data(), True)
    return Finished(code, out.data(), err.data(), False)


def _exited(pid, deadline):
    """Wait until ``pid`` exits or ``deadline``; True if it exited. It is left unreaped (a zombie), so
    ``kill_tree`` can still trust its process group by the leader's start time."""
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


class _Capped:
    """The first MAX_OUTPUT bytes of a stream; later bytes are dropped."""

    def __init__(self):
        self.buf = bytearray()

    def add(self, chunk):
        room = MAX_OUTPUT - len(self.buf)
        if room > 0:
            self.buf += chunk[:room]

    def data(self):
        return bytes(self.buf)


def _collect(popen, data, deadline):
    """Feed stdin and read stdout/stderr until both end or ``deadline``: (out, err, timed_out)."""
    out, err = _Capped(), _Capped()
    with selectors.DefaultSelector() as sel:
        sel.register(popen.stdout, selectors.EVENT_READ, out)
        sel.register(popen.stderr, selectors.EVENT_READ, err)
        view = memoryview(data or b"")
        if view:
            os.set_blocking(popen.stdin.fileno(), False)
            sel.register(popen.stdin, selectors.EVENT_WRITE, None)
        else:
            popen.stdin.close()
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return out, err, True
            for key, _ in sel.select(left):
                if key.data is None:
                    view = _write(popen.stdin, view)
                    if not view:
                        sel.unregister(popen.stdin)
                        popen.stdin.close()
                    continue
                chunk = os.read(key.fd, READ_CHUNK)
                if chunk:
                    key.data.add(chunk)
                else:
                    sel.unregister(key.fileobj)
    return out, err, False


def _write(pipe, view):
    """Write what the pipe takes now; returns what is left (nothing when the reader has gone)."""
    try:
        n = os.write(pipe.fileno(), view[:WRITE_CHUNK])
    except BlockingIOError:
        return view
    except (BrokenPipeError, ConnectionResetError):
        return view[:0]
    return view[n:]


# -- the process tree in /proc ------------------------------------------------------------------------

def start_time(pid):
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22), or None if gone."""
    info = _stat(pid)
    return info[3] if info else None


def _stat(pid):
    """(ppid, pgid, state, start) of ``pid``, or None when it does not exist."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[2]), fields[0].decode("ascii", "replace"), int(fields[19])


def _processes():
    """{pid: (ppid, pgid, state, start)} of every process visible in /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _stat(int(name))
            if info is not None:
                table[int(name)] = info
    return table


def _carries(pid, marker):
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            return (b"\0%s=%s\0" % (MARKER.encode(), marker.encode())) in b"\0" + f.read()
    except OSError:
        return False


def tree(pgid, start, marker):
    """Live pids of the tree of a child started as group ``pgid`` at ``start`` with ``marker``: its group
    (only while the leader is still the process that started at ``start``), their descendants, and any
    process carrying the marker; a process started before ``start`` is never part of it."""
    procs = _processes()
    leader = procs.get(pgid)
    group_ok = leader is not None and leader[3] == start
    found = {pid for pid, (_, g, _, s) in procs.items() if group_ok and g == pgid and s >= start}
    if group_ok:
        found.add(pgid)
    for pid, (_, _, _, s) in procs.items():
        if pid not in found and s >= start and pid != os.getpid() and _carries(pid, marker):
            found.add(pid)
    children = {}
    for pid, (ppid, _, _, s) in procs.items():
        if s >= start:
            children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for kid in children.get(todo.pop(), ()):
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return {pid: procs[pid][3] for pid in found if procs[pid][2] != "Z" and pid != os.getpid()}


def socket_inodes(pid):
    """Inodes of the sockets ``pid`` holds open (from /proc/PID/fd); empty when it cannot be read."""
    found = set()
    try:
        names = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def kill_tree(child):
    """SIGKILL ``child`` (a Child, or any object with pid, start, marker) and its whole tree."""
    return kill_recorded(child.pid, child.start, child.marker)


def kill_recorded(pgid, start, marker):
    """SIGKILL the tree of group ``pgid`` started at ``start`` with ``marker`` (see ``tree``; a group not
    known, None, leaves the marker alone to find it), waiting for each round to die and rescanning while it
    keeps forking. Returns the number of processes signalled."""
    killed = 0
    for _ in range(KILL_ROUNDS):
        victims = tree(pgid, start or 0, marker)
        if not victims:
            break
        for pid, started in victims.items():
            killed += _kill(pid, started)
        deadline = time.monotonic() + DEATH_WAIT
        while time.monotonic() < deadline and any(_alive(pid, s) for pid, s in victims.items()):
            time.sleep(0.005)
    return killed


def _alive(pid, started):
    """True while ``pid`` is the process that started at ``started`` and is not yet a zombie."""
    info = _stat(pid)
    return info is not None and info[3] == started and info[2] != "Z"


def _kill(pid, started):
    """SIGKILL ``pid`` only if it is still the process that started at ``started``; 1 if signalled."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None  # no pidfd here: fall back to a plain kill right after the start time check
    try:
        if start_time(pid) != started:
            return 0
        if fd is not None:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return 1
    except (ProcessLookupError, PermissionError):
        return 0
    finally:
        if fd is not None:
            os.close(fd)
