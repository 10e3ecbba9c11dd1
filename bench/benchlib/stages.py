"""Where hookd's CPU per request goes, stage by stage, measured in one process without sockets.

Usage: ``python3 -m benchlib.stages`` from bench/ (bench.py runs it in a child whose stderr is thrown
away, since hookd logs there); prints one JSON object. Strategy: signed requests like those the intake
phase sends (benchlib/pool.py) are fed, N at a time, through each stage of hookd's request path with the
real code and a real App: ``framing.Reader`` (head and body from the raw bytes), route lookup and
``Request``, the integration's ``accept`` (signature check, JSON parse, Preservica's per-element keys),
``App.event_rows`` (stored headers, rows), the store (the rows of GROUP requests per transaction,
committed with synchronous=FULL, as the writer does under load), and the answer (the log line, the
metric, the 202's bytes; a group's log lines written together, as the writer writes them). Each stage is
timed with the thread's CPU clock over all N requests; what is left out (socket reads and writes, thread
switches, the GIL) is the difference to the intake phase's CPU per request. The schemes take turns
REPEATS times, PAUSE seconds apart, each pass with requests of its own, and each stage keeps its fastest
pass (as ``timeit`` advises: a slower pass also measures what else ran, such as a garbage collection,
which here walks the N requests a pass keeps alive at once where the server keeps a few). With one pass,
five runs on one machine read Preservica's ``event_rows`` at 8.4-12.4 us a request (12.7 and 15.7 in two
more, 4.3 and 6.4 with the collector off), and 3.6-5.2 with the fastest of five. It does not remove a
host whose CPU runs at two speeds for seconds at a time (docs/performance.md, "The host's two speeds,
sixteenth round"): there the sums still spread 1.2-1.5x from run to run. Each pass stores into what the
passes before it stored (4,000 more events a scheme), as a daemon's store grows. The writer's part is
read from its thread's own CPU clock (``pthread_getcpuclockid``), to the nanosecond; /proc's ticks, read
before, moved in steps of 2.5 us a request.
"""

import json
import os
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)

from benchlib import pool  # noqa: E402
from hookd_core import framing, logs, server  # noqa: E402
from hookd_core.app import App  # noqa: E402

N = 4000
GROUP = 32
REPEATS = 5
PAUSE = 0.5


def raw_requests(scheme, n, tag):
    out = []
    for i in range(n):
        fields = pool._LINES[scheme](tag, i)[0].rstrip("\n").split("\t")
        if scheme == "standard":
            msg_id, stamp, sig, body = fields
            head = ("POST /hooks/bench HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    "webhook-id: %s\r\nwebhook-timestamp: %s\r\nwebhook-signature: v1,%s\r\n" % (msg_id, stamp, sig))
        else:
            sig, body = fields
            head = ("POST /preservica HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    "Preservica-Signature: %s\r\n" % sig)
        out.append((head + "Content-Length: %d\r\n\r\n" % len(body) + body).encode())
    return out


def timed(fn, items):
    t = time.thread_time()
    out = [fn(x) for x in items]
    return out, (time.thread_time() - t) / len(items) * 1e6


def run_scheme(app, scheme, tag):
    raws = raw_requests(scheme, N, tag)

    feed = iter(raws)

    def recv_into(buffer):  # as a keep-alive connection's socket: each receive holds the next whole request
        raw = next(feed)
        buffer[:len(raw)] = raw
        return len(raw)
    reader = framing.Reader(recv_into, 16384)  # one per connection, as the server has

    def read(_):
        req = reader.head()
        return req, reader.body(1 << 20)
    parsed, t_read = timed(read, raws)

    def route(item):  # as the server does: the request the reader yielded gets its query, body and client
        req, body = item
        req.query, req.body, req.client = server._query(req.query_string), body, "127.0.0.1"
        return app.route_for(req.path), req
    reqs, t_route = timed(route, parsed)
    accepted, t_accept = timed(lambda ir: (ir[0], ir[1], ir[0].accept(ir[1])), reqs)
    rows, t_rows = timed(lambda a: (a[0].name, app.event_rows(*a)), accepted)
    t = time.thread_time()
    stored = []
    for i in range(0, N, GROUP):
        # As under load: the group queues while a commit is under way, so the writer thread takes all
        # GROUP at once (alone, each request would find the writer idle and commit on this thread).
        with app.store._committing:
            ops = [app.store.submit_events(name, r) for name, r in rows[i:i + GROUP]]
        stored += [(op.wait(), r) for op, (_, r) in zip(ops, rows[i:i + GROUP])]
    t_store = (time.thread_time() - t) / N * 1e6  # this thread's part; the writer's is below
    def answer(item):
        status, body, headers, close = server.outcome(app, rows[0][0], item[1], item[0], None, "127.0.0.1")
        return server._answer_bytes(status, body, "application/json", headers, close)
    t = time.thread_time()
    for i in range(0, N, GROUP):
        with logs.batched():  # as the writer answers a group: its log lines go out in one write
            for item in stored[i:i + GROUP]:
                answer(item)
    t_answer = (time.thread_time() - t) / N * 1e6
    return {"reader": t_read, "route_and_request": t_route, "accept": t_accept, "event_rows": t_rows,
            "submit_and_wait": t_store, "answer_log_metric": t_answer}


def main():
    tmp = tempfile.mkdtemp(prefix="hookd-stages-")
    config = os.path.join(tmp, "credentials.properties")
    with open(config, "w") as f:
        f.write("[hookd]\nstate_dir = %s\n[preservica]\nsecret.key = %s\n[hook:bench]\nverify = standard-webhooks\n"
                "secret = %s\n" % (os.path.join(tmp, "var"), pool.PRESERVICA_SECRET.decode(), pool.WHSEC))
    os.chmod(config, 0o600)
    app = App(config)
    app.open_store()
    writer = [t for t in threading.enumerate() if t.name == "hookd-writer"]
    clock = time.pthread_getcpuclockid(writer[0].ident) if writer else None
    out = {"passes": REPEATS}
    for rep in range(REPEATS):
        if rep:
            time.sleep(PAUSE)
        for scheme in ("standard", "preservica"):
            before = time.clock_gettime(clock) if clock is not None else None
            times = run_scheme(app, scheme, "stages%d" % rep)
            if before is not None:
                times["writer_thread"] = (time.clock_gettime(clock) - before) / N * 1e6
            fastest = out.setdefault(scheme, times)
            for stage, us in times.items():
                fastest[stage] = min(fastest[stage], us)
    app.store.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
