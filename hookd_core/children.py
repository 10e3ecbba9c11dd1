"""A job's processes never outlive hookd: each one is recorded in the store while it runs, killed after
``shutdown_grace`` on SIGTERM, and after a crash killed by the next start before its job runs again.

Strategy: the worker runs each job inside ``Registry.job("event N")`` (the alert sender each alert command
inside ``job("alert N")``), which makes the registry the watcher of every child that thread spawns
(hookd_core/proc.py). Markers nest (proc.py): every child's HOOKD_JOB marker is this run's marker, a dot
and a number. Before the first child forks, one row naming the run's marker (owner RUN_OWNER) is
committed, once per run, so a crash at any moment later still finds every child of the run by its marker,
without a commit wait before each fork. When a child runs, its own row goes into ``child_processes``
(marker, owner, process group, start time in clock ticks since boot, boot), and when it ends the row goes;
neither is waited for: both go with the store's next group, together with every other child's, and a child
that ended before that group is never written at all. ``kill_all`` (SIGTERM, after the grace) kills the
tree of every child still running. ``kill_leftovers`` (at start, before anything is requeued) reads the
rows a previous run left: a row of this boot has its tree killed (``proc.tree`` trusts a group only while
its leader has the recorded start time, so a reused pid is never hit), the children's rows first so that
what is killed is told by job, then the run's row for whatever carries its marker but had no row yet; then
every row is deleted. Pure functions over a connection keep the SQL in one place. ``owns_peer`` tells the
admin listener when a connection comes from a job's process, which it refuses: the admin API is the
operator's, and a child shares hookd's user and (on TCP) its loopback.
"""

import itertools
import os
import secrets
import socket
import sqlite3
import struct
import threading
import time

from . import proc
from .store import StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS child_processes (
  marker TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  pgid INTEGER,
  start_ticks INTEGER,
  boot_id TEXT NOT NULL,
  started_at REAL NOT NULL
);
DROP TABLE IF EXISTS job_processes
"""  # job_processes: this table's first form (one hour on main, keyed by event id only), never released


def boot_id():
    """This boot's id (a process start time means nothing across a reboot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


RUN_OWNER = "a job not yet recorded"  # the run's own row: what it finds had no row of its own yet


def record(conn, rows):
    """Rows (marker, owner, pgid, start_ticks, boot_id, started_at): a run's (pgid None, its start is
    hookd's own) or a child's that runs as group ``pgid``."""
    conn.executemany("INSERT OR REPLACE INTO child_processes(marker, owner, pgid, start_ticks, boot_id,"
                     " started_at) VALUES (?, ?, ?, ?, ?, ?)", rows)


def forget(conn, markers):
    conn.executemany("DELETE FROM child_processes WHERE marker=?", [(m,) for m in markers])


def recorded(conn):
    """[(marker, owner, pgid, start_ticks, boot_id)] of every recorded process group."""
    return conn.execute("SELECT marker, owner, pgid, start_ticks, boot_id FROM child_processes"
                        " ORDER BY started_at").fetchall()


class Registry:
    """The children of the running jobs, in memory and in the store's ``child_processes`` table."""

    def __init__(self, store, log):
        self.store, self.log = store, log
        self.boot = boot_id()
        self.store.write(lambda conn: [conn.execute(sql) for sql in SCHEMA.split(";") if sql.strip()])
        self._lock = threading.Lock()
        self._live = {}  # marker -> (owner, Child)
        self.run = secrets.token_hex(8)  # every child's marker is nested in it
        self._numbers = itertools.count(1)
        self._run_stored = False
        self._run_lock = threading.Lock()
        self._unsaved = {}  # marker -> row of a running child, not yet handed to the store
        self._gone = []  # markers of ended children whose rows were handed to the store
        self._flush_queued = False

    def job(self, owner):
        """Context manager: children spawned by this thread inside it belong to ``owner`` ("event 7",
        "alert 3": what the log lines name)."""
        return proc.watched_by(_Job(self, owner))

    def marker(self):
        return "%s.%d" % (self.run, next(self._numbers))

    def starting(self):
        """Before a fork: the run's row must be durable (a crash a moment later must still find the child
        by its marker), which is waited for once per run. A row that cannot be written (disk full, store
        closing) does not fail the job: the child is still tracked in memory (timeouts, SIGTERM), only a
        crash would leave it unrecorded, and the next child tries again."""
        if self._run_stored:
            return
        with self._run_lock:
            if self._run_stored:
                return
            start = proc.start_time(os.getpid())
            try:
                self.store.write(lambda conn: record(conn, [(self.run, RUN_OWNER, None, start, self.boot,
                                                             time.time())]))
                self._run_stored = True
            except (StoreError, sqlite3.Error) as e:
                self._not_stored(e)

    def started(self, owner, child):
        """The child's row goes with the store's next group (``_flush``), not waited for (a job would
        wait a group commit); a child that has ended by then is never written. Until its row commits, the
        run's row, which ``starting`` made durable before the fork, is what finds it after a crash."""
        with self._lock:
            self._live[child.marker] = (owner, child)
            self._unsaved[child.marker] = (child.marker, owner, child.pid, child.start, self.boot, time.time())
        self._flush_soon()

    def ended(self, marker):
        """Its row goes with the next group too, if it was written: a row left behind only names
        processes the next start finds gone."""
        with self._lock:
            self._live.pop(marker, None)
            if self._unsaved.pop(marker, None) is not None:
                return
            self._gone.append(marker)
        self._flush_soon()

    def _flush_soon(self):
        with self._lock:
            if self._flush_queued:
                return
            self._flush_queued = True
        try:
            self.store.write_soon(self._flush, self._not_stored)
        except StoreError as e:  # stopping: the rows stay, and the next start finds their processes gone
            with self._lock:
                self._flush_queued = False
            self._not_stored(e)

    def _flush(self, conn):
        """In a group on the store's writer: the rows of the children started since the last flush and
        still running, and the deletion of the rows of those that ended since."""
        with self._lock:
            rows, gone = list(self._unsaved.values()), self._gone
            self._unsaved, self._gone, self._flush_queued = {}, [], False
        if rows:  # usually neither: a short child started and ended between two groups
            record(conn, rows)
        if gone:
            forget(conn, gone)

    def _not_stored(self, error):
        self.log.warning("could not record a job process: %s", error)

    def owns_peer(self, sock):
        """True when the other end of ``sock`` (accepted on the admin listener) is a process of a running
        job: by SO_PEERCRED on a unix socket, by the connecting socket's inode (/proc/net/tcp) among the
        job processes' open sockets on TCP. Costs nothing while no job runs a program."""
        with self._lock:
            live = [child for _, child in self._live.values()]
        if not live:
            return False
        pids = set()
        for child in live:
            pids.update(child.tree())
        if sock.family == socket.AF_UNIX:
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            return pid in pids
        inode = peer_inode(sock)
        return inode is not None and any(inode in proc.socket_inodes(pid) for pid in pids)

    def kill_all(self):
        """SIGKILL the tree of every child still running (hookd is stopping); returns the owners hit."""
        with self._lock:
            live = list(self._live.values())
        for owner, child in live:
            proc.kill_tree(child)
        return sorted({owner for owner, _ in live})

    def kill_leftovers(self):
        """Kill what a previous run of hookd left running, then forget it; returns {owner: killed}."""
        rows = self.store.read(recorded)
        hit = {}
        for marker, owner, pgid, start, boot in sorted(rows, key=lambda row: row[1] == RUN_OWNER):
            if boot == self.boot and marker != self.run:
                n = proc.kill_recorded(pgid, start, marker)
                if n:
                    hit[owner] = hit.get(owner, 0) + n
        if rows:
            self.store.write(lambda conn: forget(conn, [r[0] for r in rows]))
        return hit


def peer_inode(sock):
    """The inode of the socket at the other end of a loopback TCP connection, from /proc/net/tcp(6):
    the row whose local address is our peer and whose remote address is us. None if not found."""
    try:
        peer, local = sock.getpeername()[:2], sock.getsockname()[:2]
    except OSError:
        return None
    table = "/proc/net/tcp6" if sock.family == socket.AF_INET6 else "/proc/net/tcp"
    try:
        with open(table) as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        cols = row.split()
        if len(cols) > 9 and _address(cols[1]) == peer and _address(cols[2]) == local:
            return int(cols[9])
    return None


def _address(text):
    """("ip", port) from /proc/net/tcp's hex "ADDR:PORT" (the address in 32-bit words of host order)."""
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words), int(port, 16)


class _Job:
    """The watcher of one job's thread: reports its children to the registry under the event's id."""

    def __init__(self, registry, owner):
        self.registry, self.owner = registry, owner

    def marker(self):
        return self.registry.marker()

    def starting(self, marker):
        self.registry.starting()

    def started(self, child):
        self.registry.started(self.owner, child)

    def ended(self, marker):
        self.registry.ended(marker)
