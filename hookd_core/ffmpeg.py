"""Supervised ffmpeg recordings: a clip of N seconds from a stream, playable or not there at all.

Strategy: ``record()`` starts ffmpeg through ``proc.spawn`` (no shell, its own process group, a clean
environment, recorded with the job when a worker runs it), writing an mp4 to a hidden
temporary name in the destination directory, and watches it from the calling thread. ffmpeg reports its
progress on stdout (``-progress pipe:1``) every quarter second; the supervisor kills the whole group
(SIGKILL) when no new frame arrived for ``stall_timeout`` seconds (a camera hanging mid-stream) or when the
run lasts past ``duration + margin`` (a hung ffmpeg). When ``stopping`` is set (hookd is shutting down)
ffmpeg gets SIGINT, on which it stops reading and writes the mp4 index (moov), so the partial clip stays
playable; a second SIGINT after a grace interrupts a blocked read, and SIGKILL ends anything left. Only
when ffmpeg succeeded (or was stopped on purpose) and ``probe()`` finds a video stream is the temporary
file moved to the final name, never overwriting an existing file (a numeric suffix is added instead).
Everything else deletes the temporary file and raises ``RecordingFailed``, a ``Retry``: a corrupt file
never appears under a final name. Measured (ffmpeg 5.1): one SIGINT finalises a streaming recording in
under 0.1 s; a recording whose input is stalled cannot write its index, so it is dropped.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time

from .api import Fail, Retry
from . import proc

FFMPEG = "ffmpeg"
FFPROBE = "ffprobe"
STATS_PERIOD = 0.25   # seconds between ffmpeg progress reports; the stall check's resolution
STDERR_TAIL = 4096    # bytes of ffmpeg's stderr kept for the error message
PROBE_TIMEOUT = 30    # seconds; ffprobe of a local file that takes longer is broken
MAX_SUFFIX = 1000     # numeric suffixes tried before giving up on a free file name


class RecordingFailed(Retry):
    """The clip could not be recorded this time (stream down, stalled, ffmpeg error); worth retrying."""


class Missing(Fail):
    """ffmpeg or ffprobe is not installed: retrying cannot help."""


class Clip:
    """A finished recording: path (final), duration (seconds, by ffprobe), stopped_early (bool),
    first_frame (seconds from ffmpeg's start to its first frame, or None), cpu (ffmpeg's CPU seconds)."""

    def __init__(self, path, duration, stopped_early, first_frame, cpu):
        self.path, self.duration, self.stopped_early = path, duration, stopped_early
        self.first_frame, self.cpu = first_frame, cpu


def which():
    """Names of the programs (ffmpeg, ffprobe) that are not on PATH; empty when both are there."""
    return [name for name in (FFMPEG, FFPROBE) if shutil.which(name) is None]


def redact(text, secrets=()):
    """``text`` without the given secrets, URL credentials, or Cookie/Authorization header values."""
    for s in secrets:
        if s and len(s) >= 3:
            text = text.replace(s, "***")
    text = re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)
    return re.sub(r"(?i)((?:cookie|authorization):)[^\r\n]*", r"\1 ***", text)


def output_args(duration, recode):
    """ffmpeg's output options for an mp4 of ``duration`` seconds, H.264-encoded or stream-copied."""
    args = ["-t", "%g" % duration, "-map", "0:v:0", "-an"]
    if recode:
        args += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    else:
        args += ["-c:v", "copy"]
    return args + ["-movflags", "+faststart", "-f", "mp4"]


def build_argv(input_args, tmp_path, duration, recode, framerate="auto"):
    """The whole ffmpeg command line. ``input_args`` ends with ``-i URL`` (input options before it).
    A fixed ``framerate`` is the input rate (``-r`` before ``-i``); with ``auto``, an http(s) stream
    (MJPEG has no timestamps of its own) is timed by the wall clock so the clip lasts real seconds."""
    argv = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-nostats",
            "-progress", "pipe:1", "-stats_period", str(STATS_PERIOD)]
    if str(framerate).strip().lower() not in ("", "auto"):
        argv += ["-r", str(framerate).strip()]
    elif _input_url(input_args).startswith(("http://", "https://")):
        argv += ["-use_wallclock_as_timestamps", "1"]
    return argv + list(input_args) + output_args(duration, recode) + ["-y", tmp_path]


def _input_url(input_args):
    args = list(input_args)
    for i, a in enumerate(args[:-1]):
        if a == "-i":
            return args[i + 1]
    return ""


def temp_path(final_path):
    """A hidden, unique name next to ``final_path`` (same directory, so the rename is atomic)."""
    d, base = os.path.split(final_path)
    return os.path.join(d, ".%s.%d.%s.part" % (base, os.getpid(), os.urandom(4).hex()))


def remove_orphans(final_path):
    """Delete temporary files for ``final_path`` left by a process that no longer exists (hookd killed
    with SIGKILL mid-recording); a live process's file is left alone."""
    d, base = os.path.split(final_path)
    prefix = ".%s." % base
    for name in os.listdir(d):
        if not (name.startswith(prefix) and name.endswith(".part")):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(os.path.join(d, name))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record(input_args, out_path, duration, recode=True, framerate="auto", stopping=None, margin=15,
           stall_timeout=10, grace=5, overwrite=False, secrets=(), log=None):
    """Record ``duration`` seconds from the input into ``out_path`` (or a suffixed free name) and return
    a Clip. Raises RecordingFailed (retry) or Missing (ffmpeg absent). ``secrets`` are redacted from
    every message; ``overwrite`` replaces an existing ``out_path`` instead of choosing a new name."""
    missing = which()
    if missing:
        raise Missing("%s not found on PATH" % " and ".join(missing))
    stopping = stopping or threading.Event()
    if stopping.is_set():
        raise RecordingFailed("not started: hookd is stopping")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), mode=0o700, exist_ok=True)
    remove_orphans(os.path.abspath(out_path))
    tmp = temp_path(os.path.abspath(out_path))
    argv = build_argv(input_args, tmp, duration, recode, framerate)
    if log:
        log.info("ffmpeg: %s", " ".join(redact(a, secrets).replace("\r\n", "\\r\\n") for a in argv))
    try:
        run = _Run(argv, stall_timeout, duration + margin, grace, stopping)
        run.wait()
        return _finish(run, tmp, out_path, duration, overwrite, secrets)
    finally:
        _remove(tmp)


def _finish(run, tmp, out_path, duration, overwrite, secrets):
    """Judge the finished run and move the file into place, or raise RecordingFailed."""
    if run.killed_for:
        raise RecordingFailed("ffmpeg killed: %s" % run.killed_for)
    if run.returncode != 0 and not run.stopped:
        raise RecordingFailed("ffmpeg exited with %s: %s" % (
            run.returncode, redact(run.stderr_tail(), secrets) or "no message"))
    got = probe(tmp)
    if got is None:
        raise RecordingFailed("no playable video was recorded%s" % (
            " before the stop" if run.stopped else ": " + redact(run.stderr_tail(), secrets)))
    if not run.stopped and got < duration - 1:
        raise RecordingFailed("the stream ended after %.1f s of %g s" % (got, duration))
    path = place(tmp, out_path, overwrite)
    return Clip(path, got, run.stopped, run.first_frame, run.cpu)


def probe(path, timeout=PROBE_TIMEOUT):
    """The duration in seconds of ``path`` if ffprobe finds a video stream in it, else None."""
    try:
        done = proc.run([FFPROBE, "-v", "error", "-show_entries", "stream=codec_type:format=duration",
                         "-of", "json", path], timeout=timeout)
    except OSError:
        return None
    if done.returncode != 0:
        return None
    try:
        info = json.loads(done.stdout.decode("utf-8"))
        if not any(s.get("codec_type") == "video" for s in info.get("streams", [])):
            return None
        duration = float(info["format"]["duration"])
    except (ValueError, KeyError, TypeError):
        return None
    return duration if duration > 0 else None


def place(tmp, out_path, overwrite=False):
    """Move ``tmp`` to ``out_path``, or to ``NAME-2.mp4``, ``NAME-3.mp4``... if taken; return the path.
    ``os.link`` fails when the target exists, so two recorders never clobber each other's file."""
    if overwrite:
        os.replace(tmp, out_path)
        return out_path
    stem, ext = os.path.splitext(out_path)
    for n in range(1, MAX_SUFFIX + 1):
        candidate = out_path if n == 1 else "%s-%d%s" % (stem, n, ext)
        try:
            os.link(tmp, candidate)
        except FileExistsError:
            continue
        os.unlink(tmp)
        return candidate
    raise RecordingFailed("no free file name for %s" % os.path.basename(out_path))


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Run:
    """One supervised ffmpeg process: started at construction, watched by ``wait()``."""

    def __init__(self, argv, stall_timeout, deadline, grace, stopping):
        self.stall_timeout, self.grace, self.stopping = stall_timeout, grace, stopping
        self.killed_for = None
        self.stopped = False
        self.first_frame = None
        self.cpu = 0.0
        self.returncode = None
        self._frames = 0
        self._stderr = b""
        self.started = time.monotonic()
        self.deadline = self.started + deadline
        self.last_progress = self.started
        try:
            self.child = proc.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        except OSError as e:
            raise Missing("cannot start ffmpeg: %s" % e.strerror)
        self.proc = self.child.popen
        self._readers = [threading.Thread(target=self._read_progress, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._readers:
            t.start()

    def _read_progress(self):
        """Parse ``key=value`` progress lines; a growing frame count is progress."""
        for line in self.proc.stdout:
            if line.startswith(b"frame="):
                try:
                    frames = int(line[6:].strip())
                except ValueError:
                    continue
                if frames > self._frames:
                    now = time.monotonic()
                    if self._frames == 0:
                        self.first_frame = now - self.started
                    self._frames, self.last_progress = frames, now

    def _read_stderr(self):
        for chunk in iter(lambda: self.proc.stderr.read(1024), b""):
            self._stderr = (self._stderr + chunk)[-STDERR_TAIL:]

    def stderr_tail(self):
        return self._stderr.decode("utf-8", "replace").strip().replace("\n", " | ")

    def wait(self):
        """Poll until ffmpeg exits, enforcing the stall and overrun limits and the stop event."""
        stop_sent_at = None
        while not self._reap():
            now = time.monotonic()
            if self.stopping.is_set() and stop_sent_at is None:
                self.stopped, stop_sent_at = True, now
                self._signal(signal.SIGINT)  # ffmpeg finishes the file and exits
            elif stop_sent_at is not None:
                self._escalate(now - stop_sent_at)
            elif now - self.last_progress > self.stall_timeout:
                self._kill("no new frame for %g s (stalled input)" % self.stall_timeout)
            elif now > self.deadline:
                self._kill("still running %.0f s after start" % (now - self.started))
            time.sleep(0.05)
        proc.end(self.child)  # whatever ffmpeg left behind goes too; the store forgets its group
        for t in self._readers:
            t.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def _escalate(self, since_stop):
        """After SIGINT: a second SIGINT at half the grace (it interrupts a blocked read), then SIGKILL."""
        if since_stop > self.grace:
            self._kill("did not stop within %g s of SIGINT" % self.grace)
        elif since_stop > self.grace / 2.0 and not getattr(self, "_second_int", False):
            self._second_int = True
            self._signal(signal.SIGINT)

    def _signal(self, sig):
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _kill(self, reason):
        if self.killed_for is None:
            self.killed_for = reason
        proc.kill_tree(self.child)

    def _reap(self):
        """True once ffmpeg has exited; records its exit code and CPU time (wait4 gives its rusage)."""
        try:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        except ChildProcessError:
            self.returncode = self.proc.poll()
            return True
        if pid == 0:
            return False
        self.returncode = self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.cpu = usage.ru_utime + usage.ru_stime
        return True
