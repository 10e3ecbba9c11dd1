"""The durable store: one sqlite file (WAL, synchronous=FULL), one writer at a time, group commit.

Strategy: sqlite is the source of truth and only this module touches it. Every write is a function
``fn(conn)``. The first caller to find nobody writing becomes the group's leader: it takes everything
that is waiting, runs each function inside its own SAVEPOINT of one ``BEGIN IMMEDIATE`` transaction,
commits once (one fsync for the whole group), wakes the group's callers and hands the lead to the next
waiting caller. So N concurrent webhooks cost one fsync, not N; a caller at light load pays no thread
switch; and a caller that gets a result knows it is on disk. If the commit fails (disk full, read-only
file) every caller of that group gets the error and nothing of the group is stored. Request bodies live
once in ``bodies``, keyed by their sha256, so a delivery that becomes many events (Preservica's
``events[]``) or arrives many times is stored once. Reads use a connection per thread (WAL readers do
not block the writer). Counts of waiting events per route live in memory, changed after each commit
and re-read from the table now and then (the CLI may change rows while the daemon runs).
"""

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time

from .api import Busy

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
  progress TEXT
);
CREATE TABLE IF NOT EXISTS bodies (
  hash TEXT PRIMARY KEY,
  data BLOB NOT NULL
) WITHOUT ROWID;
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
CREATE INDEX IF NOT EXISTS events_due ON events(status, next_at);
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
MAX_GROUP = 512  # operations per commit; bounds the time one transaction holds the write lock


class _Op:
    """One write waiting for its group. ``wait``/``wake`` are a bare lock used as a one-shot gate
    (cheaper than a threading.Event, which builds a Condition per wait); only the leader wakes."""

    __slots__ = ("fn", "result", "error", "delta", "lead", "_gate", "_open")

    def __init__(self, fn, delta):
        self.fn, self.result, self.error, self.delta = fn, None, None, delta
        self.lead = False  # set when this op's thread is handed the leader's job
        self._gate = threading.Lock()
        self._gate.acquire()
        self._open = False

    def wait(self):
        self._gate.acquire()

    def wake(self):
        if not self._open:
            self._open = True
            self._gate.release()


def _outcome(op):
    if op.error is not None:
        raise op.error
    return op.result


class StoreError(Exception):
    """The database could not take a write (disk full, read-only, locked too long)."""


class Store:
    """``write(fn)``, ``read(fn)``, ``waiting(route)``, plus the event operations the core needs."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._local = threading.local()
        self._pending = []           # operations waiting for the next group
        self._plock = threading.Lock()
        self._leading = False        # a thread is running a group right now
        self._waiting = {}
        self._count_lock = threading.Lock()
        self._closed = False
        self.groups = 0  # commits done; tests use it to see group commit at work
        self._conn = self._connect()
        self._conn.executescript(SCHEMA)
        self._recount(self._conn)

    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # the 2xx promises the event survives power loss
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    # -- writing ------------------------------------------------------------------------------------
    def write(self, fn, delta=None):
        """Run ``fn(conn)`` in a group transaction and return its result once committed.
        ``delta`` = {route: n} is added to the waiting counts after the commit.

        Group commit without a writer thread: the caller that finds nobody leading becomes the leader,
        takes every pending operation (its own first), runs them in one transaction and commits once.
        Callers arriving meanwhile queue up and sleep; when the group is done the leader hands the
        lead to the first of them, which takes the next group. A leader never waits for others, and
        no extra thread is woken per group."""
        if self._closed:
            raise StoreError("store is closed")
        op = _Op(fn, delta)
        with self._plock:
            self._pending.append(op)
            lead = not self._leading
            self._leading = True
        if not lead:
            op.wait()
            if not op.lead:
                return _outcome(op)
        self._lead()
        return _outcome(op)

    def _lead(self):
        with self._plock:
            group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
        try:
            self._commit_group(group)
        finally:
            self._hand_over()

    def _hand_over(self):
        """Give the lead to the first waiting operation, or mark that nobody leads."""
        with self._plock:
            nxt = self._pending[0] if self._pending else None
            if nxt is None:
                self._leading = False
        if nxt is not None:
            nxt.lead = True
            nxt.wake()

    def _commit_group(self, group):
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            return self._fail_all(group, e)
        if len(group) == 1:  # alone in its transaction: no savepoint needed to isolate it
            return self._commit_one(group[0])
        for op in group:
            try:
                conn.execute("SAVEPOINT op")
                op.result = op.fn(conn)
                conn.execute("RELEASE op")
            except Exception as e:  # one bad operation must not sink the group
                op.error = e
                try:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                except sqlite3.Error as e2:
                    return self._fail_all(group, e2)
        self._finish_group(group)

    def _commit_one(self, op):
        """A group of one (light load): run it in the open transaction, then commit or roll back."""
        conn = self._conn
        try:
            op.result = op.fn(conn)
        except Exception as e:
            op.error = e
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            op.wake()
            return
        self._finish_group([op])

    def _finish_group(self, group):
        """COMMIT, then apply the waiting-count deltas and wake every caller of the group."""
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as e:
            return self._fail_all(group, e)
        self.groups += 1
        with self._count_lock:
            for op in group:
                if op.error is None and op.delta:
                    for route, n in op.delta.items():
                        self._waiting[route] = self._waiting.get(route, 0) + n
        for op in group:
            op.wake()

    def _fail_all(self, group, exc):
        """The transaction could not commit: nothing of the group is stored, every caller hears why."""
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        err = StoreError("database write failed: %s" % exc)
        for op in group:
            op.error, op.result = err, None
            op.wake()

    # -- reading ------------------------------------------------------------------------------------
    def read(self, fn):
        """Run ``fn(conn)`` on this thread's own read connection."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=10000")
            self._local.conn = conn
        return fn(conn)

    def waiting(self, route=None):
        """Events queued, retrying or running: for ``route``, or in total."""
        with self._count_lock:
            if route is None:
                return sum(self._waiting.values())
            return self._waiting.get(route, 0)

    def recount(self):
        """Re-read the waiting counts from the table (the CLI may have changed rows)."""
        self.write(self._recount)

    def _recount(self, conn):
        rows = conn.execute("SELECT route, count(*) FROM events WHERE status IN ('queued','retry','running')"
                            " GROUP BY route").fetchall()
        with self._count_lock:
            self._waiting = dict(rows)

    def close(self):
        """No new writes; wait (up to 10 s) for a running group, then close the connection."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._plock:
                if not self._leading:
                    break
            time.sleep(0.01)
        self._conn.close()

    # -- event operations ---------------------------------------------------------------------------
    def add_events(self, route, rows, now=None, limit=None):
        """Insert one request's events (dicts from ``event_row``) atomically; returns [(id, "new" or
        "duplicate")]. A row whose (route, dedupe_key) exists becomes a 'duplicate' row pointing at the
        original (whose id is returned). A row with ``done`` set is stored as done at once.
        ``limit``: refuse with Busy when the route already has that many events waiting; counted inside
        the transaction, so concurrent requests cannot both slip past it."""
        now = time.time() if now is None else now

        def fn(conn):
            if limit is not None:
                waiting = conn.execute("SELECT count(*) FROM events WHERE route=? AND status IN"
                                       " ('queued','retry','running')", (route,)).fetchone()[0]
                if waiting + len(rows) > limit:
                    raise Busy("%s has %d events waiting (queue_size %d)" % (route, waiting, limit))
            out = []
            for row in rows:
                out.append(_insert(conn, route, row, now))
            return out
        try:
            result = self.write(fn)
        except sqlite3.OperationalError as e:  # disk full, read-only file, locked: storage, not input
            raise StoreError("database write failed: %s" % e)
        fresh = sum(1 for (_, status), r in zip(result, rows) if status == "new" and not r.get("done"))
        if fresh:
            with self._count_lock:
                self._waiting[route] = self._waiting.get(route, 0) + fresh
        return result

    def claim(self, event_id, now=None):
        """queued/retry -> running, attempts + 1; returns the row as a dict, or None if not claimable
        (already claimed, or another event with its serial key is running: a remote worker holds it)."""
        now = time.time() if now is None else now

        def fn(conn):
            cur = conn.execute("UPDATE events SET status='running', attempts=attempts+1, updated_at=?"
                               " WHERE id=? AND status IN ('queued','retry') AND " + _KEY_FREE,
                               (now, event_id))
            if cur.rowcount != 1:
                return None
            return row_dict(conn, event_id, with_body=True)
        return self.write(fn)

    def finish(self, event_id, route, status, error=None, note=None, next_at=0.0, now=None):
        """End an attempt: 'done', 'dead' or 'retry' (with ``next_at``)."""
        now = time.time() if now is None else now
        delta = {route: -1} if status in ("done", "dead") else None

        def fn(conn):
            conn.execute("UPDATE events SET status=?, last_error=?, note=coalesce(?, note), next_at=?,"
                         " updated_at=? WHERE id=? AND status='running'",
                         (status, error, note, next_at, now, event_id))
        self.write(fn, delta=delta)

    def save_progress(self, event_id, progress):
        self.write(lambda conn: conn.execute("UPDATE events SET progress=? WHERE id=?",
                                             (json.dumps(progress), event_id)))

    def requeue_running(self):
        """After a crash: events left 'running' by local workers go back to the queue; those a remote
        worker holds a lease on stay running until it reports or the lease expires. Returns how many."""
        return self.write(lambda conn: conn.execute(
            "UPDATE events SET status='queued', next_at=0 WHERE status='running' AND id NOT IN"
            " (SELECT event_id FROM leases WHERE ended IS NULL)").rowcount)

    def due(self, now, limit=1000):
        """(id, route, serial_key) of events whose time has come."""
        return self.read(lambda conn: conn.execute(
            "SELECT id, route, serial_key FROM events WHERE status IN ('queued','retry') AND next_at <= ?"
            " ORDER BY next_at, id LIMIT ?", (now, limit)).fetchall())

    def next_due(self):
        row = self.read(lambda conn: conn.execute(
            "SELECT min(next_at) FROM events WHERE status IN ('queued','retry')").fetchone())
        return row[0]

    def retry(self, event_id=None, all_dead=False, now=None):
        """Put a dead (or retrying) event back in the queue now; returns the ids moved."""
        now = time.time() if now is None else now

        def fn(conn):
            if all_dead:
                ids = [r[0] for r in conn.execute("SELECT id FROM events WHERE status='dead'")]
            else:
                ids = [r[0] for r in conn.execute(
                    "SELECT id FROM events WHERE id=? AND status IN ('dead','retry')", (event_id,))]
            for i in ids:
                conn.execute("UPDATE events SET status='queued', attempts=0, next_at=0, updated_at=?,"
                             " note='retried by hand' WHERE id=?", (now, i))
            return ids
        return self.write(fn)

    def replay(self, event_id, now=None):
        """Store a copy of an event as a new queued event (no dedupe); returns the new id or None."""
        now = time.time() if now is None else now

        def fn(conn):
            row = conn.execute("SELECT route, serial_key, headers, content_type, body_hash, payload FROM events"
                               " WHERE id=?", (event_id,)).fetchone()
            if row is None:
                return None
            cur = conn.execute(
                "INSERT INTO events(route, status, received_at, updated_at, serial_key, headers, content_type,"
                " body_hash, payload, note) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
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

    def prune(self, days, now=None):
        """Delete done and duplicate events last changed more than ``days`` ago; returns the count."""
        cutoff = (time.time() if now is None else now) - days * 86400.0

        def fn(conn):
            n = conn.execute("DELETE FROM events WHERE status IN ('done','duplicate') AND updated_at < ?",
                             (cutoff,)).rowcount
            conn.execute("DELETE FROM bodies WHERE hash NOT IN"
                         " (SELECT body_hash FROM events WHERE body_hash IS NOT NULL)")
            conn.execute("DELETE FROM leases WHERE ended IS NOT NULL AND event_id NOT IN (SELECT id FROM events)")
            conn.execute("DELETE FROM lease_workers WHERE last_seen < ?", (cutoff,))
            conn.execute("DELETE FROM products WHERE event_id NOT IN (SELECT id FROM events)")
            return n
        return self.write(fn)


    # -- leases (remote workers, SPEC §10) -----------------------------------------------------------
    def lease(self, routes, max_jobs, seconds, worker, address=None, now=None):
        """Lease up to ``max_jobs`` due events of ``routes`` to ``worker`` for ``seconds``: each becomes
        running (attempts + 1) with a new lease row, in one transaction. An event whose serial key is
        running anywhere (a local worker, another lease) is skipped, and so is a second event with the
        same key in one answer. Returns [(lease dict, event row dict with body)], oldest due first."""
        now = time.time() if now is None else now

        def fn(conn):
            _seen(conn, worker, address, routes, now)
            due = []
            for route in routes:
                due += conn.execute(
                    "SELECT next_at, id, serial_key FROM events WHERE status IN ('queued','retry')"
                    " AND next_at <= ? AND route=? ORDER BY next_at, id LIMIT ?",
                    (now, route, max_jobs * 8 + 32)).fetchall()
            busy = {r[0] for r in conn.execute(
                "SELECT serial_key FROM events WHERE status='running' AND serial_key IS NOT NULL")}
            out = []
            for _, event_id, key in sorted(due):
                if len(out) >= max_jobs:
                    break
                if key is not None and key in busy:
                    continue
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
        return self.write(fn)

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
            conn.execute("UPDATE events SET status=?, last_error=?, note=coalesce(?, note), next_at=?,"
                         " updated_at=?, progress=coalesce(?, progress) WHERE id=? AND status='running'",
                         (status, error, note, next_at, now, None if progress is None else json.dumps(progress),
                          lease["event_id"]))
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
                lease["status"] = _expire(conn, lease, now, max_attempts, delta)
                out.append(lease)
            return out
        return self.write(fn, delta=delta)


_KEY_FREE = ("(serial_key IS NULL OR NOT EXISTS (SELECT 1 FROM events o WHERE o.status='running'"
             " AND o.serial_key=events.serial_key))")
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


def _expire(conn, lease, now, max_attempts, delta):
    """End one overdue lease; its event goes back to the queue (or dead after its last attempt)."""
    error = "lease %s… expired (worker %s)" % (lease["lease_id"][:8], lease["worker"])
    last = max_attempts is not None and lease["attempt"] >= max_attempts
    status = "dead" if last else "retry"
    conn.execute("UPDATE leases SET ended='expired', ended_at=? WHERE lease_id=?", (now, lease["lease_id"]))
    cur = conn.execute("UPDATE events SET status=?, last_error=?, next_at=?, updated_at=? WHERE id=?"
                       " AND status='running'", (status, error + (" after %d attempts" % lease["attempt"]
                                                                  if last else ""), now, now, lease["event_id"]))
    if last and cur.rowcount:
        delta[lease["route"]] = delta.get(lease["route"], 0) - 1
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


def _insert(conn, route, row, now):
    key = row.get("dedupe_key")
    if key is not None:
        hit = conn.execute("SELECT id FROM events WHERE route=? AND dedupe_key=?", (route, key)).fetchone()
        if hit is not None:
            conn.execute(
                "INSERT INTO events(route, status, received_at, updated_at, duplicate_of, headers,"
                " content_type, note) VALUES (?, 'duplicate', ?, ?, ?, ?, ?, ?)",
                (route, now, now, hit[0], row.get("headers"), row.get("content_type"),
                 "duplicate of %d" % hit[0]))
            return hit[0], "duplicate"
    body = row.get("body") or b""
    digest = hashlib.sha256(body).hexdigest()
    conn.execute("INSERT OR IGNORE INTO bodies(hash, data) VALUES (?, ?)", (digest, body))
    done = bool(row.get("done"))  # nothing to do for it: stored as done, no worker touches it
    cur = conn.execute(
        "INSERT INTO events(route, status, received_at, updated_at, dedupe_key, serial_key, headers,"
        " content_type, body_hash, payload, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (route, "done" if done else "queued", now, now, key, row.get("serial_key"), row.get("headers"),
         row.get("content_type"), digest, row.get("payload"), NOTHING_TO_DO if done else None))
    return cur.lastrowid, "new"


COLUMNS = ("id", "route", "status", "attempts", "received_at", "updated_at", "next_at", "last_error", "note",
           "dedupe_key", "duplicate_of", "serial_key", "headers", "content_type", "payload", "progress")


_ROW_SQL = ("SELECT " + ", ".join("e." + c for c in COLUMNS) +  # constant text only
            ", b.data FROM events e LEFT JOIN bodies b ON b.hash = e.body_hash WHERE e.id=?")


def row_dict(conn, event_id, with_body=False):
    row = conn.execute(_ROW_SQL, (event_id,)).fetchone()
    if row is None:
        return None
    out = dict(zip(COLUMNS + ("body",), row))
    if not with_body:
        out.pop("body")
    return out


def list_events(conn, status=None, route=None, limit=100, text=None, offset=0):
    """Newest first, filtered; dicts of the summary columns. ``text``: events whose stored payload or
    raw body contains it (case-insensitive for ASCII); ``offset`` skips that many matches (paging)."""
    where, args = [], []
    if status:
        where.append("e.status=?")
        args.append(status)
    if route:
        where.append("e.route=?")
        args.append(route)
    sql = ("SELECT e.id, e.route, e.status, e.attempts, e.received_at, e.updated_at, e.next_at, e.last_error,"
           " e.note FROM events e")
    if text:  # the payload column holds JSON (non-ASCII escaped); the body holds the bytes as received
        sql += " LEFT JOIN bodies b ON b.hash = e.body_hash"
        where.append("(e.payload LIKE ? ESCAPE '\\' OR CAST(b.data AS TEXT) LIKE ? ESCAPE '\\')")
        args += [_like(json.dumps(text)[1:-1]), _like(text)]
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY e.id DESC LIMIT ? OFFSET ?"
    args += [int(limit), int(offset)]
    cols = ("id", "route", "status", "attempts", "received_at", "updated_at", "next_at", "last_error", "note")
    return [dict(zip(cols, r)) for r in conn.execute(sql, args)]


def counts(conn):
    """(route, status, number of events) for every pair that has events."""
    return conn.execute("SELECT route, status, count(*) FROM events GROUP BY route, status").fetchall()


def oldest_queued(conn):
    """received_at of the oldest event waiting to run (queued or retry), or None."""
    return conn.execute("SELECT min(received_at) FROM events WHERE status IN ('queued','retry')").fetchone()[0]


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
