"""Workers: take stored events, run the integration's work and its actions, record the outcome.

Strategy (after huey's consumer, with at-least-once instead of its delete-on-dequeue): the
``queue.Queue`` carries only (id, route, serial key) and is just a wake-up; sqlite says what is true.
Fresh events are put on the queue by the intake right after their commit; a scheduler thread finds due
retries and anything the CLI queued by polling the table, and starts the daily prune on a thread of its
own (``prune_when_due``). ``Worker.loop()`` is one iteration: get an id,
wait its turn if its serial key or its route's ``max_parallel`` is busy, claim it (queued -> running,
exclusive in the process), run it, and store done / retry (exponential backoff with jitter) / dead.
A job is a generator of its steps (``job_steps``) that yields each program its ``command`` starts, so an
iteration can take up to ``command.batch`` jobs of a section whose only work is that command, start their
programs back to back and wait for them together (``proc.wait``), each job stored as its program ends.
Neither the claim nor the outcome waits for its commit (a worker would otherwise wait two group commits
per job while intake is busy); the event stays in flight, so nothing runs it again, until its outcome
is committed, and an outcome the database refused is requeued once it takes writes. Steps already done (the integration's own work, each action) are saved in ``progress``
and not run again on a retry. Tests call ``loop()`` directly.
"""

import json
import queue
import random
import threading
import time
import traceback

from . import actions, logs, proc
from .api import Fail, Integration, JobContext, Retry, iso, stored_payload
from .logs import EventLog
from .store import PruneStopped, StoreError


PRUNE_EVERY = 86400  # seconds from the start of one daily prune to the next
PRUNE_AGAIN = 600  # ... or from one that failed
RECOUNT_EVERY = 30  # seconds between two re-reads of the waiting counts (the CLI may change rows)
REFUSED_REMINDER = 60  # seconds between two lines saying the database still refuses the scheduler's writes


class Pool:
    """The worker threads, the scheduler thread, and the bookkeeping that keeps jobs apart."""

    def __init__(self, app, size):
        self.app, self.size = app, size
        self.queue = queue.Queue()
        self._lock = threading.Lock()
        self._inflight = set()
        self._stuck = set()  # attempts whose outcome the store could not take: requeued when it can
        self._deferred = []
        self._busy_keys = set()
        self._running = {}  # route -> jobs running now
        self._wake = threading.Condition()
        self._wake_at = None
        self._pruning, self._prune_at = None, 0.0  # the daily prune's thread; when the next one is due
        self._recounted = time.monotonic()  # when the scheduler last re-read the waiting counts
        self._refused = None  # while the scheduler's writes are refused: (error text, since, last line said)
        self.threads = []
        self.workers = [Worker(self, i) for i in range(size)]
        self.last_progress = time.monotonic()
        self._work = threading.Condition()  # remote workers waiting in a lease call
        self._lease_waiters = 0

    # -- feeding the queue --------------------------------------------------------------------------
    def submit(self, event_id, route, serial_key=None):
        if self._lease_waiters:
            self.work_changed()
        if self.remote(route):
            return  # remote workers lease it; no local worker runs it
        with self._lock:
            if event_id in self._inflight:
                return
            self._inflight.add(event_id)
        self.queue.put((event_id, route, serial_key))

    def remote(self, route):
        """True when ``[ROUTE] remote = true``: only remote workers run this route's jobs."""
        integ = self.app.integration(route)
        return integ is not None and integ.conf.bool("remote")

    def work_changed(self):
        """Something may be due for a lease now (a new event, a lease ended): wake waiting lease calls."""
        with self._work:
            self._work.notify_all()

    def wait_for_work(self, timeout):
        """Block a lease call until ``work_changed`` or ``timeout`` seconds."""
        with self._work:
            self._lease_waiters += 1
            try:
                self._work.wait(timeout)
            finally:
                self._lease_waiters -= 1

    def wake_at(self, when):
        """Ask the scheduler to look again at ``when`` (epoch seconds)."""
        with self._wake:
            if self._wake_at is None or when < self._wake_at:
                self._wake_at = when
                self._wake.notify()

    def schedule_once(self, now=None):
        """Queue every due event not already in flight; returns how many were queued."""
        now = time.time() if now is None else now
        n = 0
        for event_id, route, key in self.app.store.due(now):
            with self._lock:
                if event_id in self._inflight:
                    continue
            self.submit(event_id, route, key)
            n += 1
        return n

    def _scheduler(self):
        poll = 1.0
        while not self.app.stopping.is_set():
            self.schedule_round()
            with self._wake:
                timeout = poll
                if self._wake_at is not None:
                    timeout = max(0.0, min(poll, self._wake_at - time.time()))
                self._wake.wait(timeout)
                self._wake_at = None

    def schedule_round(self):
        """One round of the scheduler thread (about once a second); never raises. It requeues outcomes the
        store refused, queues due events, ends overdue leases, re-reads the waiting counts every
        RECOUNT_EVERY seconds and starts the daily prune when due. While the database refuses writes
        (disk full) every round fails: one ERROR line when they start failing (and when the error
        changes), a reminder every REFUSED_REMINDER seconds while it lasts, and one INFO line from the
        first round that works again (it was a line every round). Returns the StoreError, or None."""
        from . import leases  # leases builds on this module
        try:
            self.requeue_stuck()
            self.schedule_once()
            leases.sweep(self.app)
            if time.monotonic() - self._recounted > RECOUNT_EVERY:
                self.app.store.recount()
                self._recounted = time.monotonic()
            self.prune_when_due()
        except StoreError as e:  # the database refuses writes (disk full): tried again next round
            now, refused = time.monotonic(), self._refused
            if refused is None or refused[0] != str(e):
                self.app.log.error("scheduler: the database refuses writes: %s; tried again every round", e)
                self._refused = (str(e), now, now)
            elif now - refused[2] >= REFUSED_REMINDER:
                self.app.log.error("scheduler: the database still refuses writes (for %.0f s): %s",
                                   now - refused[1], e)
                self._refused = (refused[0], refused[1], now)
            return e
        except Exception:
            self.app.log.exception("scheduler iteration failed")
            return None
        if self._refused is not None:
            self.app.log.info("scheduler: the database takes writes again (refused for %.0f s)",
                              time.monotonic() - self._refused[1])
            self._refused = None
        return None

    def prune_when_due(self):
        """Start the daily prune (``App.prune_daily``) on a thread of its own when it is due (at start, then
        a day after the last one started; PRUNE_AGAIN after one that failed) and none is running. On a
        large store it reads for seconds to minutes (review R8: 9 s for a million events), and the
        scheduler meanwhile goes on waking due retries, requeueing stuck outcomes and sweeping leases."""
        if self._pruning is not None and self._pruning.is_alive() or time.time() < self._prune_at:
            return
        self._prune_at = time.time() + PRUNE_EVERY
        self._pruning = threading.Thread(target=self._prune, name="hookd-prune", daemon=True)
        self._pruning.start()

    def _prune(self):
        """Run the daily prune; one line if it fails, or if a shutdown stopped it (INFO: not a failure)."""
        try:
            self.app.prune_daily()
        except PruneStopped as e:
            self.app.log.info("daily prune stopped at shutdown %s; the rest waits for the next prune", e)
        except StoreError as e:
            if self.app.stopping.is_set():  # the store closed at shutdown under its next write
                self.app.log.info("daily prune stopped at shutdown: %s", e)
                return
            # the database refuses writes (disk full): one line
            self._prune_at = time.time() + PRUNE_AGAIN
            self.app.log.error("daily prune failed: %s; tried again in %d minutes", e, PRUNE_AGAIN // 60)
        except Exception:
            self._prune_at = time.time() + PRUNE_AGAIN
            self.app.log.exception("daily prune failed; tried again in %d minutes", PRUNE_AGAIN // 60)

    def stored(self, event_id, retry_at=None):
        """The callback for one attempt's outcome (run by the store's writer after the commit): the
        event leaves flight, and a retry wakes the scheduler at its time. If the outcome could not be
        stored, the event is requeued as soon as the database takes writes again (``requeue_stuck``)."""
        def then(error):
            if error is not None:
                self.app.log.error("event %s: outcome not stored (%s); queued again once the database"
                                   " takes writes", event_id, error)
                with self._lock:
                    self._stuck.add(event_id)
                return
            with self._lock:
                self._inflight.discard(event_id)
            if retry_at is not None:
                self.wake_at(retry_at)
        return then

    def requeue_stuck(self):
        """Put attempts whose outcome was lost to a storage error back in the queue (raises StoreError
        while the database still refuses writes; the scheduler tries again next time)."""
        with self._lock:
            stuck = list(self._stuck)
        if stuck:
            self.app.store.requeue(stuck)
            with self._lock:
                self._stuck.difference_update(stuck)
                self._inflight.difference_update(stuck)

    # -- gates --------------------------------------------------------------------------------------
    def try_start(self, item):
        """True if the job may run now; otherwise it waits in ``_deferred`` until a job ends."""
        event_id, route, key = item
        integ = self.app.integration(route)
        limit = integ.max_parallel if integ is not None else None
        with self._lock:
            if (key and key in self._busy_keys) or (limit and self._running.get(route, 0) >= limit):
                self._deferred.append(item)
                return False
            if key:
                self._busy_keys.add(key)
            self._running[route] = self._running.get(route, 0) + 1
            return True

    def take_more(self, route, n):
        """Of the next ``n`` jobs at the front of the queue, those allowed to start now (``try_start``; one
        that is not waits in ``_deferred`` as usual); stops at a job of another route."""
        taken = []
        for _ in range(n):
            with self.queue.mutex:  # look and take in one step: other workers take from the same queue
                if not self.queue.queue or self.queue.queue[0][1] != route:
                    break
                item = self.queue.queue.popleft()
            if self.try_start(item):
                taken.append(item)
        return taken

    def release(self, item, forget=True):
        event_id, route, key = item
        with self._lock:
            self._busy_keys.discard(key)
            self._running[route] = self._running.get(route, 1) - 1
            if forget:
                self._inflight.discard(event_id)
            waiting, self._deferred = self._deferred, []
        for w in waiting:
            self.queue.put(w)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self):
        for w in self.workers:
            t = threading.Thread(target=w.run_forever, name="hookd-worker-%d" % w.index, daemon=True)
            t.start()
            self.threads.append(t)
        t = threading.Thread(target=self._scheduler, name="hookd-scheduler", daemon=True)
        t.start()
        self.threads.append(t)

    def join(self, grace):
        """Wait up to ``grace`` seconds for running jobs; returns the number still running."""
        deadline = time.monotonic() + grace
        with self._wake:
            self._wake.notify_all()
        self.work_changed()  # lease calls waiting for work answer now (they see app.stopping)
        for t in self.threads + ([self._pruning] if self._pruning is not None else []):  # a prune stops at its write
            t.join(max(0.0, deadline - time.monotonic()))
        return sum(1 for w in self.workers if w.busy_since is not None)

    def healthy(self, now=None):
        """Idle workers are healthy; a busy one is healthy until its job's timeout has passed."""
        now = time.monotonic() if now is None else now
        if not all(t.is_alive() for t in self.threads) and not self.app.stopping.is_set():
            return False
        for w in self.workers:
            if w.busy_since is not None and now - w.busy_since > w.busy_timeout:
                return False
        return True


class Worker:
    """One worker; ``loop()`` does one iteration and never raises."""

    def __init__(self, pool, index):
        self.pool, self.index = pool, index
        self.busy_since, self.busy_timeout = None, 0

    def run_forever(self):
        while not self.pool.app.stopping.is_set():
            self.loop(timeout=0.5)

    def loop(self, timeout=0.5, now=None):
        """Take one job from the queue (waiting up to ``timeout``) and run it. Returns its outcome.

        When the job's only work is its route's ``command`` (``batch``), up to
        ``command.batch`` - 1 more of its jobs waiting right behind it in the queue are taken too: all are
        claimed and their pipes made, then their programs are started back to back and waited for
        together (``proc.wait``). While intake keeps the core busy, the first GIL release after a fork
        costs the thread a long wait behind the request threads (the program runs meanwhile); with no
        release between the forks that wait comes once per batch instead of once per job. The outcomes,
        in queue order, are then returned as a list."""
        try:
            item = self.pool.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if not self.pool.try_start(item):
            return "deferred"
        items = [item]
        batch = self.batch(item[1])
        if batch > 1:
            items += self.pool.take_more(item[1], batch - 1)
        attempts = [Attempt(self, item, now) for item in items]
        self.busy_timeout = 0
        try:
            self._drive(attempts)
        finally:
            self.busy_since = None
            self.pool.last_progress = time.monotonic()
            # the next job may start now; the event stays in flight until its outcome is committed
            for a in attempts:
                self.pool.release(a.item, forget=not a.outcome_sent)
        outcomes = [a.outcome for a in attempts]
        return outcomes[0] if len(outcomes) == 1 else outcomes

    def batch(self, route):
        """How many of ``route``'s jobs one iteration may take: its ``command.batch`` when a job's only
        work is its ``command`` action; else 1 (a forward or Teams post after the command would run one
        after the other on this thread while the batch's other programs wait unread)."""
        integ = self.pool.app.integration(route)
        if integ is None or type(integ).run is not Integration.run or integ.actions() != ["command"]:
            return 1
        return integ.conf.int("command.batch")

    def _drive(self, attempts):
        """Advance every attempt to its next program (or its end), wait for those programs together,
        advance each attempt whose program is done, and so on, until each has its outcome (a job whose
        program ends first is stored first, whatever its neighbours do). Each advance runs inside its
        job's ``children.job``, so the programs it starts are recorded as that job's."""
        steps = {a: a.steps() for a in attempts}
        waiting = {}  # attempt -> the program it waits for
        for a in attempts:
            waiting[a] = self._advance(a, steps[a])
        while any(waiting.values()):
            try:
                proc.wait([r for r in waiting.values() if r is not None])
            except Exception:  # each program it did not see to its end carries it (error): a retry
                pass
            for a in attempts:
                r = waiting[a]
                if r is not None and (r.finished is not None or r.error is not None):
                    waiting[a] = self._advance(a, steps[a])

    def _advance(self, attempt, steps):
        """Run an attempt's ``steps`` on: the program it yields next, or None once it has ended."""
        try:
            with self.pool.app.children.job("event %d" % attempt.item[0]):
                return steps.send(None)
        except StopIteration:
            return None
        except Exception:
            self.pool.app.log.exception("worker failed on event %s", attempt.item[0])
            attempt.outcome = "error"
            return None


class Attempt:
    """One attempt at one job: ``steps()`` claims it, runs it up to each program it starts (yielded, for
    the worker to wait on) and stores its outcome (``outcome``: done, retry, dead, gone)."""

    def __init__(self, worker, item, now):
        self.worker, self.item, self.now = worker, item, now
        self.outcome = None
        self.outcome_sent = False  # its outcome was handed to the store

    def steps(self):
        worker, app = self.worker, self.worker.pool.app
        event_id, route = self.item[0], self.item[1]
        row = app.store.claim(event_id, self.now)
        if row is None:
            self.outcome = "gone"
            return
        integ = app.integration(route)
        log = EventLog(app.log, {"event": event_id})
        started = time.monotonic()
        if worker.busy_since is None:
            worker.busy_since = started
        worker.busy_timeout = max(worker.busy_timeout, (integ.job_timeout if integ else 60) + 30)
        try:
            if integ is None:
                raise Fail("route %s is no longer configured" % route)
            progress = json.loads(row["progress"]) if row["progress"] else {}
            note = yield from job_steps(make_context(app, integ, row, log), integ, progress,
                                        lambda p: app.store.save_progress(event_id, p))
        except Retry as e:
            self.outcome = self._retry(row, str(e), e.after, log)
            return
        except Fail as e:
            self.outcome = self._end(row, "dead", str(e) or e.__class__.__name__, None, log)
            return
        except Exception as e:
            log.error("job raised %s: %s", e.__class__.__name__, e)
            app.log.debug("%s", traceback.format_exc())
            self.outcome = self._retry(row, "%s: %s" % (e.__class__.__name__, e), None, log)
            return
        finally:
            app.metrics.job(time.monotonic() - started)
        self.outcome = self._end(row, "done", None, note, log)

    def _retry(self, row, reason, after, log):
        status, error, next_at = after_failure(self.worker.pool.app.settings, row["attempts"], reason, after)
        if status == "dead":
            return self._end(row, "dead", error, None, log)
        delay = next_at - time.time()
        self._store_outcome(row, "retry", reason, None, next_at)
        log.warning("attempt %d failed, retry in %.1fs: %s", row["attempts"], delay, reason)
        return "retry"

    def _store_outcome(self, row, status, error, note, next_at=0.0):
        """Hand the outcome to the store without waiting for its commit (the worker takes its next job
        meanwhile); ``Pool.stored`` takes the event out of flight once it is committed."""
        pool = self.worker.pool
        pool.app.store.finish(row["id"], row["route"], status, error=error, note=note, next_at=next_at,
                              then=pool.stored(row["id"], next_at if status == "retry" else None))
        self.outcome_sent = True

    def _end(self, row, status, error, note, log):
        self._store_outcome(row, status, error, note)
        if status == "done":  # the line every job ends with, without a LogRecord (~20 µs less)
            logs.info(log.logger, "done (%s, attempt %d)%s" % (row["route"], row["attempts"],
                                                              ": %s" % note if note else ""), row["id"])
        else:
            log.error("dead (%s, attempt %d): %s", row["route"], row["attempts"], error)
        return status


def run_steps(ctx, integ, progress, save_progress):
    """The integration's own work, then each action; steps already in ``progress`` are skipped, and
    ``progress`` is saved (``save_progress(progress)``) before a step when an earlier one must not run
    twice. The same code runs a local job and a job leased by a remote worker. Returns the note."""
    return proc.drive(job_steps(ctx, integ, progress, save_progress))


def job_steps(ctx, integ, progress, save_progress):
    """``run_steps`` as steps: a generator that yields each program an action hands over to be waited
    for (``actions.STEPS``: ``command``), so a worker can wait for several jobs' programs at once."""
    if not progress.get("main"):
        note = integ.run(ctx)
        progress.clear()
        progress.update(main=True, note=note, input=ctx.action_input, skip=ctx.skip_actions, actions=[])
    ctx.action_input, ctx.skip_actions = progress.get("input"), progress.get("skip")
    names = [] if ctx.skip_actions else [n for n in integ.actions() if n not in progress["actions"]]
    for i, name in enumerate(names):
        if i > 0 or type(integ).run is not Integration.run:  # remember what must not run twice
            save_progress(progress)
        if name in actions.STEPS:
            yield from actions.STEPS[name](ctx, integ)
        else:
            actions.ACTIONS[name](ctx, integ)
        progress["actions"].append(name)
    return progress.get("note")


def after_failure(settings, attempts, reason, after=None, now=None):
    """(status, error, next_at) for a failed attempt: dead after ``retry.max_attempts``, else a retry
    after ``after`` seconds (an upstream's Retry-After, capped at retry.max_delay) or the backoff."""
    if attempts >= settings.int("retry.max_attempts"):
        return "dead", "%s (after %d attempts)" % (reason, attempts), 0.0
    delay = backoff(attempts, settings.float("retry.base_delay"), settings.float("retry.max_delay"))
    if after is not None:
        delay = min(float(after), settings.float("retry.max_delay"))
    return "retry", reason, (time.time() if now is None else now) + delay


def backoff(attempts, base, cap):
    """Exponential backoff with jitter: base * 2^(attempts-1), capped, scaled by a random 0.5..1.0."""
    delay = min(cap, base * (2 ** max(0, attempts - 1)))
    return delay * (0.5 + random.random() / 2)


def make_context(app, integ, row, log):
    headers = json.loads(row["headers"]) if row["headers"] else {}
    body = row.get("body") or b""
    payload = stored_payload(row["payload"], body, row["element"])
    return JobContext(row["id"], row["route"], row["attempts"], payload, body, headers, row["content_type"],
                      iso(row["received_at"]), integ.conf if integ else None, app.stopping, log,
                      getattr(app, "store", None))

