"""Prometheus text metrics: counters kept in memory, queue gauges read from the store at scrape time.

Strategy: the request path only bumps a dict entry under a lock (cheap), and the store's writer, which
answers a whole commit group at once, counts the group's answers in a dict of its own and adds them under
the lock once at the group's end (``hold`` and ``add_held``); everything about the queue is computed when ``/metrics``
is scraped, from the events table, so the numbers cannot drift from the truth.
"""

import threading
import time

from . import subscriptions
from .store import counts, held_leases, list_workers, oldest_queued

BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, float("inf"))


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = {}       # (route, code) -> n
        self.verify_failures = {}  # route -> n
        self.dead_events = {}  # route -> events that went dead since the start
        self.job_buckets = [0] * len(BUCKETS)
        self.job_sum = 0.0
        self.job_count = 0
        self.leases_expired = {}  # route -> n
        self._held = threading.local()  # .counts: the requests a thread counts between ``hold`` and ``add_held``

    def request(self, route, code):
        key = (route, code)
        held = getattr(self._held, "counts", None)
        if held is not None:
            held[key] = held.get(key, 0) + 1
            return
        with self._lock:
            self._add(key, 1)

    def _add(self, key, n):
        self.requests[key] = self.requests.get(key, 0) + n
        if key[1] == 401:
            self.verify_failures[key[0]] = self.verify_failures.get(key[0], 0) + n

    def hold(self):
        """From now on hold the requests this thread counts, until ``add_held``."""
        self._held.counts = {}

    def add_held(self):
        """Add the requests held since ``hold`` under one lock, and hold no more."""
        held, self._held.counts = self._held.counts, None
        with self._lock:
            for key, n in held.items():
                self._add(key, n)

    def dead(self, route):
        with self._lock:
            self.dead_events[route] = self.dead_events.get(route, 0) + 1

    def job(self, seconds):
        with self._lock:
            self.job_sum += seconds
            self.job_count += 1
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self.job_buckets[i] += 1

    def lease_expired(self, route):
        with self._lock:
            self.leases_expired[route] = self.leases_expired.get(route, 0) + 1

    def render(self, store):
        """The whole exposition text."""
        rows = store.read(counts)
        oldest = store.read(oldest_queued)
        held = store.read(held_leases)
        workers = store.read(list_workers)
        out = []
        with self._lock:
            out.append("# TYPE hookd_lease_expired_total counter")
            for route, n in sorted(self.leases_expired.items()):
                out.append('hookd_lease_expired_total{route="%s"} %d' % (_esc(route), n))
            out.append("# TYPE hookd_requests_total counter")
            for (route, code), n in sorted(self.requests.items()):
                out.append('hookd_requests_total{route="%s",code="%d"} %d' % (_esc(route), code, n))
            out.append("# TYPE hookd_verify_failures_total counter")
            for route, n in sorted(self.verify_failures.items()):
                out.append('hookd_verify_failures_total{route="%s"} %d' % (_esc(route), n))
            out.append("# TYPE hookd_dead_events_total counter")
            for route, n in sorted(self.dead_events.items()):
                out.append('hookd_dead_events_total{route="%s"} %d' % (_esc(route), n))
            out.append("# TYPE hookd_job_seconds histogram")
            for bound, n in zip(BUCKETS, self.job_buckets):
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append('hookd_job_seconds_bucket{le="%s"} %d' % (le, n))
            out.append("hookd_job_seconds_sum %f" % self.job_sum)
            out.append("hookd_job_seconds_count %d" % self.job_count)
        out.append("# TYPE hookd_events_total gauge")
        depth = dict.fromkeys(("queued", "running", "retry", "dead"), 0)
        for route, status, n in rows:
            out.append('hookd_events_total{route="%s",status="%s"} %d' % (_esc(route), status, n))
            if status in depth:
                depth[status] += n
        out.append("# TYPE hookd_queue_depth gauge")
        for status, n in depth.items():
            out.append('hookd_queue_depth{status="%s"} %d' % (status, n))
        out.append("# TYPE hookd_leases gauge")
        for route, n in sorted(held.items()):
            out.append('hookd_leases{route="%s"} %d' % (_esc(route), n))
        out.append("# TYPE hookd_worker_last_seen_seconds gauge")  # Unix time of its last lease call
        for w in workers:
            out.append('hookd_worker_last_seen_seconds{worker="%s"} %.3f' % (_esc(w["worker"]), w["last_seen"]))
        out.append("# TYPE hookd_subscription_up gauge")
        for route, sub_id, up in store.read(subscriptions.health):
            out.append('hookd_subscription_up{route="%s",id="%s"} %d' % (_esc(route), _esc(sub_id), up))
        out.append("# TYPE hookd_oldest_queued_seconds gauge")
        out.append("hookd_oldest_queued_seconds %f" % (max(0.0, time.time() - oldest) if oldest else 0.0))
        return "\n".join(out) + "\n"


def _esc(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
