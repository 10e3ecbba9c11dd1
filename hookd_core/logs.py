"""Logging setup: one line per event to stderr, as text or as one JSON object per line.

Strategy: everything logs through the ``hookd`` logger. A record may carry ``event`` (an event id) via
``extra=`` or through ``EventLog`` (a LoggerAdapter the workers hand to jobs), and both formats show it.
Secrets never reach this module: callers log reasons, routes and ids, never headers or bodies. A message
may quote bytes a client sent (a path, a reason): every control character in it (C0, DEL, C1, newlines
included) is written escaped as ``\\xNN``, and the Unicode line and paragraph separators (U+2028, U+2029)
and direction controls (U+202A-U+202E, U+2066-U+2069, U+200E, U+200F, U+061C) as ``\\u2028``, so no
request can forge a log line, reach a terminal raw, or make a line read differently from what it says
(a right-to-left override in a path, "Trojan Source"): every line ``str.splitlines`` or a viewer could
break at is escaped. A traceback keeps its own lines, the text of each exception in it escaped to one line
the same way; in JSON the ``exc`` field is written with those characters as JSON escapes, so every record
is one line and decodes to what was said.
"""

import contextlib
import json
import logging
import os
import re
import select
import threading
import time
import traceback

from .api import iso

# every control character (every character str.splitlines breaks at among them), the line and paragraph
# separators, and the bidirectional controls that reorder what a viewer shows
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escaped(text, json_line=False):
    """``text`` with every ``_UNSAFE`` character escaped: as ``\\xNN`` (below U+0100) or ``\\u2028`` for a
    text line, or as a JSON escape (``\\u0085``, ``\\u202e``) when ``text`` is a whole JSON line
    (``json_line``: json.dumps escaped C0 already, and leaves the others raw with ensure_ascii=False)."""
    if text.isprintable():  # no character to escape is printable: nothing to do (the usual case)
        return text
    return _UNSAFE.sub(_escape_json if json_line else _escape, text)


def _escape(match):
    code = ord(match.group())
    return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code


def _escape_json(match):
    return "\\u%04x" % ord(match.group())


def _traceback(formatted, error):
    """A formatted exception (``formatted``, of ``error``) whose own lines stay lines, while the text of
    each exception in its chain (which may quote a request) is one escaped line, like a message."""
    chain, seen = [error], set()
    while chain:
        exc = chain.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        text = "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")
        formatted = formatted.replace(text, escaped(text))
        chain += [exc.__cause__, exc.__context__]
    return "\n".join(escaped(line) for line in formatted.split("\n"))


class TextFormatter(logging.Formatter):
    def format(self, record):
        line = self.line(record.created, record.levelname, getattr(record, "event", None), record.getMessage())
        if record.exc_info:
            line += "\n" + _traceback(self.formatException(record.exc_info), record.exc_info[1])
        return line

    @staticmethod
    def line(created, level, event, message):
        return "%s %s %s%s" % (iso(created), level, "event=%s " % event if event is not None else "",
                               escaped(message))


class JsonFormatter(logging.Formatter):
    def format(self, record):
        out = self.fields(record.created, record.levelname, getattr(record, "event", None), record.getMessage())
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return escaped(json.dumps(out, ensure_ascii=False), json_line=True)

    def line(self, created, level, event, message):
        return json.dumps(self.fields(created, level, event, message), ensure_ascii=False)

    @staticmethod
    def fields(created, level, event, message):
        out = {"ts": iso(created), "level": level, "msg": escaped(message)}
        if event is not None:
            out["event"] = event
        return out


_batch = threading.local()  # .lines: the lines a thread holds back inside ``batched()``


class LineHandler(logging.Handler):
    """Writes each formatted line to file descriptor 2 with one ``os.write`` and no lock: a line
    (well under PIPE_BUF) is written whole, so request threads never queue behind each other's logging.
    Inside ``batched()`` a thread's lines are held and written together at the end of the block."""

    def createLock(self):
        self.lock = None

    def emit(self, record):
        try:
            self.write(self.format(record))
        except Exception:
            self.handleError(record)

    @staticmethod
    def write(text):
        put((text + "\n").encode("utf-8", "replace"))


def put(line):
    """Write ``line`` (bytes: one whole line and its newline) to file descriptor 2, or hold it inside
    ``batched()``."""
    held = getattr(_batch, "lines", None)
    if held is None:
        os.write(2, line)
    else:
        held.append(line)


def info(log, message, event=None, line=None):
    """``log.info("%s", message, extra={"event": event})`` for the request path: when ``log`` is as
    ``setup`` left it (one LineHandler, nothing filtered), the same line in the same format goes to the
    same place without building a LogRecord (the writer thread logs every answer; a record costs ~6 µs).
    Any other logger or set-up goes through ``logging`` as usual. ``line``: what ``rendered`` made of
    the same message earlier, written as it is."""
    if line is None:
        line = rendered(log, message, event)
    if line is not None:
        return put(line)
    if log.isEnabledFor(logging.INFO):  # not as ``setup`` left it, or the formatter failed: logging reports it
        log.info("%s", message, extra={"event": event} if event is not None else None)


def rendered(log, message, event=None):
    """The line ``info`` writes for ``message``, formatted now (its time is now) and encoded with its
    newline, as ``put`` takes it; None when ``log`` is not enabled for INFO or not as ``setup`` left it.
    Formatting has no side effect, so the store's writer has a group's lines made while its COMMIT waits
    for the disk, and writes them after it."""
    if not log.isEnabledFor(logging.INFO):
        return None
    handlers = log.handlers
    if len(handlers) == 1 and type(handlers[0]) is LineHandler and not log.filters and not handlers[0].filters \
            and handlers[0].level <= logging.INFO:
        try:
            return (handlers[0].formatter.line(time.time(), "INFO", event, message) + "\n").encode("utf-8", "replace")
        except Exception:
            return None
    return None


@contextlib.contextmanager
def batched():
    """Hold the lines this thread logs inside the block and write them at its end (``hold`` and
    ``write_held``). The store's writer thread logs a whole commit group's answers this way: one write
    instead of one per request, each of which would give up the GIL."""
    hold()
    try:
        yield
    finally:
        write_held()


def hold():
    """From now on hold the lines this thread logs, until ``write_held``."""
    _batch.lines = []


def write_held():
    """Write the lines held since ``hold`` in as few writes as keep every line whole (each write at most
    PIPE_BUF bytes, cut between lines), and hold no more. A write that fails (stderr a pipe whose reader
    went away) loses the lines and nothing else: the writer thread goes on answering."""
    lines, _batch.lines = _batch.lines, None
    chunk, size = [], 0
    try:
        for line in lines:
            if chunk and size + len(line) > select.PIPE_BUF:
                os.write(2, b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            os.write(2, b"".join(chunk))
    except OSError:
        pass  # stderr is gone (EPIPE) or failing: the lines are lost, never the block's own work


def setup(fmt="text", level=logging.INFO):
    """Point the ``hookd`` logger at stderr in ``fmt`` (text | json); returns the logger."""
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False  # unused, costly fields
    logging._srcfile = None  # no caller lookup (a stack walk per line); documented in logging's source
    log = logging.getLogger("hookd")
    handler = LineHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    return log


class EventLog(logging.LoggerAdapter):
    """A logger whose lines carry one event's id."""

    def process(self, msg, kwargs):
        kwargs.setdefault("extra", {})["event"] = self.extra["event"]
        return msg, kwargs
