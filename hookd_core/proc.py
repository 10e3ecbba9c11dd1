"""Starting and ending every outside program hookd runs (commands, labelers, ffmpeg, ffprobe, alert commands).

Strategy: ``spawn`` is the one way a child starts (``run`` starts its own through ``os.posix_spawn`` where
that gives the same child, ``_Spawned``): no shell, its own process group in hookd's session (``_session``),
SCHED_IDLE once it has run ``job_idle_after`` (``idle_after``: a busy job then barely slows intake; a
recording keeps its own session and hookd's priority), no fd but its
stdin, stdout and stderr, a clean environment (``child_env``: PATH, LANG, LC_*, TZ, HOME, the job's HOOKD_*
values and the names a section lists in ``command.env``; never CREDENTIALS_DIRECTORY, NOTIFY_SOCKET or a variable holding
one of hookd's secrets), and a marker ``HOOKD_JOB=<random>`` that its descendants inherit. ``kill_tree``
ends a child and everything it started: its process group, every process descended from those by parent
pid (a grandchild that called ``setsid`` is still a descendant while its parent lives), and every process
that carries the child's marker (an orphan whose parent already exited). Markers nest: a process carries
marker M when its HOOKD_JOB is M or starts with "M.", so the marker of a whole run of hookd covers every
child of that run (hookd_core/children.py). Each process is checked against its start time in
/proc/PID/stat before the signal, sent through a pidfd where the kernel has them, so a reused pid is never
hit. Reading all of /proc after every child would cost a job about as much CPU as the child itself;
``new_pids`` bounds, from the kernel's task counters read just before the fork, which pids can have been
handed out since, and only those are read when the bound is small. A thread that runs a job registers a
watcher (``watched_by``): it names each child's marker and hears when each starts and ends, which is how
the store records a job's process groups (hookd_core/children.py). ``run`` writes stdin and reads stdout
and stderr as they arrive, keeping the first ``MAX_OUTPUT`` bytes of stdout (the program's answer) and the
last ``STDERR_TAIL`` bytes of stderr (its last words: where it says why it failed, the only part any
caller reads), and discarding the rest, so memory stays flat whatever a program prints; at its timeout
the whole tree gets SIGKILL. ``run`` is
``start`` (the pipes) and ``wait``, which takes several programs: it forks them back to back (no GIL
release in between) and polls them together, so one thread can run a batch of jobs' commands. The system
calls around a worker's forks and after its poll (closing fds, reading /proc files and pipes the poll
found ready, writing stdin, reaping a child that has exited) keep the GIL (libc through ``ctypes.PyDLL``):
none of them blocks, and a worker that gives the GIL up while intake is busy waits behind every request
thread; a file read out of a child's memory (environ) still gives it up.
"""

import contextlib
import errno
import logging
import os
import secrets as secrets_mod
import select
import signal
import subprocess
import sys
import threading
import time

MAX_OUTPUT = 4 * 1024 * 1024  # bytes kept of stdout, the first ones; the rest is read and dropped
STDERR_TAIL = 64 * 1024  # bytes kept of stderr, the last ones (each program waited for at once keeps its own)
READ_CHUNK = 65536
WRITE_CHUNK = 65536
BASE_NAMES = ("PATH", "LANG", "TZ", "HOME")  # and every LC_*
NEVER = ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET")  # not passed even when command.env lists them
MARKER = "HOOKD_JOB"
KILL_ROUNDS = 5  # a tree that keeps forking while it is killed is scanned again, this many times
DEATH_WAIT = 1.0  # seconds each round waits for the killed processes to be gone
RESERVED_PIDS = 300  # after wrapping at pid_max, the kernel hands out pids from here again
NEW_PIDS_READ = 64  # at most this many pids handed out since a child started are read one by one

_local = threading.local()
_idle_after = [None, None]  # seconds a child of ``run`` runs before it goes SCHED_IDLE (None: never), the log
_told = []  # ``_idle`` has logged that it cannot: once is enough
_terminal = []  # [True or False]: hookd had a controlling terminal before its first child (``_session``)
IDLE_PASSES = 4  # walks of a child's tree at most, until one finds no thread that is not idle yet
_running = {}  # pid -> marker of each child ``run`` started and has not reaped yet
_zombies = set()  # those of them known to have exited (zombies until ``end`` reaps them)


class Finished:
    """returncode (None after a timeout), stdout (bytes, its first MAX_OUTPUT), stderr (bytes, its last
    STDERR_TAIL), timed_out (bool)."""

    def __init__(self, returncode, stdout, stderr, timed_out):
        self.returncode, self.stdout, self.stderr, self.timed_out = returncode, stdout, stderr, timed_out


class Child:
    """A started program: ``popen``, ``pid`` (= its process group), ``start`` (its start time in clock
    ticks since boot, from /proc), ``marker`` (the HOOKD_JOB value its descendants inherit), ``since``
    (``task_counters()`` read just before its fork)."""

    def __init__(self, popen, marker, since=None, watcher=None):
        self.popen, self.marker, self.pid, self.since = popen, marker, popen.pid, since
        self.watcher = watcher  # told when it ends, whichever thread ends it
        self.start = start_time(popen.pid)

    def tree(self):
        """{pid: start time} of its tree now (``tree``)."""
        return tree(self.pid, self.start or 0, self.marker, self.since)


def child_env(hookd_vars=None, names=(), secrets=(), environ=None):
    """The environment of a child: PATH, LANG, LC_*, TZ, HOME from hookd's own, then the ``names`` a
    section lists (``command.env``) unless forbidden or holding a secret value, then ``hookd_vars``
    (HOOKD_EVENT_ID and the like). Nothing else of hookd's environment is passed."""
    if environ is None:
        environ, env = os.environ, dict(_base_env())
    else:
        env = _base_names(environ)
    for name in names:
        value = environ.get(name)
        if value is None or name in NEVER or any(s and s in value for s in secrets):
            continue
        env[name] = value
    env.update(hookd_vars or {})
    return env


def _base_names(environ):
    return {k: environ[k] for k in environ if k in BASE_NAMES or k.startswith("LC_")}


_base = []


def _base_env():
    """PATH, LANG, LC_*, TZ, HOME of hookd's own environment, read at the first child: going through all of
    os.environ (each name decoded) cost a job ~30 µs, and hookd never changes these."""
    if not _base:
        _base.append(_base_names(os.environ))
    return _base[0]


def spawn(argv, env=None, **popen_args):
    """Start ``argv`` (a list, never a shell string) in its own session with ``env`` (default: the clean
    ``child_env()``) plus its marker (named by this thread's watcher, else random), and report it to the
    watcher. Raises OSError. ffmpeg's recordings start here: a live stream cannot wait, so they keep
    hookd's priority, and their own session (a scheduling group of their own where the kernel groups
    tasks by session), as every child did before ``job_idle_after``."""
    watcher = getattr(_local, "watcher", None)
    popen, marker, since = _fork(watcher, env, lambda env: subprocess.Popen(
        argv, env=env, start_new_session=True, close_fds=True, **popen_args))
    return _started(popen, marker, since, watcher)


def _fork(watcher, env, start, since=None):
    """(what ``start(env)`` returns: a Popen, or what ``run`` needs of one, marker, ``since``): the fork
    of ``spawn``, with ``env`` plus the marker ``watcher`` names; ``since`` is ``task_counters()``, read
    here unless given (read before the first of several forks, it bounds the pids of them all)."""
    marker = watcher.marker() if watcher is not None else secrets_mod.token_hex(8)
    env = dict(child_env() if env is None else env, **{MARKER: marker})
    if watcher is not None:
        watcher.starting(marker)  # durable before the fork: a crash right after it still finds the child
    since = task_counters() if since is None else since
    try:
        return start(env), marker, since
    except BaseException:
        if watcher is not None:
            watcher.ended(marker)
        raise


def _started(popen, marker, since, watcher):
    """The Child of a fork that worked, reported to ``watcher``."""
    child = Child(popen, marker, since, watcher)
    if watcher is not None:
        watcher.started(child)
    return child


def _session(popen):
    """The arguments that start a child of ``run`` (``posix_spawn``'s, or Popen's with ``popen``) in its own
    process group in hookd's session: in a session of its own it would be a scheduling group of its own
    where the kernel groups tasks by session (autogroups, outside a cgroup CPU controller), weighing as
    much as all of hookd whatever its policy, and SCHED_IDLE would not yield to hookd's threads. Except
    while hookd has a controlling terminal (started from a shell, ``docker run -t``; read once, before its
    first child; unreadable counts as one): a job in its session could stop on SIGTTIN waiting for input,
    or type into the operator's shell (TIOCSTI), so each child leads a session of its own, as before (it
    still goes SCHED_IDLE, which then yields less to hookd where sessions are scheduling groups). Popen
    before Python 3.11 can only start a new session."""
    if not _terminal:  # tty_nr, the 7th field of /proc/self/stat: 0 without a controlling terminal
        stat = _read("/proc/self/stat")
        _terminal.append(stat is None or stat.rsplit(b")", 1)[1].split()[4] != b"0")
    if _terminal[0] or (popen and sys.version_info < (3, 11)):
        return {"start_new_session": True} if popen else {"setsid": True}
    return {"process_group": 0} if popen else {"setpgroup": 0}


def idle_after(seconds, log):
    """Children ``run`` starts from now on go SCHED_IDLE once they have run ``seconds`` (``job_idle_after``;
    0: at once, None: never); ``log`` hears once if the kernel refuses it."""
    _idle_after[:] = [seconds, log]


def _idle(child):
    """Move every thread of the child's tree (``Child.tree``) to SCHED_IDLE: it gets a CPU only when no other
    task wants it, and what it starts from now on inherits that. Without CAP_SYS_NICE, with RLIMIT_NICE
    at 0 (the unit sets it), it can never leave it. The tree is walked again while a walk moved a thread
    (one may have been started meanwhile by a thread not yet moved), at most IDLE_PASSES times: at least
    two walks once a job has run ``job_idle_after``, each of all of /proc when the kernel has handed out
    more than NEW_PIDS_READ pids since the fork (``tree``); a pid that no longer
    has the start time the walk read, or a thread of hookd's own, is never touched. It never fails the job:
    where the call is refused (a seccomp filter, a process of another user), that thread runs on at its
    priority, and a refusal for the child itself is logged once."""
    own = set(os.listdir("/proc/self/task"))
    for _ in range(IDLE_PASSES):
        moved = False
        for pid, start in child.tree().items():
            try:
                tids = os.listdir("/proc/%d/task" % pid)
            except OSError:
                continue  # gone meanwhile (or another user's: not to be read)
            info = _stat(pid)
            if info is None or info[3] != start:
                continue  # gone, or the pid is another process's by now
            for tid in tids:
                if tid in own:
                    continue
                try:
                    policy = os.sched_getscheduler(int(tid))
                    if policy & ~os.SCHED_RESET_ON_FORK != os.SCHED_IDLE:  # keep the flag: dropping it is refused
                        os.sched_setscheduler(int(tid), os.SCHED_IDLE | (policy & os.SCHED_RESET_ON_FORK),
                                              os.sched_param(0))
                        moved = True
                except ProcessLookupError:
                    pass  # gone meanwhile
                except OSError as e:
                    if pid == child.pid and not _told:
                        _told.append(True)
                        (_idle_after[1] or logging.getLogger("hookd")).warning(
                            "job_idle_after: a job cannot be made idle (%s); it runs at hookd's priority",
                            e.strerror)
        if not moved:
            return


_uncloexec = [0]  # blocks running now that may open a file without close-on-exec (``may_open_inheritable``)
_uncloexec_lock = threading.Lock()
_inherited = []  # done once: every fd hookd inherited is close-on-exec


@contextlib.contextmanager
def may_open_inheritable():
    """Around code that may open a file descriptor without close-on-exec (OpenSSL reads CA files with
    ``fopen(path, "r")`` while it sets up or verifies a TLS connection): while any such block runs, a
    child of ``run`` is started by ``subprocess.Popen``, which closes every fd but its three in the child,
    instead of ``os.posix_spawn``, which would pass that fd on. The count goes up before the block gives
    up the GIL, and ``_start`` reads it with no GIL release between the read and the fork."""
    with _uncloexec_lock:
        _uncloexec[0] += 1
    try:
        yield
    finally:
        with _uncloexec_lock:
            _uncloexec[0] -= 1


def _start(argv, env, cwd, fds):
    """A child of ``run`` with ``fds`` as its stdin, stdout and stderr: by ``os.posix_spawn`` (``_Spawned``)
    when it can start it (glibc, no ``cwd``, a path to the program as Popen would exec it, no fd among
    0-2 to move) and no ``may_open_inheritable`` block runs; by Popen otherwise."""
    if POSIX_SPAWN and cwd is None and os.sep in argv[0] and min(fds) > 2:
        if not _inherited:
            _close_on_exec_all()
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
        if not _uncloexec[0]:
            return _Spawned(argv, env, actions, _session(popen=False))
    return subprocess.Popen(argv, env=env, close_fds=True, cwd=cwd, stdin=fds[0], stdout=fds[1],
                            stderr=fds[2], **_session(popen=True))


class _Spawned:
    """What ``run`` needs of a Popen (``pid``, ``wait()``, ``returncode``) for a program started by
    ``os.posix_spawn``: its own process group (``_session``), ``actions`` giving it its stdin, stdout and
    stderr, SIGPIPE and SIGXFSZ back to their defaults (Python ignores them; Popen restores them too), and
    no other fd. posix_spawn keeps the GIL while the kernel starts the program (Popen's fork_exec lets it
    go and waits to take it back behind the request threads, then waits again on its exec-error pipe: most
    of a job's time while intake is busy) and costs no pipe. It has no "close every other fd": every fd Python and sqlite open
    is close-on-exec, the ones hookd inherited are made so before the first child, and while code that
    may open one without it runs (``may_open_inheritable``) ``run`` uses Popen."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name))

    def __init__(self, argv, env, actions, session):
        self.pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsigdef=self.SIGNALS, **session)
        self.returncode = None

    def wait(self):
        if self.returncode is None:
            try:
                status = _reaped(self.pid)  # it has exited (a zombie) when ``end`` reaps it
                if status is None:
                    status = os.waitpid(self.pid, 0)[1]
            except ChildProcessError:  # reaped elsewhere: what Popen says then
                status = 0
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _close_on_exec_all():
    """Make every fd above stderr close-on-exec (those hookd inherited from whoever started it)."""
    with _kept_lock:
        if _inherited:
            return
        for name in os.listdir("/proc/self/fd"):
            try:
                if int(name) > 2 and os.get_inheritable(int(name)):
                    os.set_inheritable(int(name), False)
            except OSError:
                pass  # the listing's own fd, closed by now
        _inherited.append(True)


def _posix_spawn_usable():
    """glibc 2.26 or later (POSIX_SPAWN_SETSID; exec errors reported): elsewhere Popen starts every child."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return name == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 26) \
            and hasattr(os, "posix_spawn")
    except (AttributeError, ValueError, OSError):
        return False


POSIX_SPAWN = _posix_spawn_usable()


def end(child):
    """The child is finished with (exited, or given up on): kill what is left of its tree, reap it, and
    tell the watcher it was started under. Returns the exit code."""
    try:
        kill_tree(child)
        _running.pop(child.pid, None)  # before the reap: a pid in _running is never another process
        _zombies.discard(child.pid)
        child.popen.wait()
    finally:
        if child.watcher is not None:
            child.watcher.ended(child.marker)
    return child.popen.returncode


@contextlib.contextmanager
def watched_by(watcher):
    """Children this thread spawns inside the block are marked and reported by ``watcher``: ``marker()``
    names the next one's marker, ``starting(marker)`` runs before the fork, ``started(child)`` once it
    runs, ``ended(marker)`` when it is gone."""
    old = getattr(_local, "watcher", None)
    _local.watcher = watcher
    try:
        yield watcher
    finally:
        _local.watcher = old


def run(argv, stdin=b"", timeout=300, env=None, cwd=None, keep_stdout=True):
    """Run ``argv`` with ``stdin`` and wait at most ``timeout`` seconds for it and its output; without
    ``keep_stdout`` its stdout is /dev/null (a caller that never looks at it spares a pipe and its reads).

    At the timeout the whole tree gets SIGKILL. Raises OSError if the program cannot be started."""
    running = start(argv, stdin, timeout, env, cwd, keep_stdout)
    wait([running])
    if running.error is not None:
        raise running.error
    return running.finished


def start(argv, stdin=b"", timeout=300, env=None, cwd=None, keep_stdout=True):
    """``run`` in two halves: this one makes the program's pipes (stdin holding what of ``stdin`` fits
    already) under this thread's watcher; ``wait`` starts it, with others back to back, and does the
    rest. Raises OSError when there is no pipe to be had."""
    out_r, out_w = (-1, _kept_fd("/dev/null", os.O_WRONLY)) if not keep_stdout else os.pipe2(os.O_CLOEXEC)
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)  # raw fds, no file objects
    try:
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
    except BaseException:
        for fd in (stdin_r, stdin_w, out_r, out_w if keep_stdout else -1):
            if fd >= 0:
                _close(fd)
        raise
    return Running(argv, env, cwd, [stdin_w, out_r, err_r], [stdin_r, out_w if keep_stdout else -1, err_w],
                   out_w, stdin, timeout)


def drive(steps):
    """Run ``steps`` (a generator that yields programs ``start`` made, ``Running``) alone: wait for each
    program it yields to be done before sending it on; returns what it returns."""
    try:
        running = next(steps)
        while True:
            wait([running])
            running = steps.send(None)
    except StopIteration as e:
        return e.value


class Running:
    """A program of ``start``: its pipes (ours: stdin ``fds[0]``, stdout ``fds[1]`` or -1, stderr
    ``fds[2]``; the program's ends in ``theirs``; -1 once closed), the part of stdin not yet written, its
    output so far, its pidfd (None where the kernel has none), deadline and ``idle_at`` (when it goes
    SCHED_IDLE; None once it has, or never) once started; ``error`` (the
    OSError) when it could not be started (``child`` None) or what ``wait`` raised before it was done,
    else ``finished`` (a Finished) once ``wait`` has ended it."""

    def __init__(self, argv, env, cwd, fds, theirs, stdout, data, timeout):
        self.argv, self.env, self.cwd, self.fds, self.theirs, self.stdout = argv, env, cwd, fds, theirs, stdout
        self.timeout, self.deadline, self.idle_at, self.child, self.pidfd = timeout, None, None, None, None
        self.watcher = getattr(_local, "watcher", None)
        self.out, self.err = _Kept(MAX_OUTPUT), _Kept(STDERR_TAIL, tail=True)
        self.exited, self.finished, self.error = False, None, None
        self.view = memoryview(data or b"")
        try:  # a document that fits in the pipe is there before the program starts: no wait for it
            if self.view:
                os.set_blocking(fds[0], False)
                self.view = _write(fds[0], self.view)
            if not self.view:
                self._close(0)
        except BaseException:
            self._close_all()
            raise

    def fork(self, since):
        """Start the program (``_fork``; posix_spawn keeps the GIL: no other thread runs before the next
        release, so programs forked back to back cost their thread one wait for the GIL, not one each).
        Returns the fork's (popen, marker, since), or None with ``error`` set and the pipes closed (an
        OSError, or a ValueError for an argument or environment value holding a NUL)."""
        try:
            return _fork(self.watcher, self.env, lambda env: _start(
                self.argv, env, self.cwd, (self.theirs[0], self.stdout, self.theirs[2])), since)
        except Exception as e:
            self.error = e
            self._close_all()
            return None

    def started(self, forked):
        """After the fork: the Child (its start time read, reported to the watcher), the program's ends of
        the pipes closed, the pidfd opened, the deadline set."""
        try:
            self.child = _started(*forked, self.watcher)
            _running[self.child.pid] = self.child.marker
        finally:
            for i, fd in enumerate(self.theirs):
                if fd >= 0:
                    _close(fd)
                    self.theirs[i] = -1
        now = time.monotonic()
        self.deadline = now + self.timeout
        self.idle_at = None if _idle_after[0] is None else now + _idle_after[0]
        self.pidfd = _pidfd(self.child.pid)

    def _close(self, i):
        _close(self.fds[i])
        self.fds[i] = -1

    def _close_all(self):
        for fds in (self.fds, self.theirs):
            for i, fd in enumerate(fds):
                if fd >= 0:
                    _close(fd)
                    fds[i] = -1

    def polled(self):
        """(fd, events) to poll for: stdin while there is more to write, the output pipes, the pidfd."""
        wanted = [(self.fds[0], select.POLLOUT)] if self.fds[0] >= 0 else []
        wanted += [(fd, select.POLLIN) for fd in self.fds[1:] if fd >= 0]
        if self.pidfd is not None and not self.exited:
            wanted.append((self.pidfd, select.POLLIN))
        return wanted

    def ready(self, fd):
        """``fd`` (one of ``polled``) is ready: write, read or note the exit."""
        if fd == self.pidfd:
            self.exited = True
        elif fd == self.fds[0]:
            self.view = _write(fd, self.view)
            if not self.view:
                self._close(0)
        else:
            chunk = _read_fd(fd, READ_CHUNK)
            if chunk:
                (self.out if fd == self.fds[1] else self.err).add(chunk)
            else:
                self._close(self.fds.index(fd))

    def piped(self):
        """True while a pipe is still open (stdin to write, output to read)."""
        return any(fd >= 0 for fd in self.fds)

    def done(self):
        """True once its pipes have ended and it has exited (it stays a zombie until ``end``: ``kill_tree``
        can still trust its process group by the leader's start time)."""
        if self.piped():
            return False
        if self.pidfd is None and not self.exited:  # no pidfd: looked at each time ``wait`` wakes up
            self.exited = os.waitid(os.P_PID, self.child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        return self.exited

    def end(self, timed_out):
        """Close what is left, kill what is left of its tree and reap it (``end``); sets ``finished``."""
        self._close_all()
        if self.pidfd is not None:
            _close(self.pidfd)
            self.pidfd = None
        if not timed_out:
            _zombies.add(self.child.pid)
        code = end(self.child)
        if timed_out:
            code = None if code is None or code < 0 else code
        self.finished = Finished(code, self.out.data(), self.err.data(), timed_out)


def wait(runnings):
    """Start each of ``runnings`` not started yet, back to back, then feed each its stdin and read its
    stdout and stderr as they come, until one of them (or more) is done: it has exited with its pipes
    ended, or its deadline passed (then its whole tree gets SIGKILL), or it could not be started. What is
    done is ended (``Running.end``; ``finished`` or ``error`` set), the others run on for the next call.
    One poll set for all of them: their pipes and pidfds, so a thread waits once for several programs.
    Without pidfds (Linux before 5.3) an exit is looked at every 10 ms once a program's output has ended."""
    new = [r for r in runnings if r.child is None and r.error is None]
    since = task_counters() if new else None
    forked, live = [], [r for r in runnings if r.child is not None]
    try:
        for r in new:  # nothing between the forks gives up the GIL
            forked.append((r, r.fork(since)))
        for r, fork in forked:
            if fork is not None:
                live.append(r)
                r.started(fork)
        while live:
            now = time.monotonic()
            for r in list(live):
                done = r.done()
                if done or r.deadline <= now:
                    live.remove(r)
                    r.end(timed_out=not done)
                elif r.idle_at is not None and r.idle_at <= now:
                    r.idle_at = None
                    _idle(r.child)
            if len(live) < len(runnings):
                return
            left = min(r.deadline if r.idle_at is None else min(r.deadline, r.idle_at) for r in live) - now
            if any(r.pidfd is None and not r.piped() for r in live):
                left = min(left, 0.01)
            poller, owners = select.poll(), {}
            for r in live:
                for fd, events in r.polled():
                    poller.register(fd, events)
                    owners[fd] = r
            for fd, _ in poller.poll(left * 1000 + 1):
                owners[fd].ready(fd)
    except BaseException as e:  # every program not seen to its end is ended, and carries ``e``
        for r, fork in forked:
            if r.child is None and fork is not None:  # forked but not yet started: it still has to go
                _quietly(r.started, fork)
        for r in runnings:
            if r.finished is None and r.error is None:
                if r.child is not None:
                    _quietly(r.end, True)
                else:
                    r._close_all()
                r.error = e
        raise


def _quietly(fn, *args):
    """``fn(*args)``, whatever it raises ignored: cleaning up after an error that is raised anyway."""
    try:
        fn(*args)
    except BaseException:
        pass


class _Kept:
    """What is kept of a stream: its first ``size`` bytes, later ones dropped; or with ``tail`` its last
    ``size`` bytes, earlier ones dropped as later ones come (deleting from the front of a bytearray moves
    its start, no copy)."""

    def __init__(self, size, tail=False):
        self.buf, self.size, self.tail = bytearray(), size, tail

    def add(self, chunk):
        if self.tail:
            self.buf += chunk
            if len(self.buf) > self.size:
                del self.buf[:-self.size]
        elif len(self.buf) < self.size:
            self.buf += chunk[:self.size - len(self.buf)]

    def data(self):
        return bytes(self.buf)


def _pidfd(pid):
    """A pidfd for ``pid``, or None where the kernel or Python has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _write(fd, view):
    """Write what the pipe takes now; returns what is left (nothing when the reader has gone)."""
    try:
        n = _write_fd(fd, view[:WRITE_CHUNK])
    except BlockingIOError:
        return view
    except (BrokenPipeError, ConnectionResetError):
        return view[:0]
    return view[n:]


# -- system calls that keep the GIL ---------------------------------------------------------------------
# A worker's system calls between its forks and its poll, and after the poll up to its next forks (a pipe's
# end closed, a /proc file read, a pipe read after the poll said it is ready): each takes microseconds and
# never blocks, but through ``os`` each gives up the GIL, and while intake keeps dozens of request threads
# waiting for it, a worker that gives it up waits its turn behind all of them (milliseconds) before its
# next line. Called through a ``ctypes.PyDLL`` of libc they keep it. Where ctypes or libc cannot be had
# they are ``os``'s own.

def _load_libc():
    try:
        import ctypes
        libc = ctypes.PyDLL(None, use_errno=True)
        int, size, ssize = ctypes.c_int, ctypes.c_size_t, ctypes.c_ssize_t
        for name, args, result in (("close", [int], int), ("open", [ctypes.c_char_p, int], int),
                                   ("waitpid", [int, ctypes.POINTER(int), int], int),
                                   ("read", [int, ctypes.c_void_p, size], ssize),
                                   ("pread", [int, ctypes.c_void_p, size, ctypes.c_long], ssize),
                                   ("write", [int, ctypes.c_char_p, size], ssize)):
            getattr(libc, name).argtypes, getattr(libc, name).restype = args, result
        return ctypes, libc
    except (ImportError, OSError, AttributeError):
        return None, None


_loaded = []  # [(ctypes, libc)], or [(None, None)] without them: loaded at the first call (~1 MB; a
#               hookd that runs no program never loads ctypes)


def _libc():
    """(ctypes, libc as a ``ctypes.PyDLL``), or (None, None) where either cannot be had (not glibc)."""
    if not _loaded:
        _loaded.append(_load_libc() if POSIX_SPAWN else (None, None))
    return _loaded[0]


def _call(fn, *args):
    """``fn(*args)`` of libc, again while it is interrupted; raises OSError (its subclass by errno, as
    ``os`` does) when it fails."""
    while True:
        result = fn(*args)
        if result >= 0:
            return result
        err = _libc()[0].get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def _buffer(ctypes, size):
    """This thread's read buffer, at least ``size`` bytes (at most READ_CHUNK are ever asked for)."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < size:
        buf = _local.buf = ctypes.create_string_buffer(max(size, 4096))
    return buf


def _close(fd):
    ctypes, libc = _libc()
    if libc is None:
        return os.close(fd)
    if libc.close(fd) < 0 and ctypes.get_errno() != errno.EINTR:  # never again after EINTR: it is closed
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open(path, flags):
    libc = _libc()[1]
    if libc is None:
        return os.open(path, flags)
    return _call(libc.open, os.fsencode(path), flags | os.O_CLOEXEC)


def _read_fd(fd, size):
    ctypes, libc = _libc()
    if libc is None:
        return os.read(fd, size)
    buf = _buffer(ctypes, size)
    return ctypes.string_at(buf, _call(libc.read, fd, buf, size))


def _pread(fd, size, offset):
    ctypes, libc = _libc()
    if libc is None:
        return os.pread(fd, size, offset)
    buf = _buffer(ctypes, size)
    return ctypes.string_at(buf, _call(libc.pread, fd, buf, size, offset))


def _reaped(pid):
    """The wait status of ``pid`` if it has exited (reaped now), else None (it has not, or no libc here)."""
    ctypes, libc = _libc()
    if libc is None:
        return None
    status = ctypes.c_int()
    return status.value if _call(libc.waitpid, pid, ctypes.byref(status), os.WNOHANG) == pid else None


def _write_fd(fd, data):
    libc = _libc()[1]
    if libc is None:
        return os.write(fd, data)
    data = bytes(data)
    return _call(libc.write, fd, data, len(data))


# -- the process tree in /proc ------------------------------------------------------------------------

def _read(path, size=4096, their_memory=False):
    """The start of a /proc file, at most ``size`` bytes, or None when it cannot be read (three system
    calls for a small file, no file object: a tree walk reads hundreds of these). It asks for READ_CHUNK
    at a time: a read allocates what it asks for, and an environment of a few KB read against its 1 MiB
    limit held 1 MiB each time. A file that is read out of the process's own memory (``their_memory``:
    environ) is read through ``os``, without the GIL: a page of it the process made fault slowly (a
    userfaultfd or FUSE mapping of a hostile child) would hold that read, and it must not hold hookd."""
    opened, read, close = (os.open, os.read, os.close) if their_memory else (_open, _read_fd, _close)
    try:
        fd = opened(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = read(fd, min(size, READ_CHUNK))
        if len(data) < READ_CHUNK:  # less than was asked (or all that was asked): nothing more to read
            return data
        parts, got = [data], len(data)
        while got < size:
            part = read(fd, min(size - got, READ_CHUNK))
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)
    except OSError:
        return None
    finally:
        close(fd)


def start_time(pid):
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22), or None if gone."""
    info = _stat(pid)
    return info[3] if info else None


def _stat(pid):
    """(ppid, pgid, state, start) of ``pid``, or None when it does not exist."""
    data = _read("/proc/%d/stat" % pid)
    try:
        fields = data.rsplit(b")", 1)[1].split()
        return int(fields[1]), int(fields[2]), fields[0].decode("ascii", "replace"), int(fields[19])
    except (AttributeError, IndexError, ValueError):
        return None


_kept = {}  # (path, flags) -> fd kept open: a /proc file read again and again (a read at offset 0 makes it
#             anew), /dev/null for the stdout nobody reads
_kept_lock = threading.Lock()


def _kept_fd(path, flags=os.O_RDONLY):
    """An fd on ``path`` opened once (close-on-exec, as every fd Python opens) and kept. Raises OSError."""
    fd = _kept.get((path, flags))
    if fd is None:
        with _kept_lock:
            fd = _kept.get((path, flags))
            if fd is None:
                fd = _kept[path, flags] = os.open(path, flags)
    return fd


def _reread(path, size=4096):
    """The start of a /proc file kept open (one system call instead of three), or None."""
    try:
        return _pread(_kept_fd(path), size, 0)
    except OSError:
        return None


def task_counters():
    """(tasks created since boot, tasks that exist now, the last pid handed out), from /proc/stat
    ("processes" counts every process and thread ever created, in any pid namespace) and /proc/loadavg
    (its fourth field ends with the number of tasks, its fifth is this namespace's last pid); None when
    one cannot be read (or /proc/stat's first 64 KiB, on a host with very many interrupts, do not hold
    the count)."""
    stat, loadavg = _reread("/proc/stat", 65536), _reread("/proc/loadavg")
    try:
        forks = int(stat.split(b"\nprocesses ", 1)[1].split(None, 1)[0])
        fields = loadavg.split()
        return forks, int(fields[3].split(b"/")[1]), int(fields[4])
    except (AttributeError, IndexError, ValueError):
        return None


def new_pids(pid, since):
    """Every pid that can have been handed out after ``pid``, which was forked after ``since``
    (``task_counters()``) was read, as a range; None when that is not bounded cheaply (read all of /proc).

    The kernel hands out pids in increasing order from the last one it gave, skipping numbers in use, and
    wraps at pid_max back to RESERVED_PIDS. ``made`` tasks were created since ``since``, anywhere; each
    holds at most three numbers (its pid, its group's, its session's), so at least pid_max -
    RESERVED_PIDS - 3 * (tasks then + made) numbers were free all along, and while ``made`` is below that
    the counter cannot have gone all the way round: every pid handed out after ``pid`` lies in
    (pid, last], or the counter wrapped (last < pid) and this gives up. Only a privileged process can pick
    its own pid (clone3 set_tid, ns_last_pid), and such a child can escape any tree walk anyway."""
    now = task_counters() if since is not None else None
    if now is None:
        return None
    made, last = now[0] - since[0], now[2]
    try:
        pid_max = int(_reread("/proc/sys/kernel/pid_max"))
    except (TypeError, ValueError):
        return None
    if not 0 < made <= NEW_PIDS_READ or made >= pid_max - RESERVED_PIDS - 3 * (since[1] + made):
        return None
    if not pid <= last <= pid + 4 * NEW_PIDS_READ:  # wrapped, or many numbers in use skipped: read all
        return None
    return range(pid + 1, last + 1)


def _is_process(pid):
    """True when ``pid`` is a process (a thread group's leader), not another thread of one: /proc lists
    only those, but /proc/TID can be read for any thread."""
    data = _read("/proc/%d/status" % pid) or b""
    tgid = data.split(b"\nTgid:", 1)[1].split(None, 1)[0] if b"\nTgid:" in data else b""
    return tgid == str(pid).encode()


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
    """True when ``pid``'s HOOKD_JOB is ``marker`` or nested in it (starts with "marker.")."""
    environ = _read("/proc/%d/environ" % pid, 1 << 20, their_memory=True)
    if environ is None:
        return False
    setting = b"\0%s=%s" % (MARKER.encode(), marker.encode())
    environ = b"\0" + environ + b"\0"
    return setting + b"\0" in environ or setting + b"." in environ


def tree(pgid, start, marker, since=None):
    """Live pids of the tree of a child started as group ``pgid`` at ``start`` with ``marker``: its group
    (only while the leader is still the process that started at ``start``), their descendants, and any
    process carrying the marker; a process started before ``start`` is never part of it. With ``since``
    (the child's ``task_counters()``), only the pids handed out since its fork are read when they are few
    (``new_pids``); otherwise every process in /proc."""
    new = new_pids(pgid, since) if pgid is not None else None
    if new is None:
        procs = _processes()
    else:
        procs = {pid: info for pid, info in ((p, _stat(p)) for p in new if not _elsewhere(p, marker)) if info}
        leader = (os.getpid(), pgid, "Z", start) if pgid in _zombies and _running.get(pgid) == marker \
            else _stat(pgid)  # a child of ``run`` that exited is a zombie until its ``end``: nothing to read
        if leader is not None:
            procs[pgid] = leader
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
    live = {pid: procs[pid][3] for pid in found if procs[pid][2] != "Z" and pid != os.getpid()}
    if new is not None:  # pids read one by one may be threads
        live = {pid: s for pid, s in live.items() if _is_process(pid)}
    return live


def _elsewhere(pid, marker):
    """True when ``pid`` is another child ``run`` started and has not reaped (so the pid is still that
    child's) whose marker is not nested in ``marker``: it is not in the tree, and reading /proc to learn
    so costs two files (stat, environ) per such child, for every job that ends while others run. Such a
    child is in no other child's tree: its parent is hookd, its group its own, its marker its own. (A child
    that is not a session leader may move into another group of hookd's session, e.g. another child's:
    this fast path then leaves it out of that child's tree, where a walk of all of /proc would put it in;
    it is still its own job's, and killed with it.)"""
    theirs = _running.get(pid)
    return theirs is not None and theirs != marker and not theirs.startswith(marker + ".")


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
    """SIGKILL ``child`` (a Child) and its whole tree."""
    return kill_recorded(child.pid, child.start, child.marker, child.since)


def kill_recorded(pgid, start, marker, since=None):
    """SIGKILL the tree of group ``pgid`` started at ``start`` with ``marker`` (see ``tree``; a group not
    known, None, leaves the marker alone to find it), waiting for each round to die and rescanning while it
    keeps forking. Returns the number of processes signalled."""
    killed = 0
    for _ in range(KILL_ROUNDS):
        victims = tree(pgid, start or 0, marker, since)
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
            _close(fd)
