"""``hookd.py worker``: run the jobs of some routes on this host, leased from the hookd that received them.

Strategy: the first hookd keeps intake, the store, retries and serial keys; this process only runs jobs.
It loads this host's own configuration (upstream credentials, camera URLs, video.dir, ``workers`` = how
many jobs at once) and builds the same integrations the daemon would, then each of its slots loops:
lease one job through the lease API (a long poll), run it with the daemon's own ``run_steps`` (the
integration's work, then its actions, skipping the steps the lease's ``progress`` says are done), and
report done / retry / dead. While a job runs, a keeper thread extends its lease every third of its
length; progress a step saves travels to the first hookd with an extend. A lease the first hookd ends
(409) stops the job: someone else runs it. When the first hookd cannot be reached the slot waits with
exponential backoff and tries again (one log line when it goes away, one when it is back); a report that
cannot be sent is kept and sent again. SIGTERM/SIGINT: no new lease; running jobs get ``shutdown_grace``
seconds to finish, and what is still running then is stopped and handed back (retry) to the first hookd;
the programs its jobs started are killed (recorded in this host's store like the daemon's, so a worker
killed with -9 has them killed when it starts again: hookd_core/children.py).
"""

import argparse
import base64
import json
import os
import queue
import random
import signal
import socket
import sys
import threading
import time

from . import client, config as config_mod, proc
from .api import Fail, JobContext, Retry
from .app import App
from .logs import EventLog
from .workers import run_steps

WAIT = 10                # seconds a lease call waits for work (short enough for a quick SIGTERM)
BACKOFF_MAX = 30         # seconds between tries while the first hookd is away
DEFAULT_LEASE_SECONDS = 30


class Lost(Exception):
    """The first hookd ended the lease (409): the job belongs to someone else now."""


class Client:
    """JSON POSTs to the first hookd's lease API with the admin token; ``post(path, body)`` returns the
    answer's JSON, or raises Lost (409), ``Retry`` (unreachable, 5xx: the first hookd is away) or
    ``Fail`` (the token refused, anything else), through the one status mapping of ``client.check``."""

    def __init__(self, base, token):
        self.base, self.token = base.rstrip("/"), token

    def post(self, path, body, timeout=30):
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        reply = client.request("POST", self.base + path, headers=headers, body=json.dumps(body),
                               timeout=timeout)
        if reply.status == 409:
            raise Lost("the first hookd ended this lease")
        what = path if path == "/work/lease" else "/work/.../" + path.rsplit("/", 1)[-1]  # lease ids stay out
        return client.check(reply, what, refused="--token").json()


class RemoteWorker:
    """The slots, the signal handling, and the bookkeeping of leases held right now."""

    def __init__(self, app, client, routes, lease_seconds, name, slots):
        self.app, self.client, self.routes = app, client, routes
        self.lease_seconds, self.name, self.slots = lease_seconds, name, slots
        self.stopping = threading.Event()     # SIGTERM: take no new lease
        self.over = threading.Event()         # shutdown_grace is over: stop trying to report
        self.held = {}                        # lease_id -> Job running now
        self._lock = threading.Lock()
        self._away = 0                        # consecutive failed calls (for backoff and the log)
        self.log = app.log

    # -- one iteration of a slot (tests may call it) ----------------------------------------------------
    def once(self, wait=WAIT):
        """Lease one job and run it; returns its outcome: done, retry, dead, lost, idle or away."""
        try:
            got = self.client.post("/work/lease", {"routes": self.routes, "max": 1, "wait": wait,
                                                   "lease_seconds": self.lease_seconds, "worker": self.name},
                                   timeout=wait + 30)
        except Retry as e:
            self._gone(e)
            return "away"
        except Fail as e:
            self.log.error("lease refused: %s", e)
            self.stopping.wait(BACKOFF_MAX)
            return "refused"
        self._back()
        if not got:
            return "idle"
        job = Job(self, got[0])
        if self.over.is_set():  # leased after shutdown_grace ran out: hand it back at once
            job.report("retry", {"error": "worker %s is stopping" % self.name, "retry_after": 0})
            return "handed back"
        return job.run()  # leased as SIGTERM came: it is ours, it gets the grace like the others

    def _gone(self, e):
        with self._lock:
            self._away += 1
            n = self._away
        if n == 1:
            self.log.warning("cannot reach %s: %s; trying again with backoff", self.client.base, e)
        self.stopping.wait(backoff(n))

    def _back(self):
        with self._lock:
            was, self._away = self._away, 0
        if was:
            self.log.info("reached %s again", self.client.base)

    # -- lifecycle ------------------------------------------------------------------------------------
    def serve(self):
        """Run the slots until SIGTERM/SIGINT, then drain within shutdown_grace; returns the exit code."""
        proc.idle_after(self.app.idle_after, self.log)
        signals = queue.SimpleQueue()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, f: signals.put(s))
        threads = [threading.Thread(target=self._slot, name="hookd-remote-%d" % i, daemon=True)
                   for i in range(self.slots)]
        for t in threads:
            t.start()
        self.log.info("worker %s: running %s jobs leased from %s (%d at once, leases of %gs)", self.name,
                      ",".join(self.routes), self.client.base, self.slots, self.lease_seconds)
        sig = None
        while sig is None:  # with a timeout: a signal taken by another thread still wakes this one
            try:
                sig = signals.get(timeout=0.5)
            except queue.Empty:
                pass
        grace = self.app.settings.float("shutdown_grace")
        self.log.info("%s: no new leases; letting running jobs finish (up to %.0fs)",
                      signal.Signals(sig).name, grace)
        self.stopping.set()
        deadline = time.monotonic() + grace
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = list(self.held.values())
        self.over.set()
        for job in left:
            job.hand_back()
        killed = self.app.children.kill_all()
        if killed:
            self.log.warning("killed the processes of %s after shutdown_grace", ", ".join(killed))
        for t in threads:
            t.join(5)
        self.log.info("stopped")
        return 0

    def _slot(self):
        while not self.stopping.is_set():
            try:
                self.once()
            except Exception:
                self.log.exception("worker slot failed")
                self.stopping.wait(1)


class Job:
    """One leased job: its context, the keeper that extends the lease, and the report at the end."""

    def __init__(self, worker, lease):
        self.worker, self.lease = worker, lease
        self.lease_id, self.event = lease["lease_id"], lease["event"]
        self.stop = threading.Event()         # ctx.stopping: the lease is lost or the grace is over
        self.lost = threading.Event()
        self.reported = threading.Event()
        self.log = EventLog(worker.log, {"event": lease["id"]})

    def context(self, integ):
        doc = self.event
        body = doc.get("body") or ""
        body = base64.b64decode(body) if doc.get("body_encoding") == "base64" else body.encode("utf-8")
        return JobContext(id=self.lease["id"], route=self.lease["route"], attempt=self.lease["attempt"],
                          payload=doc.get("payload"), body=body, headers=doc.get("headers") or {},
                          content_type=doc.get("content_type"), received_at=doc.get("received_at"),
                          conf=integ.conf, stopping=self.stop, log=self.log,
                          products=getattr(self.worker.app, "store", None))

    def run(self):
        w = self.worker
        route, attempt = self.lease["route"], self.lease["attempt"]
        integ = w.app.integration(route)
        with w._lock:
            w.held[self.lease_id] = self
        keeper = threading.Thread(target=self._keep, name="hookd-lease-keeper", daemon=True)
        keeper.start()
        progress = self.lease.get("progress") or {}
        try:
            if integ is None:
                raise Retry("route %s is not configured on worker %s" % (route, w.name))
            with w.app.children.job("event %s" % self.lease["id"]):  # its processes are recorded, never outlive the worker
                note = run_steps(self.context(integ), integ, progress, self._save)
            verb, body = "done", {"note": note, "progress": progress}
        except Retry as e:
            verb, body = "retry", {"error": str(e), "retry_after": e.after}
        except Fail as e:
            verb, body = "dead", {"error": str(e) or e.__class__.__name__}
        except Exception as e:
            verb, body = "retry", {"error": "%s: %s" % (e.__class__.__name__, e)}
            self.log.error("job raised %s: %s", e.__class__.__name__, e)
        finally:
            self.stop.set()
            keeper.join()
            with w._lock:
                w.held.pop(self.lease_id, None)
        if self.lost.is_set():
            self.log.warning("lease lost (%s, attempt %d): the first hookd gave the job to another worker;"
                             " this run's outcome (%s) is dropped", route, attempt, verb)
            return "lost"
        if self.reported.is_set():
            return "handed back"
        self.report(verb, body)
        text = body.get("note") or body.get("error")
        line = "%s (%s, attempt %d, lease from %s)%s" % (verb, route, attempt, w.client.base,
                                                         ": %s" % text if text else "")
        (self.log.info if verb == "done" else self.log.warning if verb == "retry" else self.log.error)("%s", line)
        return verb

    def _keep(self):
        """Extend the lease every third of its length until the job ends; a 409 stops the job."""
        every = max(0.5, self.worker.lease_seconds / 3.0)
        while not self.stop.wait(every):
            try:
                self.worker.client.post("/work/%s/extend" % self.lease_id,
                                        {"lease_seconds": self.worker.lease_seconds})
                every = max(0.5, self.worker.lease_seconds / 3.0)
            except Lost:
                self.lost.set()
                self.stop.set()
            except (Fail, Retry) as e:
                self.log.warning("could not extend lease: %s", e)
                every = 1.0

    def _save(self, progress):
        """Progress a step saves goes to the first hookd with an extend, before the next step runs."""
        try:
            self._send("extend", {"lease_seconds": self.worker.lease_seconds, "progress": progress})
        except Lost:
            self.lost.set()
            raise Retry("lease lost before progress could be saved")

    def report(self, verb, body):
        """Send done/retry/dead, again and again while the first hookd is away (until shutdown's end)."""
        try:
            self._send(verb, body)
        except Lost:
            self.lost.set()
        except (Fail, Retry) as e:
            self.log.error("could not send %s (%s); the lease will expire and the job run again", verb, e)
        self.reported.set()

    def _send(self, verb, body):
        n = 0
        while True:
            try:
                return self.worker.client.post("/work/%s/%s" % (self.lease_id, verb), body)
            except Retry as e:
                n += 1
                if n == 1:
                    self.log.warning("cannot send %s yet: %s; trying again", verb, e)
                if self.worker.over.wait(backoff(n)):
                    raise

    def hand_back(self):
        """shutdown_grace is over and the job still runs: stop it and give the event back (retry)."""
        self.reported.set()
        self.stop.set()
        try:
            self.worker.client.post("/work/%s/retry" % self.lease_id, {
                "error": "worker %s stopped before the job finished" % self.worker.name, "retry_after": 0})
            self.log.warning("handed back (%s, attempt %d): shutdown_grace is over", self.lease["route"],
                             self.lease["attempt"])
        except (Lost, Fail, Retry) as e:
            self.log.warning("could not hand the job back (%s); its lease will expire", e)


def backoff(n):
    """Seconds to wait after the n-th failed call in a row: 0.5, 1, 2, ... up to BACKOFF_MAX, jittered."""
    return min(BACKOFF_MAX, 0.5 * 2 ** (n - 1)) * (0.5 + random.random() / 2)


# -- the command ------------------------------------------------------------------------------------------

def main(path, argv):
    """``hookd.py worker --from URL [--token T] [--routes R,...] [--lease-seconds S] [--name NAME]``."""
    parser = argparse.ArgumentParser(prog="hookd.py worker")
    parser.add_argument("--from", dest="url", required=True, help="the first hookd's admin URL")
    parser.add_argument("--token", default="", help="its admin.token (or env:NAME, file:/path, cred:NAME)")
    parser.add_argument("--routes", default="", help="comma list of routes to run (default: every route"
                        " configured here that can run remotely)")
    parser.add_argument("--lease-seconds", type=float, default=DEFAULT_LEASE_SECONDS)
    parser.add_argument("--name", default="%s-%d" % (socket.gethostname(), os.getpid()))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    if not args.url.startswith(("http://", "https://")) or not 1 <= args.lease_seconds <= 3600:
        print("hookd: --from needs an http(s):// URL and --lease-seconds 1..3600", file=sys.stderr)
        return 2
    app = App(path)
    problems = list(app.problems)
    try:
        token = config_mod.resolve(args.token)
    except config_mod.ConfigError as e:
        problems.append("--token: %s" % e)
    if not problems:
        routes, more = choose_routes(app, args.routes)
        problems += more
    if problems:
        for p in problems:
            print("hookd: %s" % p, file=sys.stderr)
        return 1
    app.open_store()  # this host's own: temporary files and caches some handlers keep (Camio's labels)
    for owner, n in sorted(app.children.kill_leftovers().items()):
        app.log.warning("killed %d processes of %s left running by an earlier run", n, owner)
    try:
        return RemoteWorker(app, Client(args.url, token), routes, args.lease_seconds, args.name,
                            app.settings.int("workers")).serve()
    finally:
        app.store.close()


def choose_routes(app, text):
    """(routes, problems): the asked routes must be configured here and able to run remotely."""
    names = [r.strip() for r in text.split(",") if r.strip()] or [
        i.name for i in app.integrations if i.RUNS_REMOTELY]
    problems = []
    for name in names:
        integ = app.integration(name)
        if integ is None:
            problems.append("route %s is not configured on this host (%s)" % (name, app.path))
        elif not integ.RUNS_REMOTELY:
            problems.append("route %s keeps its state in the first hookd's store and cannot run here" % name)
    if not names:
        problems.append("no route to run: configure one here and name it in --routes")
    return names, problems
