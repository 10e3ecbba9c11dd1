"""The durable store: one sqlite file (WAL, synchronous=FULL), one writer thread, group commit.

Strategy: sqlite is the source of truth and only this module touches it. Every write is a function
``fn(conn)`` (``write``), one request's events (``add_events``/``submit_events``), or one row of a
batched statement (a worker's claim or finish). All of them go to one writer thread, which takes
everything waiting, runs it in one ``BEGIN IMMEDIATE`` transaction, in submission order, and commits
once: N concurrent webhooks cost one fsync, not N. The events of all requests in a group are stored
with a few statements (multi-row ``INSERT OR IGNORE``s into ``events``, 64 rows and fewer, which the
unique dedupe index makes turn away known keys, with no look-up first), with ids handed out by the writer, and a group's consecutive claims or
finishes are one ``executemany`` each, so a group costs a few statements however many requests it
holds. Only after the COMMIT does a caller learn its result: a blocked caller is woken, or its ``then``
runs on the writer thread, so a request's answer can leave as soon as its commit is on disk without
waking the request's own thread first. Before it takes the next group the writer waits, as long as
requests keep coming, until as many are queued as the group before answered (their clients usually send
again at once) plus those queued while it ran, and at most GATHER_MOST times as long as that group took:
one group of all the clients, one COMMIT, instead of groups that split them into halves, each paying a
COMMIT. When the writer is idle and nothing is queued, a request's
(or a waiting ``write``'s) own thread commits it as a group of one instead: no thread switch there and
back (a client that sends one request at a time meets an idle writer every time). If the
transaction fails (disk full, read-only file) every
caller of that group gets a StoreError and nothing of the group is stored; a ``write`` function that
raises is rolled back alone (a savepoint) and the others commit. A request's body is stored once,
however many events it becomes: in its first event row, which the others name (``body_row``) and which
alone keeps the request's headers and content type, or, over ROW_BODY_BYTES, in ``request_bodies`` (append-only rowid keys, no random-key B-tree); an
event of a batch delivery (Preservica's ``events[]``) keeps only its index in that array (``element``),
never a copy of the envelope. Workers' claims do not wait for their commit: ``_claimed`` makes a claim
exclusive in the process (against leases too) until the attempt's finish has committed. Reads use a
connection per thread (WAL readers do not block the writer). Counts of waiting events per route live
in memory, changed after each commit and re-read from the table now and then (the CLI may change rows
while the daemon runs).
"""

import hashlib
import json
import operator
import os
import queue
import secrets
import sqlite3
import sys
import threading
import time
from collections import deque
from itertools import chain

from . import logs
from .api import Busy, json_or_none

WAITING = ("queued", "retry", "running")
STATUSES = ("queued", "running", "done", "retry", "dead", "duplicate")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY,
  route TEXT NOT NULL,
  status TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  received_at REAL NOT NULL,
  updated_at REAL NOT NULL,
  next_at REAL NOT NULL DEFAULT 0,
  last_error TEXT,
  note TEXT,
  dedupe_key TEXT,
  duplicate_of INTEGER,
  serial_key TEXT,
  headers TEXT,
  content_type TEXT,
  body_hash TEXT,
  payload TEXT,
  progress TEXT,
  body_id INTEGER,
  element INTEGER,
  body BLOB,
  body_row INTEGER
);
CREATE TABLE IF NOT EXISTS request_bodies (
  id INTEGER PRIMARY KEY,
  data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS products (
  id INTEGER PRIMARY KEY,
  event_id INTEGER NOT NULL,
  kind TEXT NOT NULL,
  path TEXT,
  data TEXT,
  created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS products_event ON products(event_id);
CREATE UNIQUE INDEX IF NOT EXISTS events_dedupe ON events(route, dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_due ON events(status, next_at) WHERE status <> 'done';
CREATE TABLE IF NOT EXISTS leases (
  lease_id TEXT PRIMARY KEY,
  event_id INTEGER NOT NULL,
  route TEXT NOT NULL,
  worker TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  leased_at REAL NOT NULL,
  lease_until REAL NOT NULL,
  ended TEXT,
  ended_at REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS leases_held ON leases(lease_until) WHERE ended IS NULL;
CREATE INDEX IF NOT EXISTS leases_event ON leases(event_id);
CREATE TABLE IF NOT EXISTS lease_workers (
  worker TEXT PRIMARY KEY,
  last_seen REAL NOT NULL,
  address TEXT,
  routes TEXT
) WITHOUT ROWID;
"""

NOTHING_TO_DO = "stored; no work or action configured for this route"
# SQL NULL as the multi-row INSERTs bind it: a NaN, which sqlite stores as NULL (sqlite3VdbeMemSetDouble).
# A float is bound directly, where None goes through sqlite3's adapter look-up first (a registry probe and
# two attribute look-ups): 0.04 against 0.38 µs a value, and a Preservica delivery's rows bind 7 NULLs.
NULL = float("nan")
# events_due holds only rows that are not done: done rows are most of the table and no query looks them
# up by status, and a route with no action stores every row done, each of which cost an index entry (a
# page more per commit at 1 connection). sqlite uses a partial index only when the query's WHERE holds
# the index's own term, so every query that finds events by a status other than done says
# "status <> 'done' AND ..." (tests/test_store.py checks each one's plan).
# The schema's version, kept in the database (``PRAGMA user_version``) by ``migrate``: 1 since a request's
# body may live in its first event row, which hookd before that (user_version 0) reads as an empty body;
# 2 since a request's other rows keep no headers or content type of their own and a row stored done at
# intake no note (``_store_requests``), which hookd before that reads as none.
# A database stamped with a newer version than this is refused: a rollback fails at start, loudly.
SCHEMA_VERSION = 2
MAX_GROUP = 512  # operations per commit; bounds the time one transaction holds the write lock
GATHER_GAP = 0.0003  # the writer stops waiting for the clients of the group before when none sent for this long,
GATHER_MOST = 2.0  # and after this many times as long as that group took to commit and answer
# The gather's first look comes after the time the awaited requests took the gather before, per request,
# times GATHER_SLACK, once that gather got all of at least GATHER_PACED requests faster than GATHER_GAP/4
# each (``_gather``): at 16 connections the 0.3 ms timer otherwise went off 0.4-0.5 times a gather.
GATHER_PACED = 8
GATHER_SLACK = 1.25
PREPARE_AT = 4  # answers in a group from which they are prepared on a thread of their own during the COMMIT
MAX_BATCH = 1000  # elements of a batch delivery looked at on a redelivery (Preservica's MAX_EVENTS)
KEYS_PER_SELECT = 400  # dedupe keys looked up per statement (sqlite's variable limit is 999 on old builds)
# A WAL file a burst (one large request) grew past this is cut back to it when the WAL starts over. The
# WAL normally stays near sqlite's automatic checkpoint (1000 pages, ~4 MB): a limit below that would cut
# and regrow the file every time, and an fsync that grows a file costs more than one that overwrites it.
WAL_KEEP_BYTES = 8 << 20
# sqlite's automatic checkpoint (every WAL_CHECKPOINT_PAGES frames) runs inside the COMMIT that crosses
# the line and holds that group's answers while it copies the WAL into the database and syncs it (3-4 ms
# for a Standard Webhooks group at 16 connections, 12 for Preservica's): 1-2 % of the requests, the p99.
# Once the WAL holds CHECKPOINT_AHEAD frames a thread of its own copies them (``_checkpoint_forever``)
# while the writer goes on, so the automatic checkpoint finds most of the WAL copied already and only
# copies the rest; it stays the one that lets the WAL start over, and the backstop when that thread
# cannot keep up or cannot run. The copies are small: each ends with an fsync of the database, and the
# writer's fdatasync of the WAL waits behind whatever that fsync writes on the same disk (800 frames at a
# time slowed the commits beside it from 0.37 to 0.8-1.0 ms, 2 % of the groups at 16 connections; 200 at
# a time, four times as often, to 0.43-0.45 ms).
# The WAL starts over at the first BEGIN that finds it all copied (nBackfill = mxFrame): a copy beside a
# writer that never pauses never gets there, and the COMMIT crossing WAL_CHECKPOINT_PAGES still copied the
# rest (~170 frames, 1.5-1.9 ms instead of 0.4: the slowest 1 % at 16 connections). So once the WAL holds
# RESTART_FROM frames, the COMMIT after which fewer than RESTART_BEHIND are left to copy has the
# checkpointing thread copy them while its answers go out, and the next group's BEGIN waits for that copy
# (``_copy_to_restart``, ``_wal_restart_wait``): the WAL starts over there, short of the automatic line.
WAL_CHECKPOINT_PAGES = 1000  # sqlite's default wal_autocheckpoint
CHECKPOINT_AHEAD = 200
RESTART_FROM = WAL_CHECKPOINT_PAGES - CHECKPOINT_AHEAD
RESTART_BEHIND = CHECKPOINT_AHEAD // 2
RESTART_WAIT = 0.1  # seconds a group waits at most for that copy (two fsyncs); then it goes on without
CLOCK_SLACK = 3600.0  # seconds a row may be received out of order and still be pruned on time (``prune``)
IDS_PER_READ = 20000  # events to delete, or bodies no event needs, that prune finds in one read (its memory)
EVENTS_PER_DELETE = 1000  # ... events it deletes in one write (with their ended leases and products),
BODIES_PER_DELETE = 500  # ... bodies it deletes in one write: ~3 ms of the writer for 1.2 KB bodies,
BODY_BYTES_PER_DELETE = 4 << 20  # or fewer of large ones (~1 ms each per MB: sqlite reads the overflow pages)
WRITER_CACHE_KIB = 1024  # sqlite's page cache per connection (its default is 2000 KiB each)
READER_CACHE_KIB = 256

# The statements workers' attempts batch: in a group every claim runs before every finish (one
# executemany each), so a claim and the finish of the same attempt may share a group.
CLAIM = ("UPDATE events SET status='running', attempts=attempts+1, updated_at=?"
         " WHERE id=? AND status IN ('queued','retry')")
FINISH = ("UPDATE events SET status=?, last_error=?, note=coalesce(?, note), next_at=?, updated_at=?"
          " WHERE id=? AND status='running'")

# A group's rows go in CHUNKS[0] at a time, then one statement per smaller size that is left; 64 rows of
# 14 values stay under the 999 variables of old sqlite builds. The texts hold placeholders only.
CHUNKS = (64, 32, 16, 8, 4, 2, 1)
_INSERT_NEW = {n: "INSERT OR IGNORE INTO events(id, route, status, received_at, updated_at, dedupe_key,"
                  " serial_key, headers, content_type, body, body_row, body_id, element, payload) VALUES "
                  + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * n) for n in CHUNKS}
HEADERS, BODY, BODY_ROW = 7, 9, 10  # where a row of _INSERT_NEW has its headers (content_type next), body, body_row
# A group of requests of one shape (``_store_alike``) goes in SHAPED_ROWS rows or fewer a statement, whose
# text is kept per shape and number of requests, for the first SHAPES of them (sqlite3's statement cache
# holds 128 texts a connection); a request of more rows, or another shape once SHAPES are kept, goes the
# general way. The numbers of requests are those of CHUNKS (a statement per binary digit, as the general
# path does), so a shape keeps at most 7 texts: one for every number up to 64 kept 64 prepared
# statements of up to 64 rows each: peak RSS 38.8 / 39.3 MB against 35.9 / 35.8 with these (Standard
# Webhooks at 16 and 64 connections, two alternating bench/run rounds).
SHAPED_ROWS, SHAPES = 64, 64
_SHAPED = {}
# What ``_store_alike`` reads of each row, in one call a row (App.event_rows gives every row all of them).
_ROW_NAMES = ("body", "headers", "content_type", "done", "dedupe_key", "serial_key", "element", "payload")
_ROW_FIELDS = operator.itemgetter(*_ROW_NAMES)
_INSERT_BODIES = {n: "INSERT INTO request_bodies(id, data) VALUES " + ", ".join(["(?, ?)"] * n) for n in CHUNKS}
# A body up to this size is kept in its request's first event row (``_store_requests``): the record stays
# within a 4 KiB page (no overflow page), so a worker's status change rewrites one leaf, not the body.
# A larger body goes to request_bodies, where no status change touches it.
ROW_BODY_BYTES = 2048
# A row's body, whichever way it is stored: in the row, in the row holding its request's body (h), or in
# request_bodies (b, rows written before bodies moved into rows, and bodies over ROW_BODY_BYTES).
_BODY_JOINS = (" LEFT JOIN events h ON h.id = e.body_row AND e.body IS NULL"
               " LEFT JOIN request_bodies b ON b.id = e.body_id")
_BODY = "coalesce(e.body, h.body, b.data)"
# A row's headers and content type: its own, or, when it names its request's body row (``body_row``), that
# row's (``_store_requests`` keeps them once a request).
_SHARED = {"headers": "coalesce(e.headers, h.headers)", "content_type": "coalesce(e.content_type, h.content_type)"}
_INSERT_DUPLICATE = ("INSERT INTO events(id, route, status, received_at, updated_at, duplicate_of, headers,"
                     " content_type, note) VALUES (?, ?, 'duplicate', ?, ?, ?, ?, ?, ?)")


class _Op:
    """One write waiting for its group: a function (``fn``), one request's events (``rows``), or one
    row's parameters for a batched statement (``stmt``: CLAIM or FINISH, ``args``).
    ``then(result, error)``, when given, runs after the commit on the thread that committed (the writer,
    or the caller when it committed its own group); otherwise the
    caller sleeps on ``_gate``, a bare lock used as a one-shot gate (cheaper than an Event)."""

    __slots__ = ("fn", "route", "rows", "now", "limit", "stmt", "args", "then", "result", "error", "delta",
                 "_gate")

    def __init__(self, fn=None, delta=None, route=None, rows=None, now=None, limit=None, stmt=None, args=None,
                 then=None):
        self.fn, self.delta, self.route, self.rows, self.now, self.limit = fn, delta, route, rows, now, limit
        self.stmt, self.args = stmt, args
        self.then, self.result, self.error = then, None, None
        self._gate = None
        if then is None:
            self._gate = threading.Lock()
            self._gate.acquire()

    def wait(self):
        self._gate.acquire()
        if self.error is not None:
            raise self.error
        return self.result

    def settle(self, log_error):
        """The group is over: hand the outcome to ``then`` or wake the caller."""
        if self.then is None:
            self._gate.release()
            return
        try:
            self.then(self.result, self.error)
        except Exception:  # a failing answer must not stop the writer
            log_error()


def set_policy(policy):
    """This thread's scheduling policy (Linux); False when the system refuses it."""
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
        return True
    except OSError:
        return False


def _idle_reversible():
    """True when a thread of this process can take SCHED_IDLE and then SCHED_OTHER back: root,
    CAP_SYS_NICE, or an RLIMIT_NICE of 20 or more. An unprivileged process (hookd's unit: DynamicUser, no
    capabilities, RLIMIT_NICE 0) can take it but never leave it (sched(7)). Tried on a thread of its own,
    which then ends with whatever policy it was left."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    answer = []
    probe = threading.Thread(target=lambda: answer.append(set_policy(os.SCHED_IDLE) and set_policy(os.SCHED_OTHER)),
                             name="hookd-probe")
    probe.start()
    probe.join()
    return answer == [True]


def _run_fn(conn, op, isolate):
    """Run a function operation; inside a savepoint when others share the transaction, so that one
    that raises is rolled back alone. False when it failed alone (the transaction is rolled back)."""
    try:
        if isolate:
            conn.execute("SAVEPOINT op")
        op.result = op.fn(conn)
        if isolate:
            conn.execute("RELEASE op")
        return True
    except Exception as e:  # one bad function must not sink the group
        op.error = e
        conn.execute("ROLLBACK TO op" if isolate else "ROLLBACK")  # if this fails, the group fails
        if isolate:
            conn.execute("RELEASE op")
        return isolate


_SHM_FDS = {}  # database path -> a read-only descriptor of its -shm file (``Store._wal_frames``), never closed


def _flush(conn, batch):
    """Run a batch of one statement's operations as one executemany; returns a new empty batch."""
    if batch:
        conn.executemany(batch[0].stmt, [op.args for op in batch])
    return []


def _nothing(result, error):
    """A claim needs no answer: its attempt's finish reports what reached the database."""


class StoreError(Exception):
    """The database could not take a write (disk full, read-only, locked too long)."""


class PruneStopped(Exception):
    """``Store.prune`` stopped by a shutdown before its end; its text says how far it got."""


class Store:
    """``write(fn)``, ``add_events``/``submit_events``, ``read(fn)``, ``waiting(route)``, plus the event
    operations the core needs."""

    def __init__(self, path, log=None):
        self.path = path
        self.log = log
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._local = threading.local()
        self._pending = []           # operations waiting for the next group
        self._plock = threading.Lock()
        self._wake = threading.Lock()  # held while the writer sleeps; released to wake it
        self._wake.acquire()
        self._idle = True            # the writer is asleep (or about to be) on _wake
        self._committing = threading.Lock()  # held by whoever runs a group on the connection
        self._waiting = {}  # route -> events queued, retrying or running
        self._waiting_total = 0  # their sum, kept with them (``waiting()``: every request reads it)
        self._claimed = {}           # event id -> serial key: claimed, finish not committed yet
        self._leasing = {}           # event id -> serial key: picked by a lease not committed yet
        self._count_lock = threading.Lock()
        self._closed = False
        self.groups = 0  # commits done; tests use it to see group commit at work
        # fn(conn, event_id, error), run inside every transaction that moves an event from running to dead
        # (a worker's last attempt, a remote worker's dead, an expired last lease): the App queues its alert
        self.on_dead = None
        # the context a commit group's answers run in (``_settle``): their log lines written together; the
        # App's ``Settling`` also holds its metrics' counts (``Metrics.hold``)
        self.settling = logs.batched
        self._conn = self._connect()
        try:
            migrate(self._conn)
        except StoreError as e:
            self._conn.close()
            raise StoreError("%s: %s" % (path, e))
        self._recount(self._conn)
        self._requests = 0  # requests' operations in _pending
        self._want = 0  # the writer waits (in _gather) until this many requests are queued
        self._full = threading.Lock()  # released by the submitter that queues the request _want waits for
        self._full.acquire()
        self._preparer = None  # the thread that prepares a group's answers during its COMMIT (``_prepare``);
        #                        False where none may (``_idle_reversible``)
        self._to_prepare = None
        self._checkpointer = None  # the thread that copies the WAL ahead of sqlite's automatic checkpoint
        #                            (``_checkpoint_ahead``); False where none could start
        self._to_checkpoint = None
        self._checkpointing = False  # it was asked and has not finished yet
        self._shm = None  # the -shm file, read by ``_wal_frames``
        self._restarting = None  # released when the copy that lets the WAL start over is done
        self._restarted = None  # the WAL's frames when that copy was asked for, until the WAL starts over
        self._writer = threading.Thread(target=self._write_forever, name="hookd-writer", daemon=True)
        self._writer.start()

    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA journal_size_limit=%d" % WAL_KEEP_BYTES)
        conn.execute("PRAGMA wal_autocheckpoint=%d" % WAL_CHECKPOINT_PAGES)
        conn.execute("PRAGMA cache_size=-%d" % WRITER_CACHE_KIB)
        conn.execute("PRAGMA synchronous=FULL")  # the 2xx promises the event survives power loss
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    # -- writing ------------------------------------------------------------------------------------
    def write(self, fn, delta=None):
        """Run ``fn(conn)`` in the next group transaction and return its result once committed.
        ``delta`` = {route: n} is added to the waiting counts after the commit."""
        return self._submit(_Op(fn=fn, delta=delta), lead=True).wait()

    def write_soon(self, fn, on_error=None):
        """Run ``fn(conn)`` in the next group without waiting for its commit; it still commits in order
        with every write submitted before and after it. ``on_error(exception)`` runs on the writer thread
        if it fails (its own error, or the group's StoreError)."""
        def then(result, error):
            if error is not None and on_error is not None:
                on_error(error)
        self._submit(_Op(fn=fn, then=then))

    def add_events(self, route, rows, now=None, limit=None):
        """Store one request's events (dicts from ``App.event_rows``) atomically; returns [(id, "new" or
        "duplicate")] once committed. A row whose (route, dedupe_key) exists becomes a 'duplicate' row
        pointing at the original (whose id is returned). A row with ``done`` set is stored as done at
        once. ``limit``: refuse with Busy when the route already has that many events waiting; counted
        inside the transaction, so concurrent requests cannot both slip past it."""
        return self.submit_events(route, rows, now=now, limit=limit).wait()

    def submit_events(self, route, rows, now=None, limit=None, then=None):
        """``add_events`` without waiting: ``then(result, error)`` runs right after the commit, on the
        writer thread, or on this one when the writer was idle and this thread committed the events
        itself (error: Busy, or StoreError when nothing was stored). Without ``then``, call ``.wait()``
        on the returned operation."""
        now = time.time() if now is None else now  # _Op's arguments by position: half the time of keywords
        return self._submit(_Op(None, None, route, rows, now, limit, None, None, then), True)

    def _submit(self, op, lead=False):
        """Queue ``op`` for the writer thread. With ``lead`` (a caller that waits for its commit anyway,
        or whose ``then`` answers a client that waits for it), when the writer is idle and nothing is
        queued the caller commits ``op`` as a group of its own on its own thread and settles it before
        returning: no thread switch there and back. Whatever is submitted meanwhile goes to the writer,
        which takes the connection only after that group is settled, so groups stay in order."""
        with self._plock:
            if self._closed:
                raise StoreError("store is closed")
            lead = lead and self._idle and not self._pending and self._committing.acquire(False)
            full = False
            if not lead:
                self._pending.append(op)
                wake, self._idle = self._idle, False
                if op.rows is not None:
                    self._requests += 1
                    if self._want and self._requests >= self._want:
                        self._want, full = 0, True
        if lead:
            try:
                self._run_group([op])
            finally:
                self._committing.release()
        elif wake:
            self._wake.release()
        elif full:
            self._full.release()
        return op

    def _write_forever(self):
        while True:
            self._wake.acquire()
            with self._committing:  # a caller may be running its own group
                self._drain()

    def _drain(self):
        """Commit what is queued, group after group, until nothing is; then mark the writer idle.
        Before taking a group the writer waits, while requests keep coming (GATHER_GAP), until as many
        requests are queued as the group before answered: their clients usually send again as soon as
        they have their answer, and a group that closed while half of them were still being read would
        split the clients into smaller groups, each paying a COMMIT (docs/performance.md, the
        16-connection gap). It waits for those queued while the group before ran as well (none of them
        is from a client that group answered): without them, a group that once split in two halves (an
        idle moment, a slow client) stayed split, each half finding the other already queued and taking
        it alone, every request waiting for the other half's commit before its own. It waits at most
        GATHER_MOST times as long as the group before took to commit and answer, so a request waits at
        most about two groups' time more, however steadily others arrive. (Their requests take about as
        long to come as that group took, at 16 connections, a little more or less: with a bound of once
        that time 3.5 % of the groups closed without the last of them, which then waited a whole group
        more, about 1 % of the requests: the p99.) Each gather's pace (``_gather``) sets when the next
        one first looks."""
        want, took, pace = 0, 0.0, 0.0
        while True:
            # the pace is the gather just before's: when none ran (a group of worker operations, or of one
            # request with nothing queued behind it) there is none, and an older one may no longer hold
            pace = self._gather(want, took * GATHER_MOST, pace) if want > 1 else 0.0
            with self._plock:
                group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
                if not group:
                    self._idle = True
                    return
                answered = sum([1 for op in group if op.rows is not None])
                self._requests -= answered
            start = time.monotonic()
            want = answered + self._run_group(group)
            took = time.monotonic() - start

    def _gather(self, n, most, pace):
        """Wait until ``n`` requests are queued, or until none came between two looks, and never longer
        than ``most`` seconds in all (steady arrivals from many senders never pause). Looks come
        GATHER_GAP apart, the first one later when ``pace`` (seconds a request, from the gather before)
        says the awaited requests take longer to come: after as many times ``pace`` as there are
        requests to wait for, times GATHER_SLACK. Every look that finds the gather unfinished is a wake-up
        of this thread, which takes the core and the GIL from the connection threads whose requests it
        waits for: at 16 connections the 16 take ~0.6 ms to come, and looks GATHER_GAP apart went off
        0.4-0.5 times a gather; with the first one at their pace, 0.01-0.04. Returns this gather's pace
        for the next: its time per request when it got all it waited for, at least GATHER_PACED of them
        at under GATHER_GAP/4 each (clients that send again at once, a steady cycle); otherwise 0, and
        the next first look stays at GATHER_GAP, so a sender that waits for no one is held no longer
        than before by a pace it did not set (open-loop arrivals at 3,000 requests/s set none, at 6,000/s
        2 % of the gathers). What it costs: when fewer requests come than awaited after a paced gather
        (a client that does not send again), the gather ends at GATHER_SLACK times the pace's time plus
        GATHER_GAP, instead of one GATHER_GAP after the last request (docs/performance.md)."""
        start = time.monotonic()
        deadline = start + most
        with self._plock:
            seen = self._requests
            if seen >= n:
                return 0.0
            self._want = n
        awaited = n - seen
        wait = max(GATHER_GAP, awaited * pace * GATHER_SLACK)
        while True:
            wait = min(wait, deadline - time.monotonic())
            if wait > 0 and self._full.acquire(timeout=wait):
                break
            with self._plock:
                if self._want and (self._requests == seen or time.monotonic() >= deadline):
                    self._want = 0  # nobody released it: it stays held
                    return 0.0
                seen, full = self._requests, not self._want
            if full:
                self._full.acquire()  # released after the timeout: take it back
                break
            wait = GATHER_GAP
        each = (time.monotonic() - start) / awaited
        return each if awaited >= GATHER_PACED and each < GATHER_GAP / 4 else 0.0

    def _run_group(self, group):
        """Commit ``group`` and settle every operation in it (the caller holds ``_committing``). Returns
        the requests queued for the writer meanwhile, before the group's answers went out."""
        self._wal_restart_wait()
        staged = self._stage(group)
        if staged is not None:
            preparing = self._prepare(group)
            self._commit(group, staged)
            preparing.clear()  # what the preparing thread has not begun, its answer makes itself
            self._copy_to_restart()
        queued = self._requests
        self._settle(group)
        if staged is not None:
            self._checkpoint_ahead()
        return queued

    def _prepare(self, group):
        """Have the group's answers prepared (``then.prepare(result)``: their bytes and log lines, nothing
        sent or logged) by a thread of its own while the COMMIT waits for the disk with the GIL released:
        at 16 connections the core has nothing else to do then, every client waiting for its answer, and
        what is left after the COMMIT is the sends. Only for PREPARE_AT answers or more (waking the
        thread costs about two answers' work). Returns the queue of what is left to prepare."""
        todo = deque([(op.then.prepare, op.result) for op in group
                      if op.rows is not None and op.error is None and getattr(op.then, "prepare", None) is not None])
        if len(todo) < PREPARE_AT or self._preparer is False:
            return todo
        if self._preparer is None:  # asked once, at the first group this size: then never prepared
            self._to_prepare = queue.SimpleQueue()
            self._preparer = self._helper(self._prepare_forever, "hookd-prepare", _idle_reversible,
                                          "answers are made after each commit: no thread to prepare them")
            if not self._preparer:
                return todo
        self._to_prepare.put(todo)
        return todo

    def _helper(self, target, name, allowed, without):
        """A daemon thread of the store running ``target``, started the first time it is wanted; False
        where ``allowed()`` says no, or where no thread can start now (TasksMax, RLIMIT_NPROC: ``without``
        is logged once), and the store does without it for good."""
        try:
            if not allowed():
                return False
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            return thread
        except RuntimeError as e:
            if self.log is not None:
                self.log.warning("%s (%s)", without, e)
            return False

    def _prepare_forever(self):
        """Prepare answers while the core would idle. The thread waits for work as SCHED_IDLE, so it runs
        only once the writer sleeps in the COMMIT's fdatasync (never ahead of the writer's own work, which
        would only delay the COMMIT), and prepares as a normal thread: it holds the GIL then, and a
        SCHED_IDLE thread holding it could be starved by any busy process on the core. Started only where
        a thread can leave SCHED_IDLE (``_idle_reversible``); should that stop (RLIMIT_NICE lowered while
        hookd runs), the thread ends and answers are made after the COMMIT again."""
        idle = set_policy(os.SCHED_IDLE)
        while True:
            todo = self._to_prepare.get()
            if todo is None:
                return  # the store is closed
            if idle and not set_policy(os.SCHED_OTHER):
                self._preparer = False  # what it was given is made after the COMMIT (``_run_group``)
                return
            while True:
                try:
                    prepare, result = todo.popleft()
                except IndexError:
                    break
                try:
                    prepare(result)
                except Exception:  # the answer is then made after the commit, as without preparing
                    self._log_exception()
            if idle:
                set_policy(os.SCHED_IDLE)

    def _checkpoint_ahead(self):
        """Have the checkpointing thread copy the WAL into the database when CHECKPOINT_AHEAD frames of
        it are not copied yet (read from the wal-index header, ``_wal_frames``), and it is not already
        at it. Started at the first such moment; where no thread can start, the automatic checkpoint
        does it all, as before."""
        if self._checkpointer is False or self._checkpointing or self._wal_frames()[1] < CHECKPOINT_AHEAD:
            return
        if self._checkpointer is None:
            self._to_checkpoint = queue.SimpleQueue()
            self._checkpointer = self._helper(self._checkpoint_forever, "hookd-checkpoint", lambda: True,
                                              "the WAL is copied inside the commits: no thread to copy it ahead")
            if not self._checkpointer:
                return
        self._checkpointing = True
        self._to_checkpoint.put(True)

    def _copy_to_restart(self):
        """Right after a COMMIT: once the WAL holds RESTART_FROM frames and fewer than RESTART_BEHIND of
        them are not copied, have the checkpointing thread copy them now, while the group's answers go
        out, and have the next group's BEGIN wait for it (``_wal_restart_wait``), so that it finds the WAL
        all copied and starts it over: no COMMIT crosses the automatic checkpoint's line. Once a WAL: when
        the WAL did not start over (a reader still reads frames of it), the automatic checkpoint copies
        the rest, as before."""
        if not self._checkpointer or self._checkpointing or self._restarted is not None:
            return
        frames, behind = self._wal_frames()
        if frames < RESTART_FROM or not 0 < behind < RESTART_BEHIND:
            return
        self._restarted = frames
        self._restarting = threading.Lock()
        self._restarting.acquire()
        self._checkpointing = True
        self._to_checkpoint.put(self._restarting)

    def _wal_restart_wait(self):
        """Before a group's BEGIN: wait for the copy ``_copy_to_restart`` asked for, if any (at most
        RESTART_WAIT seconds; the automatic checkpoint is the backstop), and forget the WAL it was asked
        for once the WAL has started over."""
        if self._restarting is not None:
            self._restarting.acquire(timeout=RESTART_WAIT)
            self._restarting = None
        elif self._restarted is not None and self._wal_frames()[0] < self._restarted:
            self._restarted = None

    def _wal_frames(self):
        """(mxFrame, mxFrame - nBackfill) of the wal-index header in the -shm file: the WAL's frames, and
        those not yet copied into the database (sqlite.org/walformat.html: mxFrame at byte 16, nBackfill at
        96, native byte order). A hint read without sqlite's locks; (0, 0) when there is no file to read."""
        if self._shm is None:
            self._shm = _SHM_FDS.get(self.path)
            if self._shm is None or not os.fstat(self._shm).st_nlink:  # none yet, or of a file sqlite deleted
                try:  # kept open while the process lives: closing any descriptor of the -shm would drop
                    #     all of this process's sqlite locks on it (POSIX record locks; howtocorrupt.html 2.2);
                    #     sqlite deletes the file when its last connection closes, and a store opened on
                    #     the path again reads the new one (the old descriptor is left open, as it was)
                    self._shm = _SHM_FDS[self.path] = os.open(self.path + "-shm", os.O_RDONLY)
                except OSError:
                    self._shm = None
                    return 0, 0
        head = os.pread(self._shm, 100, 0)
        if len(head) < 100:
            return 0, 0
        frames = int.from_bytes(head[16:20], sys.byteorder)
        return frames, frames - int.from_bytes(head[96:100], sys.byteorder)

    def _checkpoint_forever(self):
        """Copy the WAL into the database (a PASSIVE checkpoint: it never waits for the writer or the
        readers) on a connection of its own, each time ``_checkpoint_ahead`` asks, until the store
        closes."""
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            while True:
                done = self._to_checkpoint.get()  # True, or the lock the writer waits on (``_copy_to_restart``)
                if not done:
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:  # the automatic checkpoint copies what this one could not
                    pass
                finally:
                    self._checkpointing = False
                    if done is not True:
                        done.release()
        finally:
            conn.close()

    def _settle(self, group):
        with self.settling():  # the group's answers log one line each, written together
            for op in group:
                op.settle(self._log_exception)

    def _log_exception(self):
        if self.log is not None:
            self.log.exception("answering after a commit failed")

    def _stage(self, group):
        """Open the group's transaction and run its statements; sets each op's result or error. Returns
        {route: events now waiting} for ``_commit``, or None when there is nothing to commit (the
        transaction failed, or a function alone in it raised and was rolled back)."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            isolate = len(group) > 1  # alone in its transaction, a function needs no savepoint
            batch = []  # consecutive operations of one batched statement, run as one executemany
            for op in group:  # in submission order, except that requests' events go in last
                if op.stmt is not None:
                    if batch and batch[0].stmt is not op.stmt:
                        batch = _flush(conn, batch)
                    batch.append(op)
                elif op.fn is not None:
                    batch = _flush(conn, batch)
                    if not _run_fn(conn, op, isolate):
                        return None  # alone and failed: rolled back, nothing to commit
            _flush(conn, batch)
            requests = [op for op in group if op.rows is not None]
            return _store_requests(conn, requests) if requests else {}
        except Exception as e:  # never leave a caller waiting, never let the writer die
            self._fail_all(group, e)
            return None

    def _commit(self, group, fresh):
        """COMMIT a staged group, then count what now waits."""
        try:
            self._conn.execute("COMMIT")
        except Exception as e:
            return self._fail_all(group, e)
        self.groups += 1
        with self._count_lock:
            waiting, total = self._waiting, self._waiting_total
            for op in group:
                if op.error is None and op.delta:
                    for route, n in op.delta.items():
                        waiting[route] = waiting.get(route, 0) + n
                        total += n
            for route, n in fresh.items():
                waiting[route] = waiting.get(route, 0) + n
                total += n
            self._waiting_total = total

    def _fail_all(self, group, exc):
        """The transaction could not commit: nothing of the group is stored, every caller hears why."""
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        err = exc if isinstance(exc, StoreError) else StoreError("database write failed: %s" % exc)
        for op in group:
            op.error, op.result = err, None

    # -- reading ------------------------------------------------------------------------------------
    def read(self, fn):
        """Run ``fn(conn)`` on this thread's own read connection."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA cache_size=-%d" % READER_CACHE_KIB)
            self._local.conn = conn
        return fn(conn)

    def waiting(self, route=None):
        """Events queued, retrying or running: for ``route``, or in total."""
        if route is None:  # one int read whole: no lock, no sum (the request thread asks every request)
            return self._waiting_total
        with self._count_lock:
            return self._waiting.get(route, 0)

    def recount(self):
        """Re-read the waiting counts from the table (the CLI may have changed rows)."""
        self.write(self._recount)

    def _recount(self, conn):
        rows = conn.execute("SELECT route, count(*) FROM events WHERE status <> 'done' AND"
                            " status IN ('queued','retry','running') GROUP BY route").fetchall()
        with self._count_lock:
            self._waiting, self._waiting_total = dict(rows), sum([n for _, n in rows])

    def close(self):
        """No new writes; wait (up to 10 s) for the writer to finish what is queued, then close."""
        with self._plock:
            if self._closed:
                return
            self._closed = True
            gathering, self._want = self._want, 0
        if gathering:  # nothing more will come: the writer stops waiting
            self._full.release()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._plock:
                if self._idle and not self._pending:
                    break
            time.sleep(0.01)
        with self._committing, self._plock:  # the writer is asleep, no caller commits: nothing uses it
            if self._checkpointer:  # it ends, its connection closed, before the writer's (the last) closes
                self._to_checkpoint.put(False)
                self._checkpointer.join(10)
            self._conn.close()
            if self._preparer:
                self._to_prepare.put(None)  # the preparing thread ends

    # -- event operations ---------------------------------------------------------------------------
    def claim(self, event_id, now=None):
        """queued/retry -> running, attempts + 1, without waiting for the commit (a worker starts at
        once; the UPDATE reaches the database in order, ahead of the attempt's ``finish``). Returns the
        row as a dict (attempts already counted), or None when the event is not queued or retrying, is
        already claimed or being leased in this process, or another event with its serial key is running
        elsewhere (a remote worker holds it). A claim is exclusive, against local workers and leases
        alike, from the moment it is taken here until its ``finish`` has committed: the event (then its
        serial key) is marked before the database is read, and ``lease`` skips what is marked. A crash
        before the claim commits leaves the event queued, to run after the restart, as a crash during
        the job would."""
        now = time.time() if now is None else now
        with self._count_lock:
            if event_id in self._claimed or event_id in self._leasing:
                return None
            self._claimed[event_id] = None
        try:
            row = self.read(lambda conn: row_dict(conn, event_id, with_body=True))
            ok = row is not None and row["status"] in ("queued", "retry") and not self._closed
            key = row["serial_key"] if ok else None
            if key is not None:
                with self._count_lock:
                    ok = key not in self._leasing.values()
                    self._claimed[event_id] = key
                holders = self.read(lambda conn: conn.execute(
                    "SELECT id FROM events WHERE status <> 'done' AND status='running' AND serial_key=?",
                    (key,)).fetchall())
                with self._count_lock:  # running elsewhere: held by a remote worker's lease
                    ok = ok and all(h[0] in self._claimed for h in holders)
        except BaseException:
            self._unclaim(event_id)
            raise
        if not ok:
            self._unclaim(event_id)
            return None
        row["status"], row["attempts"] = "running", row["attempts"] + 1
        self._submit(_Op(stmt=CLAIM, args=(now, event_id), then=_nothing))
        return row

    def finish(self, event_id, route, status, error=None, note=None, next_at=0.0, now=None, then=None):
        """End an attempt: 'done', 'dead' or 'retry' (with ``next_at``). Waits for the commit, or, with
        ``then``, returns at once and calls ``then(error)`` on the writer thread once the outcome is
        stored (error None) or could not be (StoreError). Either way the claim ends with the commit."""
        now = time.time() if now is None else now
        delta = {route: -1} if status in ("done", "dead") else None

        def stored(result, err):
            self._unclaim(event_id)
            then(err)
        args = (status, error, note, next_at, now, event_id)
        if status == "dead" and self.on_dead is not None:  # rare: its own statement, so its alert joins it
            op = _Op(fn=lambda conn: self._finish_dead(conn, args), delta=delta,
                     then=stored if then is not None else None)
        else:
            op = _Op(stmt=FINISH, args=args, delta=delta, then=stored if then is not None else None)
        self._submit(op)
        if then is None:
            try:
                op.wait()
            finally:
                self._unclaim(event_id)

    def _finish_dead(self, conn, args):
        if conn.execute(FINISH, args).rowcount == 1:
            self._went_dead(conn, args[-1], args[1])

    def _went_dead(self, conn, event_id, error):
        if self.on_dead is not None:
            self.on_dead(conn, event_id, error)

    def _unclaim(self, event_id):
        with self._count_lock:
            self._claimed.pop(event_id, None)

    def requeue(self, event_ids):
        """Attempts whose outcome could not be stored (the disk was full) go back to the queue."""
        return self.write(lambda conn: conn.executemany(
            "UPDATE events SET status='queued', next_at=0 WHERE id=? AND status='running'",
            [(i,) for i in event_ids]).rowcount)

    def save_progress(self, event_id, progress):
        self.write(lambda conn: conn.execute("UPDATE events SET progress=? WHERE id=?",
                                             (json.dumps(progress), event_id)))

    def requeue_running(self):
        """After a crash: events left 'running' by local workers go back to the queue; those a remote
        worker holds a lease on stay running until it reports or the lease expires. Returns how many."""
        return self.write(lambda conn: conn.execute(
            "UPDATE events SET status='queued', next_at=0 WHERE status <> 'done' AND status='running' AND"
            " id NOT IN"
            " (SELECT event_id FROM leases WHERE ended IS NULL)").rowcount)

    def due(self, now, limit=1000):
        """(id, route, serial_key) of events whose time has come."""
        return self.read(lambda conn: conn.execute(
            "SELECT id, route, serial_key FROM events WHERE status <> 'done' AND status IN ('queued','retry')"
            " AND next_at <= ?"
            " ORDER BY next_at, id LIMIT ?", (now, limit)).fetchall())

    def next_due(self):
        row = self.read(lambda conn: conn.execute(
            "SELECT min(next_at) FROM events WHERE status <> 'done' AND status IN ('queued','retry')"
        ).fetchone())
        return row[0]

    def retry(self, event_id=None, all_dead=False, now=None):
        """Put a dead (or retrying) event back in the queue now; returns the ids moved."""
        now = time.time() if now is None else now

        def fn(conn):
            if all_dead:
                ids = [r[0] for r in conn.execute(
                    "SELECT id FROM events WHERE status <> 'done' AND status='dead'")]
            else:
                ids = [r[0] for r in conn.execute(
                    "SELECT id FROM events WHERE id=? AND status IN ('dead','retry')", (event_id,))]
            for i in ids:
                conn.execute("UPDATE events SET status='queued', attempts=0, next_at=0, updated_at=?,"
                             " note='retried by hand' WHERE id=?", (now, i))
            return ids
        return self.write(fn)

    def replay(self, event_id, now=None):
        """Store a copy of an event as a new queued event (no dedupe); returns the new id or None. A body
        in request_bodies is shared (its ``body_id``); one kept in an event row is copied into the new
        row, which then holds its own: no row far from a request's names its body row (``prune``)."""
        now = time.time() if now is None else now

        def fn(conn):
            row = conn.execute("SELECT e.route, e.serial_key, " + _SHARED["headers"] + ", " +  # constant text
                               _SHARED["content_type"] + ", e.body_id, CASE WHEN e.body_id IS NULL THEN"
                               " coalesce(e.body, h.body) END, e.element, e.payload FROM events e" + _BODY_JOINS +
                               " WHERE e.id=?", (event_id,)).fetchone()
            if row is None:
                return None
            cur = conn.execute(
                "INSERT INTO events(route, status, received_at, updated_at, serial_key, headers, content_type,"
                " body_id, body, element, payload, note) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row[:1] + (now, now) + row[1:] + ("replay of %d" % event_id,))
            return cur.lastrowid
        return self.write(fn)

    def add_product(self, event_id, kind, path=None, data=None, now=None):
        """Remember what a job produced: a file it wrote (``path``, absolute) or what it sent (``data``,
        JSON-able). The console shows these and serves files only through them. A job run again
        replaces its own earlier record of the same kind and file."""
        now = time.time() if now is None else now
        text = None if data is None else json.dumps(data)

        def fn(conn):
            conn.execute("DELETE FROM products WHERE event_id=? AND kind=? AND path IS ?",
                         (event_id, kind, path))
            conn.execute("INSERT INTO products(event_id, kind, path, data, created_at) VALUES (?, ?, ?, ?, ?)",
                         (event_id, kind, path, text, now))
        self.write(fn)

    def prune(self, days, now=None, stopping=None):
        """Delete done and duplicate events last changed more than ``days`` ago, then the bodies, ended
        leases and products no event needs any more; returns the count of events deleted. With
        ``stopping`` (a threading.Event), it stops after the write it is on once that is set (the daemon
        shutting down) and raises PruneStopped, which says how far it got; what is left waits for the
        next prune.

        Nothing prune runs on the writer scans a table, and no write of it holds the writer long: the
        writer's transaction is the one every webhook's answer waits for. A read connection finds what to
        delete, the writer deletes just those ids, a bounded number a write. No index holds done rows
        (``events_due`` leaves them out, and one more index would cost every request), so the events are
        found by id: a row is changed no earlier than it was received, and ids are handed out in the
        order rows are received, so every row last changed before the cutoff has an id at or below the
        last one received before it (``_received_before``, a binary search on the primary key, with
        ``CLOCK_SLACK`` for requests stored a little out of order). The read lists the rows under that
        bound that are done or duplicate and last changed before the cutoff (``_old_events``, IDS_PER_READ
        at a time, a range of the primary key), and the writer deletes them by id, EVENTS_PER_DELETE a
        write, each under the same condition again, so a row retried since the read stays (review R8:
        500,000 rows in one DELETE held the writer 0.44 s, and the WAL grew by all of them). The bound
        can only leave a row for a later prune, never delete one more: a row stored while the clock was
        set back by more than the slack waits until the cutoff passes its neighbours. The leases and
        products of the deleted events go in the same transaction as their events, and the newest event
        always stays (``_received_before``), so no id is handed out twice. A row that holds its request's
        body for the request's other rows stays as long as one of them does (``_delete_events``): the
        rows are deleted newest first, and a row whose request goes on past the ids one read found waits
        until after the last read, so a request whose rows are all old goes whole. Which bodies
        in request_bodies no event needs, no index tells either
        (events.body_id has none, for the same reason): the read connection finds them
        (``_orphan_bodies``) and the writer deletes just those ids, BODIES_PER_DELETE (and about
        BODY_BYTES_PER_DELETE) a write. Review R2 measured the old sweep on the writer at ~1.3 s a day
        per million stored rows, no webhook answered meanwhile."""
        cutoff = (time.time() if now is None else now) - days * 86400.0
        stage, events, bodies = "old events", 0, 0

        def write(fn):
            """``self.write(fn)``; PruneStopped instead once ``stopping`` is set."""
            if stopping is not None and stopping.is_set():
                raise PruneStopped("while deleting %s, after %d events and %d bodies" % (stage, events, bodies))
            return self.write(fn)
        last = self.read(lambda conn: _received_before(conn, cutoff + CLOCK_SLACK))
        write(lambda conn: conn.execute("DELETE FROM lease_workers WHERE last_seen < ?", (cutoff,)))
        after, later = 0, []
        while True:
            old = self.read(lambda conn: _old_events(conn, after, last, cutoff, IDS_PER_READ))
            more = len(old) == IDS_PER_READ
            end = old[-1][0] if old else 0
            ready = [(event_id,) for event_id, bound in old if not more or bound is None or bound <= end]
            later += [(event_id,) for event_id, bound in old if more and bound is not None and bound > end]
            for part in (ready,) if more else (ready, later):
                for i in reversed(range(0, len(part), EVENTS_PER_DELETE)):  # newest first: see _delete_events
                    events += write(lambda conn, ids=part[i:i + EVENTS_PER_DELETE]: _delete_events(conn, ids, cutoff))
            if not more:
                break
            after = end
        stage, after = "the bodies no event needs", 0
        while True:
            orphans = self.read(lambda conn: _orphan_bodies(conn, after, IDS_PER_READ))
            chunk, size = [], 0
            for i, (body_id, length) in enumerate(orphans, 1):
                chunk.append((body_id,))
                size += length
                if len(chunk) >= BODIES_PER_DELETE or size >= BODY_BYTES_PER_DELETE or i == len(orphans):
                    write(lambda conn: conn.executemany("DELETE FROM request_bodies WHERE id=?", chunk))
                    bodies += len(chunk)
                    chunk, size = [], 0
            if len(orphans) < IDS_PER_READ:
                return events
            after = orphans[-1][0]

    # -- leases (remote workers, docs/scaling.md) -----------------------------------------------------------
    def lease(self, routes, max_jobs, seconds, worker, address=None, now=None):
        """Lease up to ``max_jobs`` due events of ``routes`` to ``worker`` for ``seconds``: each becomes
        running (attempts + 1) with a new lease row, in one transaction. An event whose serial key is
        running anywhere (a local worker, another lease) is skipped, and so is a second event with the
        same key in one answer. Events claimed by a local worker (whose claim may not be committed yet)
        and their serial keys count as running. Returns [(lease dict, event row dict with body)], oldest
        due first."""
        now = time.time() if now is None else now
        picked = []

        def fn(conn):
            _seen(conn, worker, address, routes, now)
            due = []
            for route in routes:
                due += conn.execute(
                    "SELECT next_at, id, serial_key FROM events WHERE status <> 'done' AND"
                    " status IN ('queued','retry') AND next_at <= ? AND route=? ORDER BY next_at, id LIMIT ?",
                    (now, route, max_jobs * 8 + 32)).fetchall()
            busy = {r[0] for r in conn.execute(
                "SELECT serial_key FROM events WHERE status <> 'done' AND status='running'"
                " AND serial_key IS NOT NULL")}
            out = []
            for _, event_id, key in sorted(due):
                if len(out) >= max_jobs:
                    break
                if key is not None and key in busy:
                    continue
                with self._count_lock:  # a local claim of it (or of its key) wins; else none can start now
                    if event_id in self._claimed or (key is not None and key in self._claimed.values()):
                        continue
                    self._leasing[event_id] = key
                picked.append(event_id)
                conn.execute("UPDATE events SET status='running', attempts=attempts+1, updated_at=? WHERE id=?",
                             (now, event_id))
                row = row_dict(conn, event_id, with_body=True)
                lease = {"lease_id": secrets.token_hex(16), "event_id": event_id, "route": row["route"],
                         "worker": worker, "attempt": row["attempts"], "leased_at": now,
                         "lease_until": now + seconds, "ended": None}
                conn.execute("INSERT INTO leases(lease_id, event_id, route, worker, attempt, leased_at,"
                             " lease_until) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             tuple(lease[c] for c in LEASE_COLUMNS[:7]))
                if key is not None:
                    busy.add(key)
                out.append((lease, row))
            return out
        try:
            return self.write(fn)
        finally:  # committed (now running in the database) or rolled back: no longer being leased
            with self._count_lock:
                for event_id in picked:
                    self._leasing.pop(event_id, None)

    def extend_lease(self, lease_id, seconds, progress=None, now=None):
        """Push a held lease's end to now + ``seconds`` (and save ``progress`` if given). Returns
        (outcome, lease dict or None): outcome "ok", or "unknown", "ended" or "expired" (a 409)."""
        now = time.time() if now is None else now

        def fn(conn):
            lease = _lease(conn, lease_id)
            why = _stale(lease, now)
            if why:
                return why, lease
            conn.execute("UPDATE leases SET lease_until=? WHERE lease_id=?", (now + seconds, lease_id))
            if progress is not None:
                conn.execute("UPDATE events SET progress=? WHERE id=?", (json.dumps(progress), lease["event_id"]))
            _seen(conn, lease["worker"], None, None, now)
            lease["lease_until"] = now + seconds
            return "ok", lease
        return self.write(fn)

    def end_lease(self, lease_id, verb, decide, progress=None, now=None):
        """End a held lease with ``verb`` (done, retry, dead). ``decide(lease)`` runs inside the
        transaction and gives (status, error, note, next_at) for the event (a retry past
        retry.max_attempts becomes dead there). The same verb again is "again" (nothing changes);
        another verb on an ended lease, or any verb on an unknown or overdue one, changes nothing and
        gives "unknown", "ended" or "expired". Returns (outcome, lease dict or None)."""
        now = time.time() if now is None else now
        delta = {}

        def fn(conn):
            lease = _lease(conn, lease_id)
            if lease is not None and lease["ended"] == verb:
                return "again", lease
            why = _stale(lease, now)
            if why:
                return why, lease
            status, error, note, next_at = decide(lease)
            conn.execute("UPDATE leases SET ended=?, ended_at=? WHERE lease_id=?", (verb, now, lease_id))
            cur = conn.execute(
                "UPDATE events SET status=?, last_error=?, note=coalesce(?, note), next_at=?,"
                " updated_at=?, progress=coalesce(?, progress) WHERE id=? AND status='running'",
                (status, error, note, next_at, now, None if progress is None else json.dumps(progress),
                 lease["event_id"]))
            if status == "dead" and cur.rowcount == 1:
                self._went_dead(conn, lease["event_id"], error)
            _seen(conn, lease["worker"], None, None, now)
            if status in ("done", "dead"):
                delta[lease["route"]] = delta.get(lease["route"], 0) - 1
            lease.update(ended=verb, status=status)
            return "ok", lease
        return self.write(fn, delta=delta)

    def expire_leases(self, max_attempts, now=None):
        """Every held lease past its end ends as 'expired': its event goes back to the queue at once
        (the attempt it used stays counted), or dead when that was its last attempt. Returns the
        expired leases (dicts with ``status``, the event's new status)."""
        now = time.time() if now is None else now
        delta = {}

        def fn(conn):
            ids = [r[0] for r in conn.execute(
                "SELECT lease_id FROM leases WHERE ended IS NULL AND lease_until < ?", (now,))]
            out = []
            for lease_id in ids:
                lease = _lease(conn, lease_id)
                lease["status"] = _expire(conn, lease, now, max_attempts, delta, self._went_dead)
                out.append(lease)
            return out
        return self.write(fn, delta=delta)


LEASE_COLUMNS = ("lease_id", "event_id", "route", "worker", "attempt", "leased_at", "lease_until", "ended",
                 "ended_at")
_LEASE_SQL = "SELECT " + ", ".join(LEASE_COLUMNS) + " FROM leases WHERE lease_id=?"  # constant text only


def _lease(conn, lease_id):
    row = conn.execute(_LEASE_SQL, (lease_id,)).fetchone()
    return dict(zip(LEASE_COLUMNS, row)) if row is not None else None


def _stale(lease, now):
    """Why ``lease`` cannot be acted on ("unknown", "ended", "expired"), or None while it is held. A held
    lease past its end is "expired" already; the sweep (``expire_leases``) moves its event."""
    if lease is None:
        return "unknown"
    if lease["ended"] is not None:
        return "expired" if lease["ended"] == "expired" else "ended"
    if lease["lease_until"] < now:
        return "expired"
    return None


def _expire(conn, lease, now, max_attempts, delta, went_dead):
    """End one overdue lease; its event goes back to the queue (or dead after its last attempt)."""
    error = "lease %s… expired (worker %s)" % (lease["lease_id"][:8], lease["worker"])
    last = max_attempts is not None and lease["attempt"] >= max_attempts
    status = "dead" if last else "retry"
    conn.execute("UPDATE leases SET ended='expired', ended_at=? WHERE lease_id=?", (now, lease["lease_id"]))
    error += " after %d attempts" % lease["attempt"] if last else ""
    cur = conn.execute("UPDATE events SET status=?, last_error=?, next_at=?, updated_at=? WHERE id=?"
                       " AND status='running'", (status, error, now, now, lease["event_id"]))
    if last and cur.rowcount:
        delta[lease["route"]] = delta.get(lease["route"], 0) - 1
        went_dead(conn, lease["event_id"], error)
    lease["ended"] = "expired"
    return status


def _seen(conn, worker, address, routes, now):
    """Remember when ``worker`` was last heard from (and from where, asking for which routes)."""
    conn.execute("INSERT INTO lease_workers(worker, last_seen, address, routes) VALUES (?, ?, ?, ?)"
                 " ON CONFLICT(worker) DO UPDATE SET last_seen=excluded.last_seen,"
                 " address=coalesce(excluded.address, address), routes=coalesce(excluded.routes, routes)",
                 (worker, now, address, None if routes is None else ",".join(routes)))


def list_workers(conn):
    """Remote workers heard from, most recent first: dicts of worker, last_seen, address, routes, leases
    (how many it holds now). For the console and metrics."""
    rows = conn.execute(
        "SELECT w.worker, w.last_seen, w.address, w.routes, (SELECT count(*) FROM leases l WHERE"
        " l.worker=w.worker AND l.ended IS NULL) FROM lease_workers w ORDER BY w.last_seen DESC").fetchall()
    return [dict(zip(("worker", "last_seen", "address", "routes", "leases"), r)) for r in rows]


def held_leases(conn):
    """{route: leases held now}."""
    return dict(conn.execute("SELECT route, count(*) FROM leases WHERE ended IS NULL GROUP BY route").fetchall())


def _received_before(conn, moment):
    """The largest event id received before ``moment`` (0 if none), by a binary search on the primary key
    (about 25 look-ups for 30 million rows): ids grow with received_at (``prune``). The newest event is
    never below it: the writer hands out ids one past the largest stored, and that event's id may have
    been named downstream (X-Hookd-Event-Id, log lines, Teams cards), so after a quiet spell longer than
    the retention the next request must not get it again."""
    low, newest = conn.execute("SELECT (SELECT min(id) FROM events), (SELECT max(id) FROM events)").fetchone()
    if low is None:
        return 0
    found, high = 0, newest - 1
    while low <= high:
        probe = (low + high) // 2
        at, received_at = conn.execute("SELECT id, received_at FROM events WHERE id >= ? ORDER BY id LIMIT 1",
                                       (probe,)).fetchone()
        if received_at < moment:
            found, low = at, at + 1
        else:
            high = probe - 1
    return min(found, newest - 1)


def _old_events(conn, after, last, cutoff, limit):
    """Up to ``limit`` events ([(id, body_row)], in id order) above ``after`` and at most ``last`` that are
    done or duplicate and last changed before ``cutoff``: on a read connection (``prune``), a range of the
    primary key. ``body_row`` past the last id read is a row holding its request's body for rows a later
    read finds: ``prune`` deletes it after those."""
    return conn.execute("SELECT id, body_row FROM events WHERE id > ? AND id <= ? AND status IN ('done','duplicate')"
                        " AND updated_at < ? ORDER BY id LIMIT ?", (after, last, cutoff, limit)).fetchall()


def _delete_events(conn, ids, cutoff):
    """Delete the events ``ids`` ([(id,)], in id order) that are still done or duplicate and last changed
    before ``cutoff``, with the ended leases and the products of those deleted, through the primary key
    and the event_id indexes (``prune``, on the writer); returns how many events went. A row holding its
    request's body stays while a row of its request that names it in ``body_row`` is left: those follow
    it, up to the id its own ``body_row`` gives, so that check is a range of the primary key. The ids go
    newest first, so such rows are gone before the one holding their body is looked at."""
    n = conn.executemany("DELETE FROM events WHERE id=? AND status IN ('done','duplicate') AND updated_at < ?"
                         " AND NOT EXISTS (SELECT 1 FROM events r WHERE r.id > events.id"
                         " AND r.id <= events.body_row AND r.body_row = events.id)",
                         [(event_id, cutoff) for event_id, in reversed(ids)]).rowcount
    conn.executemany("DELETE FROM leases WHERE event_id=? AND ended IS NOT NULL"
                     " AND event_id NOT IN (SELECT id FROM events)", ids)
    conn.executemany("DELETE FROM products WHERE event_id=? AND event_id NOT IN (SELECT id FROM events)", ids)
    return n


def _orphan_bodies(conn, after, limit):
    """Up to ``limit`` (id, length) of bodies no event needs, ids above ``after``, in id order: on a read
    connection (``prune``), where the scan of request_bodies and events holds up no webhook. One
    statement, so one snapshot, and only ids below the snapshot's largest: a body no event needs can
    never be needed again (a request's events come with their own new body, a replay copies the body_id
    of an event that has it), and the largest id is left because the next body is handed out one past
    the largest (it would get a deleted largest id again, before the writer deleted that id). So the
    newest body waits for the next prune once a newer one is stored."""
    return conn.execute(
        "SELECT id, length(data) FROM request_bodies WHERE id > ? AND id < (SELECT max(id) FROM request_bodies)"
        " AND id NOT IN (SELECT body_id FROM events WHERE body_id IS NOT NULL) ORDER BY id LIMIT ?",
        (after, limit)).fetchall()


def _store_requests(conn, ops):
    """Store the events of every request in ``ops`` with a few statements per table; sets each op's result
    ([(id, "new" | "duplicate")]) or error (Busy). Returns {route: events now waiting}. Ids are handed
    out here (one past the largest), so the rows go in with their ids known, a multi-row INSERT per
    table (``_insert_rows``). Every row goes in as new with ``INSERT OR IGNORE``: the unique dedupe index,
    which sqlite checks on every insert anyway, turns away a known key, so no look-up precedes the insert;
    only when fewer rows went in than were sent (a redelivery, rare) does ``_mark_duplicates`` find and
    store the duplicates (measured: 4-event deliveries, 32 a group: 31 -> 23 µs a delivery in this
    function).

    A request's body goes into its first row (``body``), whose ``body_row`` is the request's last id;
    its other rows hold no copy, only that first row's id in ``body_row`` (a Preservica delivery's 4
    rows share one body). One table less a commit than a row in request_bodies: a B-tree page less to
    the WAL, a statement less. A body over ROW_BODY_BYTES still goes to request_bodies (``body_id``).
    The rows that name the first row keep no headers or content type either (readers take that row's,
    ``_SHARED``), and a row stored done keeps no note (readers show NOTHING_TO_DO, ``_with_note``):
    ~500 bytes less a Preservica delivery, so the file grows by fewer pages a commit (each a new leaf,
    its parent and page 1 to the WAL)."""
    next_id = first_id = (conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0) + 1
    added = _store_alike(conn, ops, first_id)
    if added is not None:
        return added
    first_body = next_body = None  # request_bodies' next id, read only for a body over ROW_BODY_BYTES
    events, bodies, added = [], [], {}
    for op in ops:
        route, rows, now = op.route, op.rows, op.now
        if op.limit is not None:
            queued = conn.execute("SELECT count(*) FROM events WHERE route=? AND status <> 'done' AND"
                                  " status IN ('queued','retry','running')", (route,)).fetchone()[0]
            waiting = queued + added.get(route, 0)
            if waiting + len(rows) > op.limit and added.get(route):
                waiting = queued + _waiting_so_far(conn, route, ops)  # exact, only when about to refuse
            if waiting + len(rows) > op.limit:
                op.error = Busy("%s has %d events waiting (queue_size %d)" % (route, waiting, op.limit))
                continue
        out, shared, last = [], {}, next_id + len(rows) - 1
        for row in rows:
            body, headers, content_type = row.get("body") or b"", row.get("headers"), row.get("content_type")
            # (body, body_row, body_id, headers, content_type) of an earlier row with this body and these
            # headers (App.event_rows gives every row of a request the same objects)
            where = shared.get((id(body), id(headers), id(content_type)))
            if where is None:
                if len(body) <= ROW_BODY_BYTES:
                    where = (body, NULL if last == next_id else last, NULL,
                             NULL if headers is None else headers, NULL if content_type is None else content_type)
                    shared[(id(body), id(headers), id(content_type))] = (NULL, next_id, NULL, NULL, NULL)
                else:
                    if next_body is None:
                        first_body = next_body = (conn.execute("SELECT max(id) FROM request_bodies")
                                                  .fetchone()[0] or 0) + 1
                    where = shared[(id(body), id(headers), id(content_type))] = (
                        NULL, NULL, next_body, NULL if headers is None else headers,
                        NULL if content_type is None else content_type)
                    bodies.append((next_body, body))
                    next_body += 1
            done = bool(row.get("done"))  # nothing to do for it: stored as done, no worker touches it
            key, serial, element, payload = (row.get("dedupe_key"), row.get("serial_key"), row.get("element"),
                                             row.get("payload"))
            events.append((next_id, route, "done" if done else "queued", now, now,
                           NULL if key is None else key, NULL if serial is None else serial, where[3], where[4],
                           where[0], where[1], where[2], NULL if element is None else element,
                           NULL if payload is None else payload))
            if not done:
                added[route] = added.get(route, 0) + 1
            out.append((next_id, "new"))
            next_id += 1
        op.result = out
    if bodies:
        _insert_rows(conn, _INSERT_BODIES, bodies)
    if events:
        before = conn.total_changes
        _insert_rows(conn, _INSERT_NEW, events)
        if conn.total_changes - before < len(events):
            _mark_duplicates(conn, ops, events, first_id, first_body, added)
    return added


def _store_alike(conn, ops, first_id):
    """``_store_requests`` for a group whose requests all have the same shape (``_alike_statement``), as
    a client that sends one request at a time makes (a group of one, on the request's own thread) and
    one kind of delivery from many clients does: each request's rows share one body of up to
    ROW_BODY_BYTES, its headers and content type (``App.event_rows`` gives every row the same objects),
    and no request has a ``limit``. The rows are what the general path stores, in one statement per
    SHAPED_ROWS rows or fewer whose text is kept per shape and number of requests, so that only the
    values a row has are bound and each request's id, route, time, body, headers and content type once
    (a 4-event Preservica delivery binds 15 values instead of 56). Returns {route: events now waiting},
    or None when the general path must store the group: requests of other shapes, or a key that was
    already stored (a redelivery; the rows just inserted are taken out again first, and the general
    path sorts out the duplicates as before)."""
    chunks, params, count, shape, added, next_id, start = [], [], 0, None, {}, first_id, first_id
    for op in ops:
        rows, route = op.rows, op.route
        if op.limit is not None or not rows or len(rows) > SHAPED_ROWS:
            return None
        if next_id + len(rows) - start > SHAPED_ROWS:  # this statement is full: the next one begins here
            chunks.append((count, params))
            params, count, start = [], 0, next_id
        try:
            fields = list(map(_ROW_FIELDS, rows))
        except KeyError:  # a row without some of App.event_rows' keys: those it lacks are None
            fields = [tuple(map(row.get, _ROW_NAMES)) for row in rows]
        body, headers, content_type = fields[0][:3]
        data = body or b""
        if len(data) > ROW_BODY_BYTES:
            return None
        params += (next_id, route, op.now, data)
        if headers is not None:
            params.append(headers)
        if content_type is not None:
            params.append(content_type)
        request, waiting = [headers is None, content_type is None], 0
        for row_body, row_headers, row_type, done, key, serial, element, payload in fields:
            if row_body is not body or row_headers is not headers or row_type is not content_type:
                return None
            done = bool(done)
            request.append((done, key is None, serial is None, element is None, payload is None))
            if key is not None:
                params.append(key)
            if serial is not None:
                params.append(serial)
            if element is not None:
                params.append(element)
            if payload is not None:
                params.append(payload)
            waiting += not done
        if shape is None:
            shape = tuple(request)
        elif shape != tuple(request):
            return None
        op.result = [(event_id, "new") for event_id in range(next_id, next_id + len(rows))]
        if waiting:
            added[route] = added.get(route, 0) + waiting
        next_id += len(rows)
        count += 1
    chunks.append((count, params))
    statements = []
    for count, params in chunks:
        each, at = len(params) // count, 0  # one shape: every request binds as many values
        for size in CHUNKS:
            while count >= size:
                statement = _SHAPED.get((shape, size))
                if statement is None:
                    if len(_SHAPED) >= SHAPES:
                        return None
                    statement = _SHAPED[(shape, size)] = _alike_statement(shape, size)
                statements.append((statement, params[at:at + size * each]))
                at += size * each
                count -= size
    before = conn.total_changes
    for statement, params in statements:
        conn.execute(statement, params)
    if conn.total_changes - before < next_id - first_id:
        conn.execute("DELETE FROM events WHERE id >= ?", (first_id,))
        return None
    return added


def _alike_statement(shape, count):
    """``_store_alike``'s statement for ``count`` requests of ``shape`` ([no headers, no content type,
    then per row (done, no key, no serial key, no element, no payload)]). Each request's numbered
    parameters, from its first (?b): ?b its first id, ?b+1 route, ?b+2 time, ?b+3 body, then headers and
    content type when there are any, then each row's key, serial key, element and payload where it has
    one; NULL where it has none. A request's first row holds the body, headers, content type and the
    request's last id (``body_row``); its other rows name the first. The text holds placeholders, NULL,
    the two status words and row offsets only, never a value."""
    no_headers, no_type, rows = shape[0], shape[1], shape[2:]
    values, number = [], 0
    for _ in range(count):
        base = number + 1
        number += 4
        shared = []
        for none in (no_headers, no_type):
            number += not none
            shared.append("NULL" if none else "?%d" % number)
        for i, (done, *missing) in enumerate(rows):
            own = []
            for none in missing:
                number += not none
                own.append("NULL" if none else "?%d" % number)
            if i == 0:
                first = ("?%d" % base, shared[0], shared[1], "?%d" % (base + 3),
                         "NULL" if len(rows) == 1 else "?%d+%d" % (base, len(rows) - 1))
            else:
                first = ("?%d+%d" % (base, i), "NULL", "NULL", "NULL", "?%d" % base)
            values.append("(%s, ?%d, '%s', ?%d, ?%d, %s, %s, %s, %s, %s, %s, NULL, %s, %s)" % (
                first[0], base + 1, "done" if done else "queued", base + 2, base + 2, own[0], own[1], first[1],
                first[2], first[3], first[4], own[2], own[3]))
    return _INSERT_NEW[1].split(" VALUES ")[0] + " VALUES " + ", ".join(values)


def _insert_rows(conn, statements, rows):
    """Insert ``rows`` (tuples) with ``statements[n]``, the statement that inserts n rows, for n in
    CHUNKS: a statement per binary digit of len(rows) (below 64), where an ``executemany`` steps once
    a row. Fewer sqlite calls cost less CPU (writer µs per request, 32 requests a group: Standard
    Webhooks 16.4 -> 14.7, Preservica 33.0 -> 28.4) and let go of the GIL less often, each time a
    chance for a request thread to run first. The fixed sizes keep each text in sqlite3's statement
    cache."""
    i = 0
    for n in CHUNKS:
        while len(rows) - i >= n:
            conn.execute(statements[n], list(chain.from_iterable(rows[i:i + n])))
            i += n


def _waiting_so_far(conn, route, ops):
    """How many of the group's rows for ``route`` so far (``ops`` whose rows are placed) will wait once
    stored: not the duplicates that ``INSERT OR IGNORE`` will turn away (a key already stored, or taken
    by an earlier row of the group), nor the elements of a redelivered batch that ``_redelivered`` will
    find. Only asked before refusing a request for its route's queue_size, so the fast path never
    looks up."""
    ops = [op for op in ops if op.result is not None and op.route == route]
    taken = set(_stored_keys(conn, route, {row.get("dedupe_key") for op in ops for row in op.rows}))
    firsts = {}  # a batch delivery's key -> the group's op stored under it
    waiting = 0
    for op in ops:
        head = op.rows[0]
        batch, key = head.get("batch"), head.get("dedupe_key")
        pairs = [(row, row.get("dedupe_key")) for row in op.rows]
        if batch and (key in taken or key in firsts):
            keys, stored = _stored_elements(conn, route, key, head.get("body"), len(op.rows))
            taken.update(stored)
            if key in firsts:
                taken.update(_element_keys(key, firsts[key].rows[0].get("body"), len(firsts[key].rows)))
            pairs = list(zip(op.rows, keys))
        elif batch:
            firsts[key] = op
        for row, key in pairs:
            if key is None or key not in taken:
                taken.add(key)
                waiting += not row.get("done")
    return waiting


def _mark_duplicates(conn, ops, events, first_id, first_body, added):
    """The rows ``INSERT OR IGNORE`` turned away had a known (route, dedupe_key): store each as a
    'duplicate' row under its id, pointing at the original, tell its request so, move a body whose row
    became a duplicate to the request's first new row (``_rehome_bodies``) and drop the bodies in
    request_bodies (from ``first_body`` on, None when the group added none) that no stored row needs: a
    request that brought nothing new keeps no body. A batch delivery whose key was turned away is
    sorted element by element (``_redelivered``). ``events`` are the group's rows as ``_INSERT_NEW``
    takes them, the first with id ``first_id``."""
    stored = {r[0] for r in conn.execute("SELECT id FROM events WHERE id >= ?", (first_id,))}
    turned = [(op, i, row) for op in ops if op.error is None
              for i, ((event_id, _), row) in enumerate(zip(op.result, op.rows)) if event_id not in stored]
    batches = [op for op, _, row in turned if row.get("batch")]
    turned = [t for t in turned if not t[2].get("batch")]
    wanted = {}
    for op, _, row in turned:
        wanted.setdefault(op.route, set()).add(row.get("dedupe_key"))
    known = {(route, key): event_id for route, keys in wanted.items()
             for key, event_id in _stored_keys(conn, route, keys).items()}
    duplicates = []
    for op, i, row in turned:
        event_id, original = op.result[i][0], known.get((op.route, row.get("dedupe_key")))
        if original is None:
            raise sqlite3.IntegrityError("event %d was not stored" % event_id)
        duplicates.append(_duplicate(op, row, event_id, original))
        op.result[i] = (original, "duplicate")
        if not row.get("done"):
            added[op.route] -= 1
    conn.executemany(_INSERT_DUPLICATE, duplicates)
    for op in batches:
        _redelivered(conn, op, events, first_id, added)
    _rehome_bodies(conn, events, first_id)
    if first_body is not None:
        conn.execute("DELETE FROM request_bodies WHERE id >= ? AND id NOT IN"
                     " (SELECT body_id FROM events WHERE id >= ? AND body_id IS NOT NULL)", (first_body, first_id))


def _rehome_bodies(conn, events, first_id):
    """A row of the group that names a body row holding none (it became a duplicate row, which keeps no
    body): the first such row of the request takes the body and the old holder's bound, and the rows
    after it that named the old holder name it instead. ``events`` as in ``_mark_duplicates``."""
    lost = conn.execute("SELECT e.body_row, min(e.id) FROM events e JOIN events h ON h.id = e.body_row"
                        " WHERE e.id >= ? AND e.body IS NULL AND h.body IS NULL GROUP BY e.body_row",
                        (first_id,)).fetchall()
    for old, new in lost:
        placed = events[old - first_id]
        conn.execute("UPDATE events SET body=?, body_row=?, headers=?, content_type=? WHERE id=?",
                     (placed[BODY], placed[BODY_ROW], placed[HEADERS], placed[HEADERS + 1], new))
        conn.execute("UPDATE events SET body_row=? WHERE id > ? AND id <= ? AND body_row=?",
                     (new, new, placed[BODY_ROW], old))


def _duplicate(op, row, event_id, original):
    """``_INSERT_DUPLICATE``'s parameters: ``row`` of ``op`` stored as event ``event_id``, a duplicate of
    ``original``."""
    return (event_id, op.route, op.now, op.now, original, row.get("headers"), row.get("content_type"),
            "duplicate of %d" % original)


def _redelivered(conn, op, events, first_id, added):
    """A batch delivery whose key is already stored (a redelivery; Preservica's key covers the envelope
    and the first element): each element is looked up by its own key among what is stored of deliveries
    under that key, and stored as a duplicate of what it matches, or as new under its own key (so a
    later redelivery finds it). Its elements after the first went in without a key: they are taken out
    and stored again, as new or as duplicates, under the same ids."""
    head, ids = op.rows[0], [event_id for event_id, _ in op.result]
    keys, known = _stored_elements(conn, op.route, head["dedupe_key"], head.get("body"), len(ids))
    conn.execute("DELETE FROM events WHERE id > ? AND id <= ?", (ids[0], ids[-1]))
    new, duplicates = [], []
    for i, (event_id, row, key) in enumerate(zip(ids, op.rows, keys)):
        original = known.get(key) if key is not None else None
        if original is None:
            placed = events[event_id - first_id]
            new.append(placed[:5] + (key,) + placed[6:])
            if key is not None:
                known[key] = event_id
        else:
            duplicates.append(_duplicate(op, row, event_id, original))
            op.result[i] = (original, "duplicate")
            if not row.get("done"):
                added[op.route] -= 1
    before = conn.total_changes
    _insert_rows(conn, _INSERT_NEW, new)
    if conn.total_changes - before < len(new):
        raise sqlite3.IntegrityError("a redelivered element was not stored")
    conn.executemany(_INSERT_DUPLICATE, duplicates)


def _element_keys(batch_key, body, n):
    """The own keys of the first ``n`` elements of a batch delivery stored under ``batch_key``
    (``events[i]`` of ``body``): that key, the element's position, and a hash of the element (its JSON,
    keys sorted), so an element is a duplicate only of the same element in the same place. A body this
    thread cannot take apart (nested deeper than the writer's stack allows, which the request thread's
    did) has its elements keyed by position and the hash of the whole body: the same bytes again are
    still recognised."""
    try:
        doc = json_or_none(body)
        events = doc.get("events") if isinstance(doc, dict) else None
        if isinstance(events, list) and len(events) >= n:
            texts = [json.dumps(element, sort_keys=True) for element in events[:n]]  # ASCII: \ud800 escaped
            return ["%s#%d:%s" % (batch_key, i, hashlib.sha256(text.encode("ascii")).hexdigest()[:24])
                    for i, text in enumerate(texts)]
    except RecursionError:
        pass
    whole = hashlib.sha256(body or b"").hexdigest()[:24]
    return ["%s#%d:body:%s" % (batch_key, i, whole) for i in range(n)]


def _stored_elements(conn, route, batch_key, body, n):
    """(the own keys of the ``n`` elements of ``body``, {element key: event id} of what is stored of
    them): the elements of the delivery stored under ``batch_key`` (the row holding it, which holds
    the delivery's body, and the rows after it that name it in ``body_row``, one per element; or,
    stored before bodies moved into rows or over ROW_BODY_BYTES, the rows after it that share its
    ``body_id``; an earlier version's rows too, which had a key each) and
    those that earlier redeliveries stored under their own key. Both bodies are taken apart here, at
    one stack depth, so a body too deep for it is keyed the same way in both."""
    keys, known = _element_keys(batch_key, body, n), {}
    first = conn.execute("SELECT e.id, e.body_id, " + _BODY + " FROM events e" + _BODY_JOINS +  # constants
                         " WHERE e.route=? AND e.dedupe_key=?", (route, batch_key)).fetchone()
    if first is not None:
        first_id, body_id, data = first
        rows = conn.execute("SELECT element, id FROM events WHERE id >= ? AND id < ? AND"
                            " (id = ? OR body_row = ? OR body_id = ?)",
                            (first_id, first_id + MAX_BATCH, first_id, first_id, body_id)).fetchall()
        elements = {e for e, _ in rows if isinstance(e, int) and 0 <= e < MAX_BATCH}
        theirs = _element_keys(batch_key, data, max(elements) + 1 if elements else 0)
        for element, event_id in rows:
            if element in elements:
                known.setdefault(theirs[element], event_id)
    for key, event_id in _stored_keys(conn, route, keys).items():
        known.setdefault(key, event_id)
    return keys, known


def _stored_keys(conn, route, keys):
    """{dedupe key: event id} of those of ``keys`` stored for ``route``, KEYS_PER_SELECT keys a
    statement (a redelivery of many elements costs a few statements)."""
    wanted, out = list(set(keys) - {None}), {}
    for i in range(0, len(wanted), KEYS_PER_SELECT):
        part = wanted[i:i + KEYS_PER_SELECT]
        sql = ("SELECT dedupe_key, id FROM events WHERE route=? AND dedupe_key IN (%s)"
               % ",".join("?" * len(part)))  # placeholders only: no value is ever put in the text
        out.update(conn.execute(sql, [route] + part))
    return out


def migrate(conn):
    """Bring a database of any earlier schema up to this one, in one transaction: create what is
    missing, add the ``body_id``/``element``/``body``/``body_row`` columns to an old ``events``, rebuild
    an ``events_due`` index that still holds done rows as the partial one, and move the bodies of the
    old sha256-keyed ``bodies`` table into ``request_bodies``. Bodies already in ``request_bodies`` stay
    there: every reader takes a body from either place. Stamps SCHEMA_VERSION; raises StoreError for a
    database of a newer one."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError("the database was written by a newer hookd (schema %d; this one knows %d): run"
                             " that version, or restore the copy taken before the upgrade" % (version, SCHEMA_VERSION))
        columns = {r[1] for r in conn.execute("PRAGMA table_info(events)")}
        if columns:
            for name, kind in (("body_id", "INTEGER"), ("element", "INTEGER"), ("body", "BLOB"),
                               ("body_row", "INTEGER")):
                if name not in columns:
                    conn.execute("ALTER TABLE events ADD COLUMN %s %s" % (name, kind))  # constant names
        if not conn.execute("SELECT 1 FROM pragma_index_list('events') WHERE name='events_due' AND partial=1"
                            ).fetchone():
            conn.execute("DROP INDEX IF EXISTS events_due")  # whole-table index of before; made again below
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='bodies'").fetchone():
            _move_old_bodies(conn)
        if version < SCHEMA_VERSION:
            conn.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)  # a constant
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _move_old_bodies(conn):
    first = (conn.execute("SELECT max(id) FROM request_bodies").fetchone()[0] or 0) + 1
    hashes = [r[0] for r in conn.execute("SELECT hash FROM bodies")]
    conn.execute("CREATE TEMP TABLE body_ids(hash TEXT PRIMARY KEY, id INTEGER NOT NULL)")
    conn.executemany("INSERT INTO body_ids(hash, id) VALUES (?, ?)",
                     ((h, first + i) for i, h in enumerate(hashes)))
    conn.execute("INSERT INTO request_bodies(id, data) SELECT i.id, b.data FROM bodies b"
                 " JOIN body_ids i ON i.hash = b.hash")
    conn.execute("UPDATE events SET body_id = (SELECT id FROM body_ids WHERE hash = events.body_hash),"
                 " body_hash = NULL WHERE body_hash IS NOT NULL")
    conn.execute("DROP TABLE body_ids")
    conn.execute("DROP TABLE bodies")


COLUMNS = ("id", "route", "status", "attempts", "received_at", "updated_at", "next_at", "last_error", "note",
           "dedupe_key", "duplicate_of", "serial_key", "headers", "content_type", "payload", "progress",
           "element")


_ROW_SQL = ("SELECT " + ", ".join(_SHARED.get(c, "e." + c) for c in COLUMNS) +
            ", " + _BODY + " FROM events e" + _BODY_JOINS + " WHERE e.id=?")  # constant text only


def row_dict(conn, event_id, with_body=False):
    row = conn.execute(_ROW_SQL, (event_id,)).fetchone()
    if row is None:
        return None
    out = _with_note(dict(zip(COLUMNS + ("body",), row)))
    if not with_body:
        out.pop("body")
    return out


def _with_note(event):
    """``event`` (a dict of its columns) with the note a row stored done at intake shows: it keeps none
    (``_store_requests``), and only such a row is done without an attempt."""
    if event["note"] is None and event["status"] == "done" and not event["attempts"]:
        event["note"] = NOTHING_TO_DO
    return event


def list_events(conn, status=None, route=None, limit=100, text=None, offset=0):
    """Newest first, filtered; dicts of the summary columns. ``text``: events whose stored payload or
    raw body contains it (case-insensitive for ASCII); ``offset`` skips that many matches (paging)."""
    where, args = [], []
    if status:
        where.append("e.status=?" if status == "done" else "e.status <> 'done' AND e.status=?")
        args.append(status)
    if route:
        where.append("e.route=?")
        args.append(route)
    sql = ("SELECT e.id, e.route, e.status, e.attempts, e.received_at, e.updated_at, e.next_at, e.last_error,"
           " e.note FROM events e")
    if text:  # the payload column holds JSON (non-ASCII escaped); the body holds the bytes as received
        sql += _BODY_JOINS
        where.append("(e.payload LIKE ? ESCAPE '\\' OR CAST(" + _BODY + " AS TEXT) LIKE ? ESCAPE '\\')")
        args += [_like(json.dumps(text)[1:-1]), _like(text)]
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY e.id DESC LIMIT ? OFFSET ?"
    args += [int(limit), int(offset)]
    cols = ("id", "route", "status", "attempts", "received_at", "updated_at", "next_at", "last_error", "note")
    return [_with_note(dict(zip(cols, r))) for r in conn.execute(sql, args)]


def counts(conn):
    """(route, status, number of events) for every pair that has events."""
    return conn.execute("SELECT route, status, count(*) FROM events GROUP BY route, status").fetchall()


def oldest_queued(conn):
    """received_at of the oldest event waiting to run (queued or retry), or None."""
    return conn.execute("SELECT min(received_at) FROM events WHERE status <> 'done' AND"
                        " status IN ('queued','retry')").fetchone()[0]


def _like(text):
    """A LIKE pattern matching ``text`` anywhere, its wildcards escaped."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def products(conn, event_id):
    """What an event's jobs produced, oldest first: dicts of id, kind, path, data (parsed), created_at."""
    rows = conn.execute("SELECT id, kind, path, data, created_at FROM products WHERE event_id=? ORDER BY id",
                        (event_id,)).fetchall()
    return [{"id": i, "kind": k, "path": p, "data": None if d is None else json.loads(d), "created_at": c}
            for i, k, p, d, c in rows]


def product_path(conn, product_id):
    """The file a product record names, or None."""
    row = conn.execute("SELECT path FROM products WHERE id=?", (product_id,)).fetchone()
    return row[0] if row else None
