"""The store on a real sqlite file: adding, dedupe, claiming, finishing, retrying, replaying, pruning,
crash recovery, and group commit (many concurrent writers, fewer commits, every caller told the truth)."""

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

from hookd_core import store as store_module
from hookd_core.store import CHECKPOINT_AHEAD, WAL_CHECKPOINT_PAGES, WAL_KEEP_BYTES, Store, StoreError, list_events, product_path, products, row_dict

from tests.support import ROOT


# The start of a program the tests below run in a process of their own, unprivileged as hookd's unit runs it
# (RLIMIT_NICE 0; as root it becomes uid 65534): a store, and a ``then`` for its requests that keeps each
# one's error in ``answered``.
UNPRIVILEGED_STORE = """
import json, os, resource, tempfile, threading, time
from hookd_core.store import Store
resource.setrlimit(resource.RLIMIT_NICE, (0, resource.getrlimit(resource.RLIMIT_NICE)[1]))
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
store = Store(os.path.join(tempfile.mkdtemp(), "events.db"))
answered = []
class Then:
    def prepare(self, result):
        pass
    def __call__(self, result, error):
        answered.append(error)
"""


def run_unprivileged(code):
    """Run UNPRIVILEGED_STORE and then ``code``, which prints one JSON value: that value."""
    out = subprocess.run([sys.executable, "-c", UNPRIVILEGED_STORE + textwrap.dedent(code)], cwd=ROOT,
                         capture_output=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(out.stderr[-2000:].decode(errors="replace"))
    return json.loads(out.stdout)


def wal_frames(path):
    """Frames a WAL file holds (4 KiB pages): as many as were written since it was made, while it has not
    started over (a fresh database the automatic checkpoint has not reached yet)."""
    return max(0, os.path.getsize(path + "-wal") - 32) // (4096 + 24)


def wal_restarts(path):
    """Times the WAL has started over: the checkpoint sequence number of its header (big-endian at byte
    12, sqlite.org/walformat.html), 0 for a new one."""
    with open(path + "-wal", "rb") as f:
        head = f.read(32)
    return int.from_bytes(head[12:16], "big") if len(head) == 32 else 0


def row(key=None, body=b"{}", serial=None):
    return {"dedupe_key": key, "serial_key": serial, "headers": "{}", "content_type": "application/json",
            "body": body, "payload": None}


def batch(envelope, elements):
    """A batch delivery's rows as App.event_rows makes them for Preservica: the delivery's key on the first
    row, marked ``batch``, no key on the others, one body."""
    body = json.dumps({"env": envelope, "events": elements}).encode("utf-8")
    rows = [dict(row(None, body), element=i) for i in range(len(elements))]
    rows[0].update(dedupe_key="d:" + envelope, batch=True)
    return rows


def bodies_stored(conn):
    """Every body the database holds, each once: those in request_bodies (by id), then those in the event
    rows that hold their request's (by id)."""
    return [r[0] for r in conn.execute("SELECT data FROM (SELECT data FROM request_bodies ORDER BY id)"
                                       " UNION ALL SELECT body FROM (SELECT body FROM events WHERE body IS NOT NULL"
                                       " ORDER BY id)")]


def due_index_entries(store):
    """Entries in the events_due index now (every page's cells: an index keeps entries in its inner
    pages too)."""
    return store.read(lambda c: c.execute("SELECT coalesce(sum(ncell), 0) FROM dbstat WHERE name='events_due'"
                                          ).fetchone()[0])


def stored_rows(store):
    """Every row of events and of request_bodies, in id order."""
    return store.read(lambda c: [c.execute("SELECT * FROM %s ORDER BY id" % table).fetchall()  # constant names
                                 for table in ("events", "request_bodies")])


class StoreTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.tmp.name, "s.sqlite3")
        self.store = Store(self.path)

    def tearDown(self):
        self.store.close()
        self.tmp.cleanup()

    def status(self, event_id):
        return self.store.read(lambda c: row_dict(c, event_id))["status"]

    def test_add_claim_finish(self):
        [(eid, st)] = self.store.add_events("r", [row("k1")])
        self.assertEqual(st, "new")
        self.assertEqual(self.store.waiting("r"), 1)
        claimed = self.store.claim(eid)
        self.assertEqual(claimed["attempts"], 1)
        self.assertEqual(claimed["body"], b"{}")
        self.assertIsNone(self.store.claim(eid), "a second claim must find nothing")
        self.store.finish(eid, "r", "done", note="ok")
        self.assertEqual(self.status(eid), "done")
        self.assertEqual(self.store.waiting("r"), 0)

    def test_same_dedupe_key_is_a_duplicate_row_pointing_at_the_first(self):
        [(first, _)] = self.store.add_events("r", [row("same")])
        [(again, st)] = self.store.add_events("r", [row("same")])
        self.assertEqual((again, st), (first, "duplicate"))
        rows = self.store.read(lambda c: list_events(c))
        self.assertEqual(sorted(r["status"] for r in rows), ["duplicate", "queued"])
        [(other, st)] = self.store.add_events("other-route", [row("same")])
        self.assertEqual(st, "new", "dedupe keys are per route")
        self.assertEqual(self.store.waiting(), 2)

    def test_retry_then_due(self):
        [(eid, _)] = self.store.add_events("r", [row()])
        self.store.claim(eid, now=100.0)
        self.store.finish(eid, "r", "retry", error="boom", next_at=150.0)
        self.assertEqual(self.store.due(149.0), [])
        self.assertEqual([r[0] for r in self.store.due(151.0)], [eid])
        self.assertEqual(self.store.claim(eid)["attempts"], 2)

    def test_dead_retry_by_hand_and_replay(self):
        [(eid, _)] = self.store.add_events("r", [row("k")])
        self.store.claim(eid)
        self.store.finish(eid, "r", "dead", error="no")
        self.assertEqual(self.store.retry(999), [])
        self.assertEqual(self.store.retry(eid), [eid])
        self.assertEqual(self.status(eid), "queued")
        new = self.store.replay(eid)
        self.assertNotEqual(new, eid)
        self.assertEqual(self.store.read(lambda c: row_dict(c, new, with_body=True))["body"], b"{}")
        self.assertIsNone(self.store.replay(424242))

    def test_running_events_are_requeued_after_a_crash(self):
        [(eid, _)] = self.store.add_events("r", [row()])
        self.store.claim(eid)
        self.store.close()  # as if the process died here
        self.store = Store(self.path)
        self.assertEqual(self.store.waiting("r"), 1)
        self.assertEqual(self.store.requeue_running(), 1)
        self.assertEqual(self.status(eid), "queued")

    def test_prune_keeps_dead_and_recent(self):
        ids = [self.store.add_events("r", [row()], now=5.0)[0][0] for _ in range(3)]
        for eid, end in zip(ids, ("done", "dead", "done")):
            self.store.claim(eid, now=10.0)
            self.store.finish(eid, "r", end, now=10.0 if eid != ids[2] else 1e12)
        self.assertEqual(self.store.prune(days=1, now=10.0 + 2 * 86400), 1)
        left = {r["id"] for r in self.store.read(lambda c: list_events(c))}
        self.assertEqual(left, {ids[1], ids[2]})

    def test_an_event_id_is_never_handed_out_twice_after_a_prune(self):
        """Ids are handed out one past the largest stored, and X-Hookd-Event-Id, log lines and Teams cards
        have named them downstream: a prune that took every event, newest included (a quiet spell longer
        than the retention), must not let the next request get an id an earlier event had."""
        ids = [self.store.add_events("r", [row(str(n))], now=5.0)[0][0] for n in range(3)]
        for eid in ids:
            self.store.claim(eid, now=10.0)
            self.store.finish(eid, "r", "done", now=10.0)
        self.assertEqual(self.store.prune(days=1, now=10.0 + 2 * 86400), 2)
        fresh = self.store.add_events("r", [row("new")], now=10.0 + 2 * 86400)[0][0]
        self.assertGreater(fresh, max(ids))
        self.assertEqual(self.store.prune(days=1, now=10.0 + 4 * 86400), 1)  # the old newest goes now
        self.assertGreater(self.store.add_events("r", [row("newer")])[0][0], fresh)

    def fill_for_prune(self, cutoff):
        """Events of every kind around ``cutoff``, in id order as they would arrive, each with a real history.
        Bodies of both kinds: in their event row, and over ROW_BODY_BYTES in request_bodies."""
        day, t0 = 86400.0, cutoff - 30 * 86400.0
        big = lambda name: b'{"%s": "%s"}' % (name, b"x" * store_module.ROW_BODY_BYTES)  # noqa: E731
        add = lambda key, at, **kw: self.store.add_events("r", [dict(row(key), **kw)], now=at)[0][0]

        def run(eid, *outcomes):
            for status, at in outcomes:
                self.store.claim(eid, now=at)
                self.store.finish(eid, "r", status, next_at=at + 1 if status == "retry" else 0.0, now=at)
            return eid

        old = run(add("a", t0, body=big(b"a")), ("done", t0 + 1))    # done long ago
        run(add("b", t0 + 2), ("dead", t0 + 3))                      # dead: kept whatever its age
        self.store.add_events("r", [row("a")], now=t0 + 4)           # an old duplicate of a
        run(add("c", t0 + 5), ("retry", t0 + 6), ("done", cutoff + day))  # retried, done after the cutoff
        add("d", t0 + 7)                                             # still queued
        add("e", t0 + 8, done=True)                                  # stored done (nothing to do)
        run(self.store.replay(old, now=t0 + 9), ("done", t0 + 10))   # a replay, sharing a's body
        run(add("f", t0 + 11), ("done", cutoff + 2 * day))           # old id, changed after later ids
        run(add("g", cutoff - 10, body=big(b"g")), ("done", cutoff - 5))  # just before the cutoff
        for event_id, _ in self.store.add_events("r", batch("B", ["x", "y", "z"]), now=cutoff - 9):
            run(event_id, ("done", cutoff - 4))                      # a batch delivery, all of it old
        run(add("h", cutoff - 20), ("done", cutoff - 15))            # stored out of order
        for n in range(10):                                          # just after
            run(add("i%d" % n, cutoff + 10 + n), ("done", cutoff + 20))
        run(add("j", cutoff - 600), ("done", cutoff - 500))          # the clock stepped back 10 min
        self.store.add_events("r", [row("g")], now=cutoff - 1)       # duplicates either side of the cutoff
        self.store.add_events("r", [row("g")], now=cutoff + 1)
        for n in range(40):                                          # the recent rows a prune must not read
            run(add("recent%d" % n, cutoff + day + n), ("done", cutoff + day + n))
        self.store.replay(old, now=cutoff + 3 * day)                  # keeps a's body when a goes
        self.store.add_events("r", [row("late", big(b"late"))], now=cutoff + 3 * day)
        lease = ("INSERT INTO leases(lease_id, event_id, route, worker, attempt, leased_at, lease_until, ended,"
                 " ended_at) VALUES (?, ?, 'r', 'w', 1, ?, ?, ?, ?)")
        for event_id in (old, old + 1, old + 7, old + 9):  # a (pruned), b (dead), g (pruned), i0 (kept)
            self.store.add_product(event_id, "thumbnail", path="/t/%d.jpg" % event_id, now=t0)
            self.store.write(lambda c, e=event_id: c.execute(lease, ("l%d" % e, e, t0, t0 + 60, "done", t0)))
        self.store.write(lambda c: c.execute(lease, ("held", old, t0, t0 + 60, None, None)))

    def test_prune_deletes_what_the_unbounded_statement_deleted(self):
        """prune bounds its DELETE by id; on rows of every kind and history (duplicates, replays, an
        event retried and done after later ids, rows stored a little out of order) it deletes exactly
        the rows the plain statement on status and updated_at deletes."""
        now, days = 2e9, 30
        cutoff = now - days * 86400.0
        self.fill_for_prune(cutoff)
        plain = sqlite3.connect(os.path.join(self.tmp.name, "plain.sqlite3"))
        self.addCleanup(plain.close)
        self.store.read(lambda c: c.backup(plain))
        expected = plain.execute("DELETE FROM events WHERE status IN ('done','duplicate') AND updated_at < ?",
                                 (cutoff,)).rowcount
        plain.execute("DELETE FROM request_bodies WHERE id NOT IN (SELECT body_id FROM events WHERE body_id"
                      " IS NOT NULL)")
        plain.execute("DELETE FROM leases WHERE ended IS NOT NULL AND event_id NOT IN (SELECT id FROM events)")
        plain.execute("DELETE FROM products WHERE event_id NOT IN (SELECT id FROM events)")
        left = lambda c: [sorted(r[0] for r in c.execute(sql)) for sql in (  # noqa: E731
            "SELECT id FROM events", "SELECT id FROM request_bodies", "SELECT id FROM events WHERE body IS NOT NULL",
            "SELECT lease_id FROM leases", "SELECT event_id FROM products")]
        kept = left(plain)
        self.assertEqual(self.store.prune(days=days, now=now), expected)
        self.assertEqual(self.store.read(left), kept)
        self.assertEqual(expected, 11)
        self.assertEqual([len(ids) for ids in kept], [57, 2, 54, 3, 2])
        lost = self.store.read(lambda c: c.execute(
            "SELECT count(*) FROM events e WHERE body_id IS NOT NULL AND NOT EXISTS"
            " (SELECT 1 FROM request_bodies b WHERE b.id = e.body_id) OR body IS NULL AND body_row IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM events h WHERE h.id = e.body_row AND h.body IS NOT NULL)").fetchone()[0])
        self.assertEqual(lost, 0, "an event kept lost its body")

    def test_prune_finds_what_it_deletes_through_the_primary_key(self):
        """Done rows have no index entry (events_due leaves them out, and another index would cost every
        request): the statements prune runs on events, the DELETE and the look-ups that bound it by id,
        all search the primary key; none scans the table (the plain statement on status and updated_at
        did)."""
        now = 2e9
        self.fill_for_prune(now - 86400.0)
        seen = []
        self.store._conn.set_trace_callback(seen.append)
        self.store.prune(days=1, now=now)
        self.store._conn.set_trace_callback(None)
        on_events = [sql for sql in seen if " FROM events" in sql.split("(SELECT", 1)[0]]
        self.assertTrue([sql for sql in on_events if sql.startswith("DELETE FROM events")], seen)
        for sql in on_events:
            plan = self.store.read(lambda c: [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + sql)])
            self.assertFalse([p for p in plan if p.startswith("SCAN")], (sql, plan))

    def test_prune_scans_no_table_on_the_writer(self):
        """What prune runs on the writer, in the transaction every webhook's answer waits for, searches
        primary keys and indexes only (the one-row-per-remote-worker lease_workers aside): the sweep of
        bodies no event needs scanned request_bodies and events there (review R2: ~1.3 s per million
        rows, no webhook answered meanwhile). It finds them on a read connection now, and the writer
        deletes just those ids."""
        now = 2e9
        self.fill_for_prune(now - 86400.0)
        bodies = lambda: self.store.read(lambda c: c.execute("SELECT count(*) FROM request_bodies").fetchone()[0])  # noqa: E731
        before, seen = bodies(), []
        self.store._conn.set_trace_callback(seen.append)
        self.store.prune(days=1, now=now)
        self.store._conn.set_trace_callback(None)
        self.assertLess(bodies(), before, "prune deleted the bodies of the events it deleted")
        statements = [sql for sql in seen if sql.split(None, 1)[0] in ("SELECT", "INSERT", "UPDATE", "DELETE")]
        self.assertTrue([sql for sql in statements if sql.startswith("DELETE FROM request_bodies")], seen)
        for sql in statements:
            plan = self.store.read(lambda c: [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + sql)])
            self.assertFalse([p for p in plan if p.startswith("SCAN") and p not in ("SCAN lease_workers", "SCAN CONSTANT ROW")], (sql, plan))

    def test_prune_deletes_many_orphaned_bodies_a_bounded_part_at_a_time(self):
        """The bodies no event needs are found IDS_PER_READ at a time and deleted in writes of at most
        BODIES_PER_DELETE (both lowered here): every one of them goes, each write's transaction holds
        just that many ids, and the body an event still needs stays."""
        from hookd_core import store as store_mod
        limits = (store_mod.IDS_PER_READ, store_mod.BODIES_PER_DELETE)
        big = b"x" * store_mod.ROW_BODY_BYTES  # over the bound: in request_bodies, as every body was before
        self.addCleanup(lambda: (setattr(store_mod, "IDS_PER_READ", limits[0]),
                                 setattr(store_mod, "BODIES_PER_DELETE", limits[1])))
        store_mod.IDS_PER_READ, store_mod.BODIES_PER_DELETE = 7, 3
        self.store.add_events("r", [dict(row("k%d" % i, b"%d" % i + big), done=True) for i in range(30)], now=5.0)
        [(kept, _)] = self.store.add_events("r", [row("kept", b"kept" + big)], now=5.0)
        seen = []
        self.store._conn.set_trace_callback(seen.append)
        self.assertEqual(self.store.prune(days=1, now=3 * 86400), 30)
        self.store._conn.set_trace_callback(None)
        self.assertEqual(self.store.read(lambda c: [r[0] for r in c.execute("SELECT data FROM request_bodies")]),
                         [b"kept" + big])
        per_transaction = [sum(sql.startswith("DELETE FROM request_bodies WHERE id") for sql in part.split("\n"))
                           for part in "\n".join(seen).split("BEGIN IMMEDIATE")]
        self.assertEqual(sum(per_transaction), 30, seen)
        self.assertLessEqual(max(per_transaction), 3, per_transaction)
        self.assertEqual(self.store.read(lambda c: row_dict(c, kept, with_body=True))["body"], b"kept" + big)

    def test_prune_deletes_old_events_a_bounded_part_at_a_time(self):
        """The events to delete are found IDS_PER_READ at a time and deleted in writes of at most
        EVENTS_PER_DELETE (both lowered here), each with its leases and products: one DELETE of every old
        row held the writer 0.44 s for 500,000 rows (review R8), and a day of a busy host is millions.
        Counted by a trigger on the writer's connection: rows deleted in each transaction."""
        from hookd_core import store as store_mod
        saved = {name: vars(store_mod).get(name) for name in ("IDS_PER_READ", "EVENTS_PER_DELETE")}
        self.addCleanup(lambda: [setattr(store_mod, name, value) for name, value in saved.items()])
        store_mod.IDS_PER_READ, store_mod.EVENTS_PER_DELETE = 7, 3
        ids = [eid for eid, _ in self.store.add_events("r", [dict(row("k%d" % i), done=True) for i in range(30)],
                                                        now=5.0)]
        for event_id in ids[::10]:
            self.store.add_product(event_id, "clip", path="/v/%d.mp4" % event_id, now=5.0)
        [(kept, _)] = self.store.add_events("r", [row("kept")], now=5.0)
        seen = []
        self.store._conn.create_function("deleted", 1, lambda event_id: seen.append(("deleted", event_id)))
        self.store._conn.execute("CREATE TEMP TRIGGER note_deleted AFTER DELETE ON events"
                                 " BEGIN SELECT deleted(old.id); END")
        self.store._conn.set_trace_callback(seen.append)
        self.assertEqual(self.store.prune(days=1, now=3 * 86400), 30)
        self.store._conn.set_trace_callback(None)
        per_transaction = []
        for item in seen:
            if isinstance(item, str) and item.startswith("BEGIN"):
                per_transaction.append([])
            elif isinstance(item, tuple):
                per_transaction[-1].append(item[1])
        self.assertEqual(sorted(sum(per_transaction, [])), ids)
        self.assertLessEqual(max(len(part) for part in per_transaction), 3, per_transaction)
        self.assertEqual(self.store.read(lambda c: c.execute("SELECT id FROM events").fetchall()), [(kept,)])
        self.assertEqual(self.store.read(lambda c: c.execute("SELECT count(*) FROM products").fetchone()[0]), 0)

    def test_products_are_kept_per_event_replaced_on_a_rerun_and_pruned_with_their_event(self):
        first, second = [self.store.add_events("r", [row("p%d" % i)], now=5.0)[0][0] for i in range(2)]
        self.store.add_product(first, "clip", path="/v/a.mp4")
        self.store.add_product(first, "clip", path="/v/a.mp4")  # the job ran again: one record
        self.store.add_product(first, "labels", data={"t": {"night": {"probability": 1.0}}})
        self.store.add_product(second, "thumbnail", path="/t/b.png")
        made = self.store.read(lambda c: products(c, first))
        self.assertEqual([(p["kind"], p["path"], p["data"]) for p in made],
                         [("clip", "/v/a.mp4", None), ("labels", None, {"t": {"night": {"probability": 1.0}}})])
        self.assertEqual(self.store.read(lambda c: product_path(c, made[0]["id"])), "/v/a.mp4")
        for eid in (first, second):
            self.store.claim(eid, now=10.0)
            self.store.finish(eid, "r", "done", now=10.0 if eid == first else 1e12)
        self.assertEqual(self.store.prune(days=1, now=10.0 + 2 * 86400), 1)
        self.assertEqual(self.store.read(lambda c: products(c, first)), [])
        self.assertEqual(len(self.store.read(lambda c: products(c, second))), 1)

    def test_group_commit_many_writers_fewer_commits(self):
        before = self.store.groups
        results, errors = [], []

        def writer(i):
            try:
                results.append(self.store.add_events("g", [row("g%d" % i)])[0])
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])
        self.assertEqual(len({r[0] for r in results}), 64)
        commits = self.store.groups - before
        self.assertLess(commits, 64, "64 concurrent writers should share commits")
        # every acknowledged id is really on disk, seen through a fresh connection
        conn = sqlite3.connect(self.path)
        n = conn.execute("SELECT count(*) FROM events WHERE route='g'").fetchone()[0]
        conn.close()
        self.assertEqual(n, 64)

    def test_an_idle_store_commits_on_the_callers_thread_before_then_runs(self):
        # No thread switch when nothing else is waiting: the caller commits its own group, and its
        # ``then`` (a request's answer) runs after the COMMIT, before submit_events returns.
        seen = []

        def then(result, error):
            conn = sqlite3.connect(self.path)  # a fresh connection sees only what is committed
            n = conn.execute("SELECT count(*) FROM events WHERE route='i'").fetchone()[0]
            conn.close()
            seen.append((threading.get_ident(), result, error, n))
        self.store.submit_events("i", [row("i1")], then=then)
        self.assertEqual(len(seen), 1, "then must have run by the time submit_events returns")
        ident, result, error, n = seen[0]
        self.assertEqual((ident, error, n), (threading.get_ident(), None, 1))
        self.assertEqual(result[0][1], "new")

    def test_writes_queued_behind_a_callers_own_commit_wait_for_it(self):
        # A caller committing its own group holds the connection: what others submit meanwhile goes to
        # the writer thread, which commits it after that group, in order.
        inside, release, order = threading.Event(), threading.Event(), []

        def slow(conn):
            conn.execute("INSERT INTO events(route, status, received_at, updated_at) VALUES ('o', 'done', 0, 0)")
            inside.set()
            release.wait(30)
            return "slow"
        first = threading.Thread(target=lambda: order.append(self.store.write(slow)))
        first.start()
        self.assertTrue(inside.wait(30))
        later = self.store.submit_events("o", [row("o1")], then=lambda r, e: order.append("later"))
        self.assertEqual(order, [], "nothing may commit while the first group is open")
        release.set()
        first.join(30)
        deadline = time.monotonic() + 30
        while len(order) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        self.assertEqual(order, ["slow", "later"])
        self.assertIsNone(later.error)
        ids = self.store.read(lambda c: [r[0] for r in c.execute("SELECT id FROM events WHERE route='o' ORDER BY id")])
        self.assertEqual(len(ids), 2)

    def test_a_group_larger_than_a_statement_keeps_every_row_and_duplicate(self):
        # A group's rows go in a fixed number at a time (64, then fewer): 64 + 32 + 4 + 1 rows here, with
        # repeated keys on both sides of each chunk's edge.
        keys = ["k%d" % (i % 90) for i in range(101)]  # rows 90..100 repeat rows 0..10
        keys[64] = keys[63]  # the first row of the second chunk repeats the last of the first
        ids = self.store.add_events("c", [row(k, b"%d" % i) for i, k in enumerate(keys)])
        first = {}
        for (event_id, status), key in zip(ids, keys):
            self.assertEqual(status, "duplicate" if key in first else "new", key)
            self.assertEqual(event_id, first.setdefault(key, event_id))
        stored = self.store.read(lambda c: c.execute(
            "SELECT dedupe_key, status FROM events WHERE route='c' ORDER BY id").fetchall())
        self.assertEqual(len(stored), 101)
        self.assertEqual(sum(s == "queued" for _, s in stored), len(first))
        self.assertEqual(sorted(k for k, s in stored if s == "queued"), sorted(first))

    @unittest.skipUnless(store_module._idle_reversible(), "this process could not leave SCHED_IDLE (unprivileged):"
                         " answers are never prepared here (the test below)")
    def test_a_groups_answers_are_prepared_on_a_thread_of_their_own(self):
        # While the writer's COMMIT waits for the disk, another thread makes the group's answers
        # (``then.prepare(result)``), so that after the COMMIT only their sends are left. That thread runs
        # only while the core would idle and the writer never waits for it: an answer not prepared by the
        # end of the COMMIT is made as before. So groups of 16 are committed until one has answers that
        # were prepared (on a busy machine the first may not); whatever is prepared is prepared once, on
        # that thread, with the very result its answer then gets.
        prepared, seen, n = [], [], 16  # a group of 16 requests, as 16 connections make (PREPARE_AT or more)

        class Then:
            def prepare(self, result):
                prepared.append((self, result, threading.current_thread().name, threading.get_ident()))

            def __call__(self, result, error):
                seen.append((self, result, error, threading.current_thread().name))
        deadline, groups = time.monotonic() + 30, 0
        while not prepared and time.monotonic() < deadline:
            go = self.hold_two_groups()[0]
            for i in range(n):
                self.store.submit_events("p", [row("p%d.%d" % (groups, i))], then=Then())
            go[0].set()
            groups += 1
            self.wait_for(lambda: len(seen) == n * groups)
        self.assertTrue(prepared, "no answer of %d groups was prepared" % groups)
        self.assertEqual({(error, thread) for _, _, error, thread in seen}, {(None, "hookd-writer")})
        results = {then: result for then, result, _, _ in seen}
        for then, result, thread, _ in prepared:
            self.assertEqual(thread, "hookd-prepare")
            self.assertIs(result, results[then])
        self.assertEqual(len({then for then, _, _, _ in prepared}), len(prepared))
        self.assertEqual(self.visible("p"), n * groups)
        preparing = [t for t in threading.enumerate() if t.name == "hookd-prepare" and t.ident == prepared[0][3]]
        self.assertEqual(len(preparing), 1)
        self.store.close()  # and the thread ends with its store
        preparing[0].join(30)
        self.assertFalse(preparing[0].is_alive())

    def test_a_process_that_cannot_leave_sched_idle_never_takes_it(self):
        # An unprivileged process (hookd's unit: DynamicUser, no capabilities, RLIMIT_NICE 0) may take
        # SCHED_IDLE but not leave it (sched(7)). A preparing thread stuck there would hold the GIL at idle
        # priority whenever it prepares, and any busy process on the core (an ffmpeg job) could starve every
        # thread of hookd. There the answers are made after the COMMIT as before, and no thread of the store
        # takes SCHED_IDLE. Run in a process of its own, unprivileged: RLIMIT_NICE 0, and not root.
        answered, errors, policies = run_unprivileged("""
            def policies():
                seen = set()
                for t in threading.enumerate():
                    try:
                        seen.add(os.sched_getscheduler(t.native_id or 0))
                    except ProcessLookupError:  # ended meanwhile
                        pass
                return seen
            taken = set()
            for group in range(5):  # each: the writer held, 16 requests queued behind it, one group of 16
                store.write_soon(lambda conn: time.sleep(0.05))
                for i in range(16):
                    store.submit_events("p", [{"dedupe_key": "k%d.%d" % (group, i), "body": b"{}"}], then=Then())
                deadline = time.monotonic() + 30
                while len(answered) < 16 * (group + 1) and time.monotonic() < deadline:
                    taken |= policies()
                    time.sleep(0.001)
            taken |= policies()
            store.close()
            print(json.dumps([len(answered), sorted({repr(e) for e in answered}), sorted(taken)]))
            """)
        self.assertEqual((answered, errors), (80, ["None"]))
        self.assertNotIn(os.SCHED_IDLE, policies)

    def test_a_thread_that_cannot_start_leaves_the_answers_to_the_writer(self):
        # Review R2: the first group of PREPARE_AT answers starts a thread (the SCHED_IDLE probe, then the
        # preparing thread). When none can start (the unit's TasksMax reached by a command that forks,
        # RLIMIT_NPROC, memory) the writer must not die with its transaction open: that group and every
        # later request are answered, after the COMMIT as without preparing. Unprivileged (root ignores
        # RLIMIT_NPROC), with RLIMIT_NPROC at the tasks its user has, then lifted.
        blocked, answered, errors, died = run_unprivileged("""
            died = []
            threading.excepthook = lambda args: died.append("%s in %s" % (args.exc_type.__name__, args.thread.name))
            def tasks_of(uid):
                n = 0
                for pid in filter(str.isdigit, os.listdir("/proc")):
                    try:
                        for tid in os.listdir("/proc/%s/task" % pid):
                            with open("/proc/%s/task/%s/status" % (pid, tid)) as f:
                                n += any(line.split()[:2] == ["Uid:", str(uid)] for line in f)
                    except OSError:
                        pass
                return n
            soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
            resource.setrlimit(resource.RLIMIT_NPROC, (tasks_of(os.getuid()), hard))
            try:
                threading.Thread(target=lambda: None).start()
                blocked = False
            except RuntimeError:
                blocked = True
            store.write_soon(lambda conn: time.sleep(0.05))  # the writer held: 16 requests queue behind it
            for i in range(16):
                store.submit_events("p", [{"dedupe_key": "k%d" % i, "body": b"{}"}], then=Then())
            deadline = time.monotonic() + 10
            while len(answered) < 16 and time.monotonic() < deadline:
                time.sleep(0.01)
            resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
            store.submit_events("p", [{"dedupe_key": "after", "body": b"{}"}], then=Then())
            deadline = time.monotonic() + 10
            while len(answered) < 17 and time.monotonic() < deadline:
                time.sleep(0.01)
            print(json.dumps([blocked, len(answered), sorted({repr(e) for e in answered}), died]))
            os._exit(0)
            """)
        self.assertTrue(blocked, "a thread could still start under RLIMIT_NPROC: nothing tested")
        self.assertEqual((answered, errors, died), (17, ["None"], []))

    def test_the_wal_is_copied_by_the_commits_when_no_thread_can_copy_it_ahead(self):
        # Where the thread that copies the WAL ahead cannot start (RLIMIT_NPROC, as above), every request
        # is still answered and sqlite's automatic checkpoint copies the WAL, as before that thread.
        blocked, answered, sent, errors, died, grew = run_unprivileged("""
            died = []
            threading.excepthook = lambda args: died.append("%s in %s" % (args.exc_type.__name__, args.thread.name))
            soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
            resource.setrlimit(resource.RLIMIT_NPROC, (1, hard))  # under what the user has already
            try:
                threading.Thread(target=lambda: None).start()
                blocked = False
            except RuntimeError:
                blocked = True
            before, i = os.path.getsize(store.path), 0
            while os.path.getsize(store.path) == before and i < 3000:  # until a checkpoint copies the WAL
                i += 1
                store.submit_events("p", [{"dedupe_key": "k%d" % i, "body": b"x" * 1500}], then=Then())
            deadline = time.monotonic() + 10
            while len(answered) < i and time.monotonic() < deadline:
                time.sleep(0.01)
            print(json.dumps([blocked, len(answered), i, sorted({repr(e) for e in answered}), died,
                              os.path.getsize(store.path) > before]))
            os._exit(0)
            """)
        self.assertTrue(blocked, "a thread could still start under RLIMIT_NPROC: nothing tested")
        self.assertEqual((answered, errors, died, grew), (sent, ["None"], [], True))

    def hold_two_groups(self):
        """Group 1 (committed by this caller's thread, the writer being idle) holds the connection until
        ``go[0]``; what is submitted meanwhile with ``fn2`` first is group 2, held inside ``fn2`` until
        ``go[1]``. Returns (the go events, fn2, a function that waits until group 2 is inside fn2)."""
        inside, go = [threading.Event(), threading.Event()], [threading.Event(), threading.Event()]

        def hold(i):
            def fn(conn):
                inside[i].set()
                self.assertTrue(go[i].wait(30))
            return fn
        threading.Thread(target=self.store.write, args=(hold(0),), daemon=True).start()
        self.assertTrue(inside[0].wait(30))
        return go, hold(1), lambda: self.assertTrue(inside[1].wait(30))

    def visible(self, route):
        conn = sqlite3.connect(self.path)  # a fresh connection sees only what is committed
        try:
            return conn.execute("SELECT count(*) FROM events WHERE route=?", (route,)).fetchone()[0]
        finally:
            conn.close()

    def answered_group(self, route, n, hold=0.0):
        """Commit ``n`` requests of ``route`` as one group on the writer thread (queued while a write held
        the connection), its answers taking ``hold`` seconds; returns {name: the commit count its answer
        saw}, filled as answers run."""
        seen = {}
        go = self.hold_two_groups()[0]

        def then(i):
            def answer(result, error):
                time.sleep(hold if i == 0 else 0)
                seen.setdefault("%s%d" % (route, i), self.store.groups)
            return answer
        for i in range(n):
            self.store.submit_events(route, [row("%s%d" % (route, i))], then=then(i))
        go[0].set()
        self.wait_for(lambda: len(seen) == n)
        return seen

    def wait_for(self, cond, seconds=30):
        deadline = time.monotonic() + seconds
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.005)
        return cond()

    def test_the_next_group_waits_for_the_clients_answered_by_the_one_before(self):
        # Three requests answered in one group: their clients usually send again at once, so the writer
        # waits for three requests before it commits again (GATHER_GAP set long here: it waits as long as
        # they keep coming, and at most twice as long as the group before took: 5 s of answers here). The old
        # writer committed the first one that came alone.
        self.assert_one_group_of_late_clients(hold=5.0, late=0.3)

    def assert_one_group_of_late_clients(self, hold, late):
        """Three requests answered in one group (its first answer taking ``hold`` seconds); one of their
        clients sends again at once, the other two ``late`` seconds later: the three make one group
        (GATHER_GAP set long here: only the bound or the third request ends the writer's wait)."""
        store_module.GATHER_GAP, gap = 30.0, store_module.GATHER_GAP
        self.addCleanup(setattr, store_module, "GATHER_GAP", gap)
        first = self.answered_group("a", 3, hold=hold)
        self.assertEqual(len(set(first.values())), 1, first)
        seen = {}
        self.store.submit_events("b", [row("b0")], then=lambda r, e: seen.setdefault("b0", self.store.groups))
        self.assertFalse(self.wait_for(lambda: seen, late), "b0 was committed before the others came")
        for i in (1, 2):
            self.store.submit_events("b", [row("b%d" % i)],
                                     then=lambda r, e, i=i: seen.setdefault("b%d" % i, self.store.groups))
        self.assertTrue(self.wait_for(lambda: len(seen) == 3))
        self.assertEqual(set(seen.values()), {set(first.values()).pop() + 1}, seen)
        self.assertEqual(self.visible("b"), 3)

    def test_the_next_group_also_waits_for_the_clients_answered_by_the_one_before(self):
        # Two requests (a) are committed in one group while two others (b) are queued; a's clients send
        # again once answered. The next group takes b and a's new requests together: one group of the
        # four clients. The old writer waited only for as many as it had answered (two), found b queued
        # already and committed b alone, then a's requests alone: split in two halves for good, each
        # request waiting for the other half's commit before its own. (GATHER_GAP set long, and a's first
        # answer takes 2 s, so the writer may wait that long: only the four requests end its wait.)
        store_module.GATHER_GAP, gap = 30.0, store_module.GATHER_GAP
        self.addCleanup(setattr, store_module, "GATHER_GAP", gap)
        go = self.hold_two_groups()[0]
        inside, release, seen = threading.Event(), threading.Event(), {}

        def hold(conn):
            inside.set()
            self.assertTrue(release.wait(30))
        self.store.write_soon(hold)

        def then(name):
            def answer(result, error):
                time.sleep(2.0 if name == "a0" else 0)
                seen.setdefault(name, self.store.groups)
            return answer
        for name in ("a0", "a1"):
            self.store.submit_events("a", [row(name)], then=then(name))
        go[0].set()
        self.assertTrue(inside.wait(30))
        for name in ("b0", "b1"):
            self.store.submit_events("b", [row(name)], then=then(name))
        release.set()
        self.assertTrue(self.wait_for(lambda: "a0" in seen and "a1" in seen))
        for name in ("a2", "a3"):
            self.store.submit_events("a", [row(name)], then=then(name))
        self.assertTrue(self.wait_for(lambda: len(seen) == 6))
        self.assertEqual({seen[n] for n in ("b0", "b1", "a2", "a3")}, {seen["a0"] + 1}, seen)

    def test_the_next_group_waits_for_late_clients_up_to_twice_the_time_the_one_before_took(self):
        # The group before took ~1 s (its first answer 1 s); its clients' requests come at 0 s and 1.5 s
        # after it: one group, since the writer waits up to twice that time for them (GATHER_GAP set long:
        # only the bound or the third request ends the wait). The old writer waited once that time and
        # committed the first request alone at ~1 s.
        self.assert_one_group_of_late_clients(hold=1.0, late=1.5)

    def test_the_wait_for_the_next_group_is_bounded_even_while_requests_keep_coming(self):
        # Senders that never pause (here: a gap longer than the test, so every arrival counts as "still
        # coming") must not hold a request until the group before's size is reached: the writer waits
        # at most GATHER_MOST (2) times as long as that group took. The old writer waited as long as
        # requests came.
        store_module.GATHER_GAP, gap = 60.0, store_module.GATHER_GAP
        self.addCleanup(setattr, store_module, "GATHER_GAP", gap)
        self.answered_group("a", 3)
        seen = []
        self.store.submit_events("b", [row("b0")], then=lambda r, e: seen.append(r[0][1] if r else e))
        self.assertTrue(self.wait_for(lambda: seen, 20), "b0 waited for requests that did not come")
        self.assertEqual((seen, self.visible("b")), (["new"], 1))

    def test_the_wait_for_the_next_group_ends_at_twice_the_time_the_one_before_took(self):
        # The group before took ~1 s (its first answer 1 s); only one of its three clients sends again and
        # GATHER_GAP is set long, so only the bound ends the wait: b0 is committed about 2 s after that
        # group, neither at once 1 s (a bound of once that time) nor much later (a looser bound).
        store_module.GATHER_GAP, gap = 60.0, store_module.GATHER_GAP
        self.addCleanup(setattr, store_module, "GATHER_GAP", gap)
        self.answered_group("a", 3, hold=1.0)
        start, seen = time.monotonic(), []
        self.store.submit_events("b", [row("b0")], then=lambda r, e: seen.append(time.monotonic() - start))
        self.assertTrue(self.wait_for(lambda: seen, 5.0), "b0 waited past twice the group before's time")
        self.assertGreater(seen[0], 1.5, "b0 was committed before twice the group before's time")
        self.assertEqual(self.visible("b"), 1)

    def test_the_first_look_waits_as_long_as_the_clients_took_to_come_the_time_before(self):
        # 16 clients answered in one group came back one every 50 ms (GATHER_GAP set to 0.3 s here: a
        # pace of a sixth of it); the next time, after the first of them, they pause 0.7 s and then come
        # at once. The writer's first look comes after about as long as the 16 took the time before
        # (x GATHER_SLACK, ~1.0 s), so the pause ends inside it: one group. The old writer looked first
        # after GATHER_GAP, saw the first request, found nothing new at the next look (0.6 s) and
        # committed it alone. (Each group's first answer takes 1 s, so the bound ends no wait.)
        c = self.clients_after_a_paced_gather(pace=0.05)
        self.assertEqual(len(set(c.values())), 1, c)

    def test_the_first_look_stays_gather_gap_after_clients_that_came_slowly(self):
        # As above, but the clients came back one every 0.1 s the time before (a third of GATHER_GAP:
        # slower than GATHER_GAP/4): the writer's first look stays GATHER_GAP, so a pause after the first
        # of them still ends the group without the others (an independent sender's request waits no
        # longer than it did).
        c = self.clients_after_a_paced_gather(pace=0.1)
        self.assertEqual(sorted(c.values()).count(c["c0"]), 1, c)

    def clients_after_a_paced_gather(self, pace, n=16):
        """Commit ``n`` requests (a) in one group; their clients (b) come back one every ``pace``
        seconds, and once answered (c) again: the first at once, the others 0.7 s later, together.
        Returns {c's names: the commit count their answers saw}, after checking b made one group."""
        store_module.GATHER_GAP, gap = 0.3, store_module.GATHER_GAP
        self.addCleanup(setattr, store_module, "GATHER_GAP", gap)
        self.answered_group("a", n, hold=1.0)
        seen = {}

        def then(name):
            def answer(result, error):
                time.sleep(1.0 if name == "b0" else 0)
                seen.setdefault(name, self.store.groups)
            return answer
        for i in range(n):
            time.sleep(pace)  # the clients' pace, which the writer learns
            self.store.submit_events("b", [row("b%d" % i)], then=then("b%d" % i))
        self.assertTrue(self.wait_for(lambda: len(seen) == n))
        self.assertEqual(len(set(seen.values())), 1, seen)
        self.store.submit_events("c", [row("c0")], then=then("c0"))
        time.sleep(0.7)  # the pause: longer than two looks GATHER_GAP apart
        for i in range(1, n):
            self.store.submit_events("c", [row("c%d" % i)], then=then("c%d" % i))
        self.assertTrue(self.wait_for(lambda: len(seen) == 2 * n))
        self.assertEqual(self.visible("c"), n)
        return {name: group for name, group in seen.items() if name.startswith("c")}

    def test_a_client_that_does_not_send_again_does_not_hold_the_others(self):
        # Only one of the three clients comes back: the writer stops waiting once nothing came for
        # GATHER_GAP and commits it.
        self.answered_group("a", 3)
        seen = []
        self.store.submit_events("b", [row("b0")], then=lambda r, e: seen.append(r[0][1] if r else e))
        self.assertTrue(self.wait_for(lambda: seen))
        self.assertEqual((seen, self.visible("b")), (["new"], 1))

    def test_a_failing_next_group_does_not_touch_the_answers_of_the_committed_one(self):
        order = []
        go, fn2, entered = self.hold_two_groups()
        self.store.write_soon(fn2)
        self.store.submit_events("a", [row("a")], then=lambda r, e: order.append(("a", r[0][1] if r else e)))
        go[0].set()
        entered()
        pages = self.store.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        self.store.write_soon(lambda c: c.execute("PRAGMA max_page_count=%d" % (pages + 2)))
        self.store.submit_events("b", [row("b", b"x" * 200000)], then=lambda r, e: order.append(("b", r or e)))
        go[1].set()
        deadline = time.monotonic() + 30
        while len(order) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        self.assertEqual(order[0], ("a", "new"))
        self.assertIsInstance(order[1][1], StoreError)
        self.assertEqual((self.visible("a"), self.visible("b")), (1, 0))
        self.store.write(lambda c: c.execute("PRAGMA max_page_count=1073741823"))

    def test_a_wal_grown_by_a_burst_is_cut_back(self):
        # One large request makes the WAL file large; once the WAL starts over it is cut back.
        self.store.add_events("b", [row("big", b"z" * (3 * WAL_KEEP_BYTES))])
        wal = self.path + "-wal"
        self.assertGreater(os.path.getsize(wal), 3 * WAL_KEEP_BYTES)
        deadline, i = time.monotonic() + 30, 0
        while os.path.getsize(wal) > WAL_KEEP_BYTES and time.monotonic() < deadline:
            i += 1
            self.store.add_events("b", [row("small%d" % i)])
            time.sleep(0.01)
        self.assertLessEqual(os.path.getsize(wal), WAL_KEEP_BYTES)

    def assert_the_wal_is_copied_ahead(self, frames=CHECKPOINT_AHEAD + 10):
        """Fills the WAL to ``frames`` frames: the database file grows before the WAL reaches the
        automatic checkpoint's line."""
        before, i = os.path.getsize(self.path), 0
        while wal_frames(self.path) < frames:
            i += 1
            self.store.add_events("r", [row("k%d" % i, b"x" * 1500)])
        deadline = time.monotonic() + 30
        while os.path.getsize(self.path) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertLess(wal_frames(self.path), WAL_CHECKPOINT_PAGES, "the automatic checkpoint ran: nothing tested")
        self.assertGreater(os.path.getsize(self.path), before)

    def test_the_wal_is_copied_ahead_of_the_automatic_checkpoint(self):
        # The automatic checkpoint runs inside the COMMIT that crosses WAL_CHECKPOINT_PAGES and holds that
        # group's answers while it copies the whole WAL (the p99 at 16 connections): from CHECKPOINT_AHEAD
        # frames on, a thread of the store's own copies them meanwhile, so the database file grows before
        # the WAL reaches the automatic checkpoint's line.
        self.assert_the_wal_is_copied_ahead()

    def test_the_wal_is_copied_a_few_hundred_frames_at_a_time(self):
        # Each copy ends with an fsync of the database, which the writer's fdatasync of the WAL waits behind
        # on the same disk: copies of 800 frames slowed the commits beside them 2-3 times at 16
        # connections (the p99), copies of 200 barely. So the database grows before the WAL holds 300.
        self.assert_the_wal_is_copied_ahead(300)

    def test_the_wal_starts_over_short_of_the_automatic_checkpoint(self):
        # The COMMIT that crosses WAL_CHECKPOINT_PAGES ran sqlite's automatic checkpoint, which copied what
        # the copies ahead had left (~170 frames at 16 connections, 1.5-1.9 ms against 0.4: the slowest 1 %)
        # and let the WAL start over. Past RESTART_FROM the last few frames are copied right after a COMMIT
        # and the next BEGIN waits for that copy: with senders that keep the writer busy (a copy beside
        # them never finds the WAL all copied), the WAL starts over again and again before that line, so
        # its file never holds WAL_CHECKPOINT_PAGES frames.
        stop, died = threading.Event(), []

        def send(n):
            i = 0
            try:
                while not stop.is_set():
                    i += 1
                    self.store.add_events("r", [row("s%d-%d" % (n, i), b"x" * 1500)])
            except Exception as e:
                died.append(e)

        senders = [threading.Thread(target=send, args=(n,)) for n in range(4)]
        for t in senders:
            t.start()
        try:
            deadline = time.monotonic() + 60
            while wal_restarts(self.path) < 3 and time.monotonic() < deadline and not died:
                time.sleep(0.01)
        finally:
            stop.set()
            for t in senders:
                t.join(30)
        self.assertEqual(died, [])
        self.assertGreaterEqual(wal_restarts(self.path), 3, "the WAL did not start over: nothing tested")
        self.assertLess(wal_frames(self.path), WAL_CHECKPOINT_PAGES)

    def test_a_store_opened_again_in_the_process_copies_the_wal_ahead_too(self):
        # Review R2: sqlite deletes the -shm file when its last connection closes; a store opened again on
        # the same path in the same process read the deleted file it had kept open, found nothing behind,
        # and left every copy to the automatic checkpoint.
        self.store.add_events("r", [row("first")])
        self.store.close()
        self.assertFalse(os.path.exists(self.path + "-shm"), "the -shm file is still there: nothing tested")
        self.store = Store(self.path)
        self.assert_the_wal_is_copied_ahead()

    def test_closing_the_store_keeps_the_locks_of_the_wal_index_its_readers_hold(self):
        # Review R1: the -shm descriptor the store reads the WAL's frames from stays open; closing any
        # descriptor of that file would drop every sqlite lock this process holds on it (POSIX record
        # locks), the DMS byte included, and another process would take the index as abandoned and wipe it.
        self.store.add_events("r", [row("k")])
        reader = sqlite3.connect(self.path)
        self.addCleanup(reader.close)
        reader.execute("SELECT count(*) FROM events").fetchone()
        self.store.close()
        probe = ("import fcntl, os, struct, sys\n"
                 "fd = os.open(sys.argv[1], os.O_RDWR)\n"
                 "req = struct.pack('hhqqi', fcntl.F_WRLCK, 0, 128, 1, 0) + bytes(4)\n"
                 "print(struct.unpack('hhqqi', fcntl.fcntl(fd, fcntl.F_GETLK, req)[:28])[0] != fcntl.F_UNLCK)\n")
        out = subprocess.run([sys.executable, "-c", probe, self.path + "-shm"], capture_output=True, text=True)
        self.assertEqual(out.stdout.strip(), "True", out.stderr)

    def test_failing_operation_does_not_sink_its_group(self):
        def bad(conn):
            conn.execute("INSERT INTO no_such_table VALUES (1)")
        with self.assertRaises(sqlite3.OperationalError):
            self.store.write(bad)
        [(eid, st)] = self.store.add_events("r", [row()])
        self.assertEqual(st, "new")

    def test_columns_a_row_leaves_empty_are_stored_as_null(self):
        """The multi-row INSERTs bind an empty column as a NaN (cheaper to bind than None), which sqlite
        must store as NULL: no key in the dedupe index, NULL to every reader."""
        rows = [dict(row(), headers=None, content_type=None), dict(row("k"), element=0, payload='{"a": 1}')]
        (plain, _), (full, _) = self.store.add_events("r", rows)
        [(done, _)] = self.store.add_events("r", [dict(row(), done=True)])
        columns = ("dedupe_key", "serial_key", "headers", "content_type", "element", "payload", "note")
        kinds = self.store.read(lambda c: {i: c.execute("SELECT " + ", ".join("typeof(%s)" % n for n in columns)
                                                        + " FROM events WHERE id=?", (i,)).fetchone()
                                          for i in (plain, full, done)})
        self.assertEqual(kinds[plain], ("null",) * 7)
        self.assertEqual(kinds[full], ("text", "null", "text", "text", "integer", "text", "null"))
        self.assertEqual(kinds[done], ("null", "null", "text", "text", "null", "null", "null"))
        self.assertEqual(self.store.read(lambda c: row_dict(c, done))["note"], store_module.NOTHING_TO_DO)
        self.assertEqual(self.store.read(lambda c: c.execute(
            "SELECT count(*) FROM events INDEXED BY events_dedupe WHERE dedupe_key IS NOT NULL").fetchone()[0]), 1)
        for i in (plain, full):
            self.assertIsNone(self.store.read(lambda c: row_dict(c, i))["serial_key"])

    def stored_in_one_group(self, requests):
        """Store ``requests`` (each a list of rows) as one group in a new store: (their results, every row of
        events and request_bodies)."""
        other = Store(os.path.join(self.tmp.name, "group%d.sqlite3" % len(os.listdir(self.tmp.name))))
        try:
            answered = []
            with other._committing:  # the writer takes them all as one group once this is let go
                ops = [other.submit_events("r", rows, now=5.0, then=lambda result, error: answered.append(error))
                       for rows in requests]
            deadline = time.monotonic() + 30
            while len(answered) < len(ops) and time.monotonic() < deadline:
                time.sleep(0.01)
            self.assertEqual((answered, other.groups), ([None] * len(ops), 1))
            return [op.result for op in ops], stored_rows(other)
        finally:
            other.close()

    def test_requests_of_one_shape_are_stored_as_by_the_general_path(self):
        """A group whose requests have one shape (a request alone in its group, as at 1 connection, or
        deliveries of one kind) goes in with a statement of that shape that binds only the values its rows
        have (``_store_alike``); its rows must be what the general path stores for a group of requests of
        several shapes, column for column, redeliveries included."""
        requests = [batch("E", ["x", "y", "z"]), [row("k", b'{"a": 1}')], [dict(row(None, b"{}"), done=True)],
                    [dict(row("p", serial="s"), element=3, payload='{"p": 1}'), dict(row(), headers=None)],
                    [dict(r, done=True) for r in batch("F", ["x"])], batch("E", ["x", "q", "z", "w"]),
                    [row("k", b'{"a": 2}')], [dict(row(None, b"b" * (store_module.ROW_BODY_BYTES + 1)))], []]
        alone = [self.store.add_events("r", rows, now=5.0) for rows in requests]
        self.assertEqual(self.stored_in_one_group(requests), (alone, stored_rows(self.store)))
        self.assertEqual(len(stored_rows(self.store)[0]), 3 + 1 + 1 + 2 + 1 + 4 + 1 + 1)
        alike = [batch(e, ["x", "y", e]) for e in "GHIJ"]
        redelivered = alike + [batch("G", ["x", "y", "G"]), batch("K", ["x", "y", "K"])]
        many = [batch("M%d" % i, ["x", "y", "z", str(i)]) for i in range(20)]  # 80 rows: more than a statement's
        for i, group in enumerate((many, alike, redelivered)):
            self.store.close()
            self.store = Store(os.path.join(self.tmp.name, "alone%d.sqlite3" % i))
            alone = [self.store.add_events("r", rows, now=5.0) for rows in group]
            self.assertEqual(self.stored_in_one_group(group), (alone, stored_rows(self.store)))
        self.assertEqual(alone[4], [(event_id, "duplicate") for event_id, _ in alone[0]])

    def test_a_shape_keeps_a_statement_per_binary_digit_of_its_groups(self):
        """A group of n requests of one shape goes in with one statement per binary digit of n (8 + 4 + 1
        for 13), as the general path does, so a shape keeps at most 7 statement texts (and sqlite3 as many
        prepared statements), not one for every n up to 64: those cost ~3 MB of RSS at 64 connections.
        The rows are still what the general path stores."""
        for n in (13, 23):
            group = [[row("n%d-%d" % (n, i), b'{"i": %d}' % i)] for i in range(n)]
            self.store.close()
            self.store = Store(os.path.join(self.tmp.name, "digits%d.sqlite3" % n))
            alone = [self.store.add_events("r", rows, now=5.0) for rows in group]
            self.assertEqual(self.stored_in_one_group(group), (alone, stored_rows(self.store)))
        self.assertLessEqual({count for _, count in store_module._SHAPED}, set(store_module.CHUNKS))

    def test_a_requests_body_is_kept_in_its_first_event_row(self):
        """A request's body goes into its first event row, which the request's other rows name: one table
        (and one B-tree page to the WAL) less a commit than a row in request_bodies, where every body went
        before. Every reader takes it from there: the row, a claim, a replay, a search."""
        ids = [i for i, _ in self.store.add_events("r", batch("E", ["x", "y", "z"]))]
        [(alone, _)] = self.store.add_events("r", [row("k", b'{"alone": 1}')])
        self.assertEqual(self.store.read(lambda c: c.execute("SELECT count(*) FROM request_bodies").fetchone()[0]), 0)
        held = self.store.read(lambda c: c.execute(
            "SELECT id, body IS NOT NULL, body_row FROM events ORDER BY id").fetchall())
        self.assertEqual(held, [(ids[0], 1, ids[2]), (ids[1], 0, ids[0]), (ids[2], 0, ids[0]), (alone, 1, None)])
        body = batch("E", ["x", "y", "z"])[0]["body"]
        for event_id in ids:
            self.assertEqual(self.store.read(lambda c: row_dict(c, event_id, with_body=True))["body"], body)
        self.assertEqual(self.store.claim(ids[2], now=1.0)["body"], body)
        copy = self.store.replay(ids[1])
        self.assertEqual(self.store.read(lambda c: row_dict(c, copy, with_body=True))["body"], body)
        self.assertEqual([e["id"] for e in self.store.read(lambda c: list_events(c, text='"z"'))], [copy] + ids[::-1])
        self.assertEqual([e["id"] for e in self.store.read(lambda c: list_events(c, text="alone"))], [alone])

    def test_a_requests_other_rows_keep_no_headers_and_every_reader_gives_them(self):
        """A request's headers and content type are kept once, on the row holding its body; the rows that
        name that row keep none (at 1 connection fewer bytes a delivery grow the file by fewer pages a
        commit). Every reader gives each row its request's: the row, a claim, a replay, and the row that
        takes the body over when the first one turns out a duplicate of a stored element."""
        headers, kind = '{"x-a": "1"}', "text/x"
        def delivery(elements):
            return [dict(r, headers=headers, content_type=kind) for r in batch("E", elements)]
        ids = [i for i, _ in self.store.add_events("r", delivery(["x", "y", "z"]))]
        stored = self.store.read(lambda c: c.execute(
            "SELECT headers, content_type FROM events ORDER BY id").fetchall())
        self.assertEqual(stored, [(headers, kind), (None, None), (None, None)])
        for event_id in ids:
            event = self.store.read(lambda c: row_dict(c, event_id))
            self.assertEqual((event["headers"], event["content_type"]), (headers, kind))
        claimed = self.store.claim(ids[2], now=1.0)
        self.assertEqual((claimed["headers"], claimed["content_type"]), (headers, kind))
        copy = self.store.replay(ids[1])
        self.assertEqual(self.store.read(lambda c: c.execute(
            "SELECT headers, content_type FROM events WHERE id=?", (copy,)).fetchone()), (headers, kind))
        again = self.store.add_events("r", delivery(["x", "v", "w"]))  # the first element is a duplicate
        self.assertEqual(again[0], (ids[0], "duplicate"))
        for event_id, _ in again[1:]:
            event = self.store.read(lambda c: row_dict(c, event_id, with_body=True))
            self.assertEqual((event["headers"], event["content_type"], event["body"]),
                             (headers, kind, delivery(["x", "v", "w"])[0]["body"]))
        body = b'{"events": [1, 2]}'  # one body, different headers: each row keeps its own
        mixed = self.store.add_events("r", [dict(row(None, body), headers='{"x-b": "2"}'),
                                            dict(row(None, body), headers=None, content_type=None)])
        self.assertEqual([self.store.read(lambda c: row_dict(c, i))["headers"] for i, _ in mixed],
                         ['{"x-b": "2"}', None])
        self.assertIsNone(self.store.read(lambda c: row_dict(c, mixed[1][0]))["content_type"])

    def test_a_row_stored_done_keeps_no_note_and_readers_show_why_it_is_done(self):
        """A row stored done at intake (nothing to do for its route) keeps no note: every row of a
        store-only route would repeat the same 51 bytes. The readers show it (a row, the list), and only
        for a row done without an attempt: a job that ends done without a note shows none."""
        [(done, _)] = self.store.add_events("r", [dict(row("d"), done=True)])
        [(ran, _)] = self.store.add_events("r", [row("q")])
        self.store.claim(ran, now=1.0)
        self.store.finish(ran, "r", "done", now=1.0)
        self.assertEqual(self.store.read(lambda c: c.execute("SELECT note FROM events WHERE id=?", (done,))
                                         .fetchone()[0]), None)
        self.assertEqual(self.store.read(lambda c: row_dict(c, done))["note"], store_module.NOTHING_TO_DO)
        self.assertIsNone(self.store.read(lambda c: row_dict(c, ran))["note"])
        notes = {e["id"]: e["note"] for e in self.store.read(lambda c: list_events(c))}
        self.assertEqual(notes, {done: store_module.NOTHING_TO_DO, ran: None})

    def test_prune_keeps_the_row_holding_a_body_while_a_row_of_its_request_needs_it(self):
        """A batch delivery's first row holds the body of its other rows: prune takes the done ones but
        keeps that row, done and old, while one of the others still waits (its job needs the body), and
        takes it once they are all gone. A request whose rows span several of prune's reads
        (IDS_PER_READ, EVENTS_PER_DELETE lowered) still goes whole in one prune."""
        saved = (store_module.IDS_PER_READ, store_module.EVENTS_PER_DELETE)
        self.addCleanup(lambda: (setattr(store_module, "IDS_PER_READ", saved[0]),
                                 setattr(store_module, "EVENTS_PER_DELETE", saved[1])))
        store_module.IDS_PER_READ, store_module.EVENTS_PER_DELETE = 2, 1
        ids = [i for i, _ in self.store.add_events("r", batch("E", ["a", "b", "c", "d"]), now=5.0)]
        body = batch("E", ["a", "b", "c", "d"])[0]["body"]
        for event_id in ids[:2] + ids[3:]:
            self.store.claim(event_id, now=6.0)
            self.store.finish(event_id, "r", "done", now=6.0)
        self.store.add_events("r", [row("newest")], now=5 * 86400)
        self.assertEqual(self.store.prune(days=1, now=3 * 86400), 2)
        left = self.store.read(lambda c: [r[0] for r in c.execute("SELECT id FROM events ORDER BY id")])
        self.assertEqual(left[:2], [ids[0], ids[2]], "the first row stays while the third waits")
        self.assertEqual(self.store.claim(ids[2], now=7.0)["body"], body)
        self.store.finish(ids[2], "r", "done", now=7.0)
        self.assertEqual(self.store.prune(days=1, now=3 * 86400), 2)
        self.assertEqual(self.store.read(bodies_stored), [b"{}"], "only the newest request's body is left")
        many = [i for i, _ in self.store.add_events("r", batch("F", list("abcde")), now=6 * 86400)]
        for event_id in many:
            self.store.claim(event_id, now=6 * 86400)
            self.store.finish(event_id, "r", "done", now=6 * 86400)
        self.store.add_events("r", [row("newer")], now=9 * 86400)
        self.assertEqual(self.store.prune(days=1, now=9 * 86400), 5, "the five rows, in one prune")

    def test_a_body_shared_by_many_events_is_stored_once(self):
        body = b'{"events": ["%s"]}' % (b"x" * 5000)
        ids = self.store.add_events("r", [row("a", body), row("b", body), row("c", body)], now=0.5)
        self.assertEqual(len(ids), 3)
        n = self.store.read(lambda c: c.execute("SELECT count(*), sum(length(data)) FROM request_bodies").fetchone())
        self.assertEqual(n, (1, len(body)))
        for eid, _ in ids:
            self.assertEqual(self.store.read(lambda c: row_dict(c, eid, with_body=True))["body"], body)
        for eid, _ in ids:
            self.store.claim(eid, now=1.0)
            self.store.finish(eid, "r", "done", now=1.0)
        self.store.prune(days=1, now=3 * 86400)
        stored = lambda: self.store.read(lambda c: [r[0] for r in c.execute("SELECT data FROM request_bodies")])  # noqa: E731
        self.assertEqual(stored(), [body], "the newest body stays while it is the newest: the next body"
                                           " would get its id, and a prune deleting it then would lose it")
        later = b"later" * store_module.ROW_BODY_BYTES  # over the bound too: request_bodies' newest
        self.store.add_events("r", [row("d", later)], now=3 * 86400)
        self.store.prune(days=1, now=3 * 86400)
        self.assertEqual(stored(), [later])

    def test_done_rows_cost_no_entry_in_the_due_index(self):
        """A route with nothing to do stores its rows done; they are never looked up by status, so
        events_due leaves them out (one page less per commit at 1 connection): only the rows still
        waiting, and a done row that becomes waiting again, have an entry."""
        done = dict(row(), done=True)
        self.store.add_events("r", [dict(done, dedupe_key="d%d" % i) for i in range(40)])
        [(waiting, _)] = self.store.add_events("r", [row("w")])
        self.assertEqual(due_index_entries(self.store), 1)
        self.store.claim(waiting)
        self.store.finish(waiting, "r", "done")
        self.assertEqual(due_index_entries(self.store), 0)
        self.store.replay(waiting)
        self.assertEqual(due_index_entries(self.store), 1)

    def test_every_query_for_waiting_events_uses_an_index(self):
        """sqlite uses the partial events_due only for a query whose WHERE holds the index's own term: each
        statement that finds events by a status other than done (due, next due, the waiting counts, a claim's
        serial check, leases, crash recovery, the queue_size count, retrying the dead, the console's lists,
        Camio's pending tasks) is run here with a trace, and none of them may scan the events table."""
        from handlers import camio
        from hookd_core import leases, store as store_mod
        seen = []
        self.store._conn.set_trace_callback(seen.append)
        self.store.read(lambda c: c.set_trace_callback(seen.append))
        self.store.add_events("r", [dict(row(), done=True)])
        [(a, _), (b, _)] = self.store.add_events("r", [row("a", serial="s"), row("b", serial="s")], limit=10)
        self.store.due(time.time())
        self.store.next_due()
        self.store.recount()
        self.store.claim(a)
        self.store.finish(a, "r", "dead", error="x")
        self.store.retry(all_dead=True)
        self.store.lease(["r"], 2, 30, "w1")
        self.store.requeue_running()
        self.store.read(lambda c: (store_mod.oldest_queued(c), list_events(c, status="dead"),
                                   leases._due(c, ["r"], time.time()), camio.pending_tasks(c, "r")))
        self.store._conn.set_trace_callback(None)
        self.store.read(lambda c: c.set_trace_callback(None))
        by_status = [sql for sql in seen if "events" in sql and "status" in sql.split("WHERE", 1)[-1]
                     and not sql.lstrip().upper().startswith("INSERT")]
        self.assertGreaterEqual(len(by_status), 12, by_status)
        for sql in by_status:
            plan = self.store.read(lambda c: [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + sql)])
            self.assertFalse([p for p in plan if p in ("SCAN events", "SCAN e")], (sql, plan))

    def hold_writes(self):
        """Hold the writer inside a write until the returned function is called, so what is submitted
        meanwhile commits as one group."""
        held, go = threading.Event(), threading.Event()

        def hold(conn):
            held.set()
            go.wait(10)
        blocker = threading.Thread(target=self.store.write, args=(hold,))
        blocker.start()
        self.assertTrue(held.wait(10))

        def release():
            go.set()
            blocker.join(10)
        return release

    def test_duplicates_inside_one_group_and_one_request(self):
        """Keys repeated inside one request and across the requests of one group: the first row wins,
        every later one is a duplicate row pointing at it, and a request that brought nothing new
        leaves no body behind."""
        [(old, _)] = self.store.add_events("r", [row("old")])
        release = self.hold_writes()
        ops = [self.store.submit_events("r", [row("a", b"1"), row("a", b"1")]),
               self.store.submit_events("r", [row("a", b"2"), row("b", b"2")]),
               self.store.submit_events("r", [row("old", b"3"), row("b", b"3")]),
               self.store.submit_events("r", [row(None, b"4"), row("c", b"4")])]
        groups = self.store.groups
        release()
        results = [op.wait() for op in ops]
        self.assertEqual(self.store.groups, groups + 2, "the four requests shared one commit")
        a, b = results[0][0][0], results[1][1][0]
        self.assertEqual(results, [[(a, "new"), (a, "duplicate")], [(a, "duplicate"), (b, "new")],
                                   [(old, "duplicate"), (b, "duplicate")],
                                   [(results[3][0][0], "new"), (results[3][1][0], "new")]])
        stored = self.store.read(lambda c: c.execute(
            "SELECT status, duplicate_of, dedupe_key FROM events ORDER BY id").fetchall())
        self.assertEqual(stored, [("queued", None, "old"), ("queued", None, "a"), ("duplicate", a, None),
                                  ("duplicate", a, None), ("queued", None, "b"), ("duplicate", old, None),
                                  ("duplicate", b, None), ("queued", None, None), ("queued", None, "c")])
        self.assertEqual(self.store.waiting("r"), 5)
        self.assertEqual(self.store.read(bodies_stored), [b"{}", b"1", b"2", b"4"],
                         "the all-duplicate request stored no body")
        for event_id, body in ((a, b"1"), (b, b"2"), (results[3][1][0], b"4")):
            self.assertEqual(self.store.read(lambda c: row_dict(c, event_id, with_body=True))["body"], body)

    def test_route_limit_does_not_count_a_redeliverys_duplicates(self):
        """queue_size counts what will wait: a redelivery committed in the same group as a new request adds
        nothing, so the new one fits (it was refused, 503, "2 events waiting" while 1 waited), and the
        next one over the limit is refused with the true count."""
        from hookd_core.api import Busy
        self.store.add_events("r", [row("old")])
        release = self.hold_writes()
        ops = [self.store.submit_events("r", [row("old")], limit=2),
               self.store.submit_events("r", [row("new")], limit=2),
               self.store.submit_events("r", [row("newer")], limit=2)]
        release()
        self.assertEqual(ops[0].wait()[0][1], "duplicate")
        self.assertEqual(ops[1].wait()[0][1], "new")
        with self.assertRaisesRegex(Busy, "r has 2 events waiting"):
            ops[2].wait()
        self.assertEqual(self.store.waiting("r"), 2)

    def keys_stored(self, ids):
        return self.store.read(lambda c: [c.execute("SELECT dedupe_key FROM events WHERE id=?", (i,)).fetchone()[0]
                                          for i in ids])

    def test_a_batch_stores_one_key_and_a_redelivery_is_sorted_element_by_element(self):
        """A batch delivery (Preservica's events[]) stores one dedupe key, the delivery's; when that key is
        stored already each element is judged by its own key: one seen under that delivery key (in the
        first delivery, or added by a later one) is a duplicate of it, any other is new, wherever it sits."""
        first = self.store.add_events("r", batch("E", ["x", "y"]))
        self.assertEqual([st for _, st in first], ["new", "new"])
        self.assertEqual(self.keys_stored([i for i, _ in first]), ["d:E", None], "one key for the delivery")
        (x, _), (y, _) = first
        second = self.store.add_events("r", batch("E", ["x", "z"]))
        self.assertEqual(second[0], (x, "duplicate"))
        (z, st) = second[1]
        self.assertEqual(st, "new")
        self.assertRegex(self.keys_stored([z])[0], "^d:E#1:", "an element added by a redelivery keeps its own key")
        third = self.store.add_events("r", batch("E", ["w", "z"]))
        self.assertEqual(third[0][1], "new", "a new element in the first place")
        self.assertEqual(third[1], (z, "duplicate"))
        self.assertEqual(self.store.add_events("r", batch("E", ["x", "y"])), [(x, "duplicate"), (y, "duplicate")])
        self.assertEqual(self.store.add_events("r", batch("F", ["x"]))[0][1], "new", "another envelope")
        stored = self.store.read(lambda c: c.execute(
            "SELECT status, count(*) FROM events GROUP BY status ORDER BY status").fetchall())
        self.assertEqual(stored, [("duplicate", 4), ("queued", 5)])
        self.assertEqual(self.store.waiting("r"), 5)
        self.assertEqual(len(self.store.read(bodies_stored)), 4, "the all-duplicate redelivery kept no body")
        for event_id, element in ((x, "x"), (z, "z"), (third[0][0], "w")):
            ev = self.store.read(lambda c: row_dict(c, event_id, with_body=True))
            self.assertEqual(json.loads(ev["body"])["events"][ev["element"]], element)

    def test_redeliveries_of_a_batch_inside_one_group(self):
        """The same delivery twice and a third one beside it with one element more, all in one group: the
        first stores its elements, the others are duplicates of them except the one element that is new."""
        release = self.hold_writes()
        ops = [self.store.submit_events("r", batch("E", ["x", "y"])),
               self.store.submit_events("r", batch("E", ["x", "y"])),
               self.store.submit_events("r", batch("E", ["x", "y", "z"]))]
        release()
        first, again, more = [op.wait() for op in ops]
        self.assertEqual([st for _, st in first], ["new", "new"])
        self.assertEqual(again, [(first[0][0], "duplicate"), (first[1][0], "duplicate")])
        self.assertEqual(more[:2], again)
        self.assertEqual(more[2][1], "new")
        self.assertEqual(self.store.waiting("r"), 3)
        self.assertRegex(self.keys_stored([more[2][0]])[0], "^d:E#2:")

    def test_route_limit_does_not_count_a_redelivered_batchs_duplicates(self):
        """queue_size counts a redelivered batch's elements as they will be stored: none of an unchanged
        redelivery, so a new request beside it in the same group still fits."""
        from hookd_core.api import Busy
        self.store.add_events("r", batch("E", ["x", "y"]))
        release = self.hold_writes()
        ops = [self.store.submit_events("r", batch("E", ["x", "y"]), limit=4),
               self.store.submit_events("r", batch("E", ["x", "z"]), limit=4),
               self.store.submit_events("r", [row("new")], limit=4),
               self.store.submit_events("r", [row("newer")], limit=4)]
        release()
        self.assertEqual([st for _, st in ops[0].wait()], ["duplicate", "duplicate"])
        self.assertEqual([st for _, st in ops[1].wait()], ["duplicate", "new"])
        self.assertEqual(ops[2].wait()[0][1], "new")
        with self.assertRaisesRegex(Busy, "r has 4 events waiting"):
            ops[3].wait()

    def test_route_limit_is_exact_under_concurrency(self):
        from hookd_core.api import Busy
        outcomes = []

        def add(i):
            try:
                self.store.add_events("cam", [row("c%d" % i)], limit=3)
                outcomes.append("ok")
            except Busy:
                outcomes.append("busy")
        threads = [threading.Thread(target=add, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(outcomes.count("ok"), 3)
        self.assertEqual(outcomes.count("busy"), 17)
        self.assertEqual(self.store.waiting("cam"), 3)

    def test_full_database_is_a_store_error_and_stores_nothing(self):
        # max_page_count makes sqlite answer SQLITE_FULL exactly as a full disk does
        pages = self.store.write(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        self.store.write(lambda c: c.execute("PRAGMA max_page_count=%d" % (pages + 2)))
        with self.assertRaises(StoreError):
            self.store.add_events("r", [row(body=b"x" * 200000)])
        self.assertEqual(self.store.read(lambda c: list_events(c)), [])
        self.assertEqual(self.store.waiting(), 0)
        self.store.write(lambda c: c.execute("PRAGMA max_page_count=1073741823"))
        [(eid, st)] = self.store.add_events("r", [row(body=b"x" * 200000)])
        self.assertEqual(st, "new")


# The schema of every database written before request_bodies (commit 1b2f838 and earlier).
OLD_SCHEMA = """
CREATE TABLE events (id INTEGER PRIMARY KEY, route TEXT NOT NULL, status TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, received_at REAL NOT NULL, updated_at REAL NOT NULL,
  next_at REAL NOT NULL DEFAULT 0, last_error TEXT, note TEXT, dedupe_key TEXT, duplicate_of INTEGER,
  serial_key TEXT, headers TEXT, content_type TEXT, body_hash TEXT, payload TEXT, progress TEXT);
CREATE TABLE bodies (hash TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
CREATE UNIQUE INDEX events_dedupe ON events(route, dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE INDEX events_due ON events(status, next_at);
"""


# events as every database written before bodies moved into event rows has it (a806c22 and earlier, back
# to request_bodies): no body or body_row column; every body in request_bodies.
BODY_ID_SCHEMA = """
CREATE TABLE events (id INTEGER PRIMARY KEY, route TEXT NOT NULL, status TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, received_at REAL NOT NULL, updated_at REAL NOT NULL,
  next_at REAL NOT NULL DEFAULT 0, last_error TEXT, note TEXT, dedupe_key TEXT, duplicate_of INTEGER,
  serial_key TEXT, headers TEXT, content_type TEXT, body_hash TEXT, payload TEXT, progress TEXT,
  body_id INTEGER, element INTEGER);
CREATE TABLE request_bodies (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE UNIQUE INDEX events_dedupe ON events(route, dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE INDEX events_due ON events(status, next_at) WHERE status <> 'done';
"""


class MigrationTest(unittest.TestCase):
    """A database written by the previous schema opens, keeps every event and body, and takes new ones."""

    def test_a_database_is_stamped_with_its_schema_and_a_newer_one_is_refused(self):
        """Since bodies moved into event rows, hookd before that reads them as empty (review R1: rolled
        back, it ran waiting commands with an empty body and stored them done). The database carries its
        schema version (``PRAGMA user_version``), so a rollback from here on is refused at start with one
        clear error instead of running events without their content."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "events.sqlite3")
            Store(path).close()
            db = sqlite3.connect(path)
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], store_module.SCHEMA_VERSION)
            db.execute("PRAGMA user_version=%d" % (store_module.SCHEMA_VERSION + 1))
            db.close()
            with self.assertRaisesRegex(StoreError, "written by a newer hookd"):
                Store(path)
            db = sqlite3.connect(path)  # refused, and left as it was
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], store_module.SCHEMA_VERSION + 1)
            db.close()

    def test_rows_of_schema_1_keep_their_headers_and_notes(self):
        """Schema 1 (before a request's other rows kept no headers and a row stored done no note) wrote
        them on every row: they read as stored, and the database is stamped with this schema, which
        hookd of schema 1 refuses (it would read the new rows' headers as none)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "v1.sqlite3")
            Store(path).close()
            db = sqlite3.connect(path)
            db.execute("PRAGMA user_version=1")
            body = json.dumps({"events": [1, 2]}).encode()
            for eid, body_, body_row, note in ((1, body, 2, "kept"), (2, None, 1, "stored; nothing")):
                db.execute("INSERT INTO events(id, route, status, received_at, updated_at, headers, content_type,"
                           " body, body_row, element, note) VALUES (?, 'r', 'done', 1.0, 1.0, ?, 'text/x', ?, ?, ?,"
                           " ?)", (eid, '{"x-row": "%d"}' % eid, body_, body_row, eid - 1, note))
            db.commit()
            db.close()
            store = Store(path)
            try:
                for eid, note in ((1, "kept"), (2, "stored; nothing")):
                    event = store.read(lambda c: row_dict(c, eid, with_body=True))
                    self.assertEqual((event["headers"], event["content_type"], event["note"], event["body"]),
                                     ('{"x-row": "%d"}' % eid, "text/x", note, body))
                self.assertEqual(store.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0]), 2)
            finally:
                store.close()

    def test_bodies_stored_in_request_bodies_are_read_replayed_deduped_and_pruned(self):
        """A database of the schema before bodies moved into event rows: migrate adds the columns and moves
        nothing. Its bodies still read (a row, a claim, a search); a redelivery of its batch is sorted
        element by element against its rows; a replay of its row shares the old body; prune deletes its
        old rows and the bodies no row needs any more, and keeps the one the replay needs."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "old.sqlite3")
            old = sqlite3.connect(path)
            old.executescript(BODY_ID_SCHEMA)
            delivery = batch("E", ["x", "y"])
            stored = [(1, delivery[0]["body"]), (2, b'{"alone": true}'), (3, b'{"newest": true}')]
            old.executemany("INSERT INTO request_bodies(id, data) VALUES (?, ?)", stored)
            for eid, key, body_id, element, status in ((1, "d:E", 1, 0, "done"), (2, None, 1, 1, "done"),
                                                       (3, "k", 2, None, "done"), (4, "n", 3, None, "queued")):
                old.execute("INSERT INTO events(id, route, status, received_at, updated_at, dedupe_key, headers,"
                            " content_type, body_id, element) VALUES (?, 'r', ?, 1.0, 1.0, ?, '{}',"
                            " 'application/json', ?, ?)", (eid, status, key, body_id, element))
            old.commit()
            old.close()
            store = Store(path)
            try:
                for eid, body in ((1, stored[0][1]), (2, stored[0][1]), (3, stored[1][1])):
                    self.assertEqual(store.read(lambda c: row_dict(c, eid, with_body=True))["body"], body)
                self.assertEqual(store.claim(4)["body"], stored[2][1])
                self.assertEqual([e["id"] for e in store.read(lambda c: list_events(c, text="alone"))], [3])
                again = store.add_events("r", batch("E", ["x", "y", "z"]), now=2.0)
                self.assertEqual(again[:2], [(1, "duplicate"), (2, "duplicate")])
                self.assertEqual(again[2][1], "new")
                copy = store.replay(3, now=2.0)
                self.assertEqual(store.read(lambda c: row_dict(c, copy, with_body=True))["body"], stored[1][1])
                self.assertEqual(store.prune(days=1, now=5 * 86400), 5, "the old done rows and the two duplicates")
                self.assertEqual(store.read(lambda c: [r[0] for r in c.execute("SELECT id FROM request_bodies")]),
                                 [2, 3], "the old delivery's body went; the replay's and a waiting row's stay")
                self.assertEqual(store.read(lambda c: row_dict(c, copy, with_body=True))["body"], stored[1][1])
                self.assertEqual(store.read(lambda c: row_dict(c, again[2][0], with_body=True))["body"],
                                 batch("E", ["x", "y", "z"])[0]["body"])
            finally:
                store.close()

    def test_old_database_opens_and_keeps_everything(self):
        import hashlib
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "old.sqlite3")
            old = sqlite3.connect(path)
            old.executescript(OLD_SCHEMA)
            shared, alone = b'{"events": [1, 2]}', b'{"alone": true}'
            for body in (shared, alone):
                old.execute("INSERT INTO bodies VALUES (?, ?)", (hashlib.sha256(body).hexdigest(), body))
            for eid, key, body, status in ((1, "k1", shared, "done"), (2, "k2", shared, "queued"),
                                           (3, "k3", alone, "dead")):
                old.execute("INSERT INTO events(id, route, status, received_at, updated_at, dedupe_key,"
                            " headers, content_type, body_hash) VALUES (?, 'r', ?, 1.0, 1.0, ?, '{}',"
                            " 'application/json', ?)", (eid, status, key, hashlib.sha256(body).hexdigest()))
            old.commit()
            old.close()
            store = Store(path)
            try:
                for eid, body in ((1, shared), (2, shared), (3, alone)):
                    self.assertEqual(store.read(lambda c: row_dict(c, eid, with_body=True))["body"], body)
                self.assertEqual(store.waiting("r"), 1)
                self.assertEqual(store.add_events("r", [row("k2")]), [(2, "duplicate")], "old keys still dedupe")
                [(new, st)] = store.add_events("r", [row("k4", b'{"new": 1}')])
                self.assertEqual(st, "new")
                self.assertEqual(store.claim(2)["body"], shared)
                tables = {r[0] for r in store.read(lambda c: c.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'").fetchall())}
                self.assertNotIn("bodies", tables)
                self.assertEqual(store.read(bodies_stored), [shared, alone, b'{"new": 1}'],
                                 "two old bodies (one shared by two events) and one new")
                not_done = store.read(lambda c: c.execute(
                    "SELECT count(*) FROM events WHERE status <> 'done'").fetchone()[0])
                self.assertEqual((not_done, due_index_entries(store)), (4, 4), "the old done row left the index")
                self.assertIn(new, [r[0] for r in store.due(time.time())])
            finally:
                store.close()
            store = Store(path)  # a second open finds nothing left to migrate
            try:
                self.assertEqual(store.read(lambda c: row_dict(c, new, with_body=True))["body"], b'{"new": 1}')
            finally:
                store.close()


if __name__ == "__main__":
    unittest.main()
