"""Talking to systemd with the standard library only: sd_notify, socket activation and the watchdog.

Strategy: systemd's side of each protocol is a few environment variables, so each one is a small pure
function that takes ``environ`` (default ``os.environ``) and never raises: without systemd they return
False / [] / None and hookd runs as a plain process. ``notify`` sends one datagram to ``$NOTIFY_SOCKET``
(a path, or an abstract name written with a leading ``@``; sd_notify(3)). ``listen_sockets`` takes the
sockets systemd passed from fd 3 on when ``$LISTEN_PID`` is this process (sd_listen_fds(3)) and unsets the
variables so that children (ffmpeg, commands) do not inherit them. The watchdog is split in two:
``watchdog_ok`` decides from plain numbers whether the worker pool is making progress (idle counts as
healthy; a busy worker silent past its job's timeout is stuck), and ``Watchdog`` sends ``WATCHDOG=1`` at
half of ``$WATCHDOG_USEC``, and only while the core says the pool is healthy, so a stuck pool gets the
service killed and restarted by systemd instead of hanging forever.
"""

import os
import socket
import time

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first passed fd, after stdin, stdout and stderr
MAX_LISTEN_FDS = 64   # a sanity cap: hookd needs one socket; a garbage LISTEN_FDS must not loop for long
MAX_MESSAGE = 4096    # bytes; notify messages are a few short KEY=VALUE lines


def notify(state, environ=None):
    """Send ``state`` (e.g. ``"READY=1"``, ``"STATUS=3 queued"``) to ``$NOTIFY_SOCKET``.

    Returns True when the datagram was sent, False when there is no socket or sending failed. Never
    raises: a missing or broken supervisor must not stop the daemon."""
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False  # unset, or a vsock:// address (not used by hookd)
    if address[0] == "@":
        address = "\0" + address[1:]  # abstract namespace: systemd writes the leading NUL as '@'
    try:
        data = state.encode("utf-8") if isinstance(state, str) else bytes(state)
        if not data or len(data) > MAX_MESSAGE:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1.0)  # a full receive queue must not block the caller for long
            sock.sendto(data, address)
        return True
    except Exception:  # OSError, ValueError (NUL in a path), TypeError: all mean "not sent"
        return False


def listen_sockets(environ=None):
    """The sockets systemd passed to this process (socket activation), or [] when there are none.

    ``$LISTEN_PID`` must equal ``os.getpid()`` (otherwise the variables were meant for a parent and are
    left alone); ``$LISTEN_FDS`` sockets are taken from fd 3 on. The variables are then removed from
    ``environ`` so that programs hookd starts do not believe the fds are theirs."""
    environ = os.environ if environ is None else environ
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    if not (pid.isdigit() and count.isdigit()) or int(pid) != os.getpid():
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)  # os.environ.pop also calls unsetenv()
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + min(int(count), MAX_LISTEN_FDS)):
        sock = _adopt(fd)
        if sock is not None:
            sockets.append(sock)
    return sockets


def _adopt(fd):
    """A socket object for inherited ``fd`` (family and type read from the fd), close-on-exec; None if
    the fd is not a socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    sock.set_inheritable(False)  # children (ffmpeg, commands) must not hold the listening socket open
    return sock


def watchdog_interval(environ=None):
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises), or None when the watchdog is off or meant for another process (``$WATCHDOG_PID``)."""
    environ = os.environ if environ is None else environ
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def watchdog_ok(last_progress, busy, job_timeout, now):
    """True when the worker pool is healthy: every worker idle, or each busy one heard from recently.

    ``last_progress``: per worker, the monotonic time it last made progress (took, finished or reported
    on a job); ``busy``: per worker, True while it runs a job; ``job_timeout``: per worker the running
    job's timeout in seconds, or one number for all. A busy worker whose last progress is older than its
    job's timeout is stuck, and one stuck worker makes the pool unhealthy."""
    if isinstance(job_timeout, (int, float)):
        job_timeout = [job_timeout] * len(busy)
    for last, is_busy, limit in zip(last_progress, busy, job_timeout):
        if is_busy and (last is None or now - last > limit):
            return False
    return True


class Watchdog:
    """Pings systemd's watchdog at ``interval`` seconds while the core reports a healthy pool.

    The core calls ``tick(healthy)`` often (every second or faster, from its main loop); a ping goes out
    when one is due and ``healthy`` is true. With no watchdog configured, ``tick`` does nothing."""

    def __init__(self, environ=None, send=None, clock=time.monotonic):
        self.environ = os.environ if environ is None else environ
        self.interval = watchdog_interval(self.environ)
        self.send = send or (lambda state: notify(state, self.environ))
        self.clock = clock
        self.last_ping = None
        self.missed = 0  # pings withheld because the pool was unhealthy

    @property
    def enabled(self):
        return self.interval is not None

    def tick(self, healthy, now=None):
        """Send ``WATCHDOG=1`` if one is due and ``healthy``; True when a ping was sent."""
        if self.interval is None:
            return False
        now = self.clock() if now is None else now
        if self.last_ping is not None and now - self.last_ping < self.interval:
            return False
        if not healthy:
            self.missed += 1
            return False
        self.last_ping = now
        return bool(self.send("WATCHDOG=1"))
