"""Running an outside program safely: no shell, input on stdin, a hard timeout that kills the whole group.

Strategy: every child starts in its own session (``start_new_session=True``), so on a timeout (or when
hookd is stopping) ``os.killpg`` reaches the program and anything it spawned, and no orphan survives.
Output is capped so a chatty program cannot fill memory. Used by the ``command`` action, the Camio
``command:`` labeler and anything else that runs a user's program.
"""

import os
import signal
import subprocess

MAX_OUTPUT = 4 * 1024 * 1024  # bytes kept of stdout and of stderr each


class Finished:
    """returncode (None after a timeout), stdout/stderr (bytes, capped), timed_out (bool)."""

    def __init__(self, returncode, stdout, stderr, timed_out):
        self.returncode, self.stdout, self.stderr, self.timed_out = returncode, stdout, stderr, timed_out


def run(argv, stdin=b"", timeout=300, env=None, cwd=None):
    """Run ``argv`` (a list, never a shell string) and wait at most ``timeout`` seconds.

    On timeout the process group gets SIGKILL. Raises OSError if the program cannot be started."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=cwd, start_new_session=True, close_fds=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
        return Finished(proc.returncode, out[:MAX_OUTPUT], err[:MAX_OUTPUT], False)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = _drain(proc)
        return Finished(None if proc.returncode is None or proc.returncode < 0 else proc.returncode,
                        out[:MAX_OUTPUT], err[:MAX_OUTPUT], True)
    finally:
        if proc.poll() is None:
            kill_group(proc)
            proc.wait()
        else:
            _reap_group(proc.pid)


def _drain(proc):
    """Collect what is left of the output after a kill. A grandchild that escaped into its own session
    may still hold the pipes open: wait a moment, then close our ends instead of waiting forever."""
    try:
        return proc.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        for pipe in (proc.stdout, proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        proc.wait()
        return b"", b""


def kill_group(proc, sig=signal.SIGKILL):
    """Send ``sig`` to the process group of ``proc`` (its own session); ignore it if already gone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap_group(pgid):
    """The leader exited: kill what it left behind in its group (a backgrounded child), if anything."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
