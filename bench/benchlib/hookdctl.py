"""Looking at a running hookd from outside: its metrics, its queue, and how many events it has stored.

Strategy: the honesty check counts stored events two independent ways: read-only from the sqlite
database under the state directory (``count_db``: the table whose name says "event"), and through the
product's own CLI, ``hookd.py events --json`` (``count_cli``). ``metrics`` parses GET /metrics
(Prometheus text, from the admin API on the unix socket ``admin_socket(workdir)``, where the bench
configuration puts it) into ``{name: [(labels, value)]}``; ``pending`` is the number of events not yet
finished (queued, running, retry), used to let the workers drain between runs and to time the
processing-throughput phase (read from the database, which costs hookd nothing; /metrics as a
fallback, since rendering it scans the events table inside hookd).
"""

import glob
import http.client
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time

from .targets import HOOKD

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
PENDING = ("queued", "running", "retry")


def admin_socket(workdir):
    """Where the bench configuration puts hookd's admin listener."""
    return os.path.join(workdir, "admin.sock")


def metrics(workdir, timeout=2.0):
    """``{name: [(labels_text, value)]}`` from GET /metrics on the admin listener; {} when unreachable."""
    try:
        conn = http.client.HTTPConnection("localhost", timeout=timeout)
        conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.sock.settimeout(timeout)
        conn.sock.connect(admin_socket(workdir))
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode("utf-8", "replace")
        conn.close()
    except (OSError, http.client.HTTPException):
        return {}
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out.setdefault(m.group(1), []).append((m.group(2) or "", float(m.group(3))))
    return out


def metric_sum(snapshot, name, label_filter=None):
    """Sum of a metric's samples whose labels contain ``label_filter`` (a callable on the label text)."""
    return sum(v for labels, v in snapshot.get(name, []) if label_filter is None or label_filter(labels))


def pending(snapshot):
    """Events not finished yet according to hookd_queue_depth; None when the metric is missing."""
    if "hookd_queue_depth" not in snapshot:
        return None
    return metric_sum(snapshot, "hookd_queue_depth",
                      lambda labels: any('"%s"' % s in labels for s in PENDING))


def wait_drained(workdir, limit):
    """Wait (at most ``limit`` s) until no event is pending; returns seconds waited and the last count."""
    start = time.monotonic()
    left = None
    while time.monotonic() - start < limit:
        left = count_db_status(workdir, PENDING)
        if left is None:
            left = pending(metrics(workdir))
        if not left:
            break
        time.sleep(0.1)
    return time.monotonic() - start, left


def _db_path(workdir):
    found = [p for p in glob.glob(os.path.join(workdir, "var", "**", "*"), recursive=True)
             if os.path.isfile(p) and not p.endswith(("-wal", "-shm", "-journal"))
             and _is_sqlite(p)]
    return found[0] if found else None


def _is_sqlite(path):
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def _events_table(db):
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    for name in sorted(names, key=len):
        if name.lower() in ("events", "event"):
            return name
    return next((n for n in names if "event" in n.lower()), None)


def _query_db(workdir, sql_tail, args=(), what="count(*)", path=None):
    if path is not None and not os.path.exists(path):
        return 0  # a peer that opens its database lazily (gunicorn workers) has stored nothing yet
    path = path or _db_path(workdir)
    if path is None:
        return None
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=10)
    try:
        table = _events_table(db)
        if table is None:
            return None
        return db.execute('SELECT %s FROM "%s" %s' % (what, table, sql_tail), args).fetchone()[0]
    except sqlite3.Error:
        return None
    finally:
        db.close()


def count_db(workdir, path=None):
    """Rows in hookd's events table (or in the events table of the sqlite file ``path``), read-only;
    None if it cannot be found."""
    return _query_db(workdir, "", path=path)


def count_db_status(workdir, statuses):
    marks = ",".join("?" * len(statuses))
    return _query_db(workdir, "WHERE status IN (%s)" % marks, tuple(statuses))


def oldest_queued_db(workdir):
    """Age in seconds of the oldest queued or retrying event, from the database; 0 when none."""
    oldest = _query_db(workdir, "WHERE status IN ('queued', 'retry')", what="min(received_at)")
    return max(0.0, time.time() - oldest) if oldest else 0.0


def count_cli(config_path, timeout=120):
    """Number of events ``hookd.py events --json`` lists; None when the CLI fails."""
    argv = [sys.executable, HOOKD, "events", "--json", "--limit", "100000000", "--config", config_path]
    env = dict(os.environ)
    env.pop("STATE_DIRECTORY", None)
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                              env=env, check=False)
        return len(json.loads(proc.stdout.decode("utf-8")))
    except (subprocess.TimeoutExpired, ValueError):
        return None
