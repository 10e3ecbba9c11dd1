"""Where the daemon meets systemd: readiness, status, watchdog pings and an inherited listening socket.

Strategy: the protocol itself (sd_notify datagrams, LISTEN_FDS) lives in ``systemd.py``; this module only
decides *when* to speak. Without systemd every call is a cheap no-op. The watchdog is pinged only while
the worker pool is healthy (idle counts as healthy; a worker stuck past its job's timeout does not), so a
wedged pool makes systemd restart hookd.
"""

from . import systemd as sd

DEFAULT_TICK = 1.0


def inherited_socket():
    """The first socket passed by socket activation (LISTEN_FDS), or None."""
    socks = sd.listen_sockets()
    return socks[0] if socks else None


def ready(app):
    sd.notify("READY=1\nSTATUS=%s" % status_line(app))


def stopping():
    sd.notify("STOPPING=1")


def tick_interval():
    """How often the main loop wakes to ping: half the watchdog period, at most DEFAULT_TICK."""
    interval = sd.watchdog_interval()
    return min(DEFAULT_TICK, interval) if interval else DEFAULT_TICK


def tick(app):
    if sd.watchdog_interval() and app.pool.healthy():
        sd.notify("WATCHDOG=1\nSTATUS=%s" % status_line(app))


def status_line(app):
    return "queue depth %d" % app.store.waiting()
