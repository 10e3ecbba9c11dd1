"""Server processes for the benchmark: start pinned to one core, wait until they listen, measure, stop.

Strategy: every target runs in its own session (process group) so that stopping it also stops the
children it forked (gunicorn workers, hookd's commands); ``Server`` is a context manager and ``stop``
sends SIGTERM to the group, then SIGKILL after a grace period, so nothing outlives the benchmark even
on errors. Readiness is a TCP connect to the port the driver picked. Peak RSS is the sum of VmHWM over
the processes of the group (one process for most targets; master + workers for gunicorn); CPU time is
summed the same way, to tell a target that waits from one that runs out of its core.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

SERVER_CPU = "0"
CLIENT_CPU = "1"


def pinned(argv, cpu):
    """``argv`` run through ``taskset -c cpu`` when taskset exists and the machine has 2+ cores."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", cpu] + list(argv)
    return list(argv)


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Server:
    """A target process: ``with Server(name, argv, port, log_path) as srv:`` ... ``srv.peak_rss_kb()``."""

    def __init__(self, name, argv, port, log_path, env=None, cwd=None, cpu=SERVER_CPU):
        self.name, self.port, self.log_path = name, port, log_path
        self.argv = pinned(argv, cpu)
        self.env, self.cwd, self.proc = env, cwd, None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, timeout=30):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     env=self.env, cwd=self.cwd, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("%s did not start listening on %d; see %s"
                                   % (self.name, self.port, self.log_path))
            time.sleep(0.05)

    def stop(self, grace=5.0):
        if self.proc is None or self.proc.poll() is not None:
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        _signal_group(self.proc.pid, signal.SIGKILL)  # stragglers left in the group

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self):
        """User + system CPU seconds used so far by the live processes of this server's group."""
        return sum(_cpu(pid) for pid in _group_pids(self.proc.pid))

    def peak_rss_kb(self):
        """Sum of VmHWM (kB) over the live processes of this server's process group."""
        return sum(_vm_hwm(pid) for pid in _group_pids(self.proc.pid))


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pids():
    """Every pid in /proc now."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (the state first, then ppid, pgrp, ...), or []
    when it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _group_pids(pgid):
    return [pid for pid in pids() if stat_fields(pid)[2:3] == [str(pgid)]]


def _cpu(pid):
    fields = stat_fields(pid)
    if not fields:
        return 0.0
    # utime + stime, and cutime + cstime: the CPU of its children that have exited and been waited for
    # (adnanh/webhook runs its command as a child per request; that CPU is the server's work too)
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / float(os.sysconf("SC_CLK_TCK"))


def _vm_hwm(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
