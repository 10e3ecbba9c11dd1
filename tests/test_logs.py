"""Unit tests of hookd_core/logs.py: the line each format writes (text and JSON), control characters
escaped, and the request path's ``logs.info`` writing exactly what ``log.info`` writes, in both formats,
to file descriptor 2 (a real temporary file put in its place), alone and inside ``batched()``; and the
daemon whose stderr's reader went away still answering."""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from hookd_core import logs
from tests.support import HOOKD

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) (.*)$")


class Stderr:
    """File descriptor 2 pointed at a temporary file for the block; ``lines()`` what was written."""

    def __enter__(self):
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.lines()
        self.file.close()

    def lines(self):
        """The lines written so far (split at "\\n" only, so a line a viewer would break elsewhere shows)."""
        if not self.file.closed:
            self.file.seek(0)
            self.written = self.file.read().decode("utf-8").split("\n")[:-1]
        return self.written


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


class LogLinesTest(unittest.TestCase):
    def tearDown(self):
        logs.setup("text")

    def both_ways(self, fmt, message, event=None):
        """(the line log.info writes, the line logs.info writes) for ``message``."""
        log = logs.setup(fmt)
        with Stderr() as err:
            log.info("%s", message, extra={"event": event} if event is not None else None)
            logs.info(log, message, event)
        lines = err.lines()
        self.assertEqual(len(lines), 2, lines)
        return lines

    def test_text_line_with_event_and_escaped_control_characters(self):
        old, new = self.both_ways("text", "202 hook:t stored event 7 from \x1b[31m\nforged\x85\x7f", 7)
        for line in (old, new):
            m = TEXT_LINE.match(line)
            self.assertIsNotNone(m, line)
            self.assertEqual(m.group(2), "event=7 202 hook:t stored event 7 from \\x1b[31m\\x0aforged\\x85\\x7f")

    def test_text_line_without_event_and_non_ascii_kept(self):
        old, new = self.both_ways("text", "200 hook:t duplicate of event 3 from café\xa0x")
        for line in (old, new):
            self.assertEqual(TEXT_LINE.match(line).group(1, 2), ("INFO", "200 hook:t duplicate of event 3 from café\xa0x"))

    def test_json_line_same_fields_both_ways(self):
        for event in (12, None):
            old, new = self.both_ways("json", "202 hook:t stored event 12 from \x00\u2028", event)
            old, new = json.loads(old), json.loads(new)
            self.assertEqual(sorted(old), sorted(new))
            self.assertEqual(sorted(old), ["event", "level", "msg", "ts"] if event else ["level", "msg", "ts"])
            self.assertEqual(old["msg"], "202 hook:t stored event 12 from \\x00\\u2028")
            self.assertEqual((new["level"], new["msg"], new.get("event")), ("INFO", old["msg"], event))
            self.assertRegex(new["ts"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_no_line_breaks_or_direction_controls_where_a_viewer_would_see_them(self):
        """Every character str.splitlines breaks at (U+2028 and U+2029 as well as the C0/C1 ones), in a
        message or in an exception's text, is escaped: a record is one line in text (a traceback its own
        lines only) and one line of valid JSON. So is every Unicode direction control ("Trojan Source":
        U+202A-U+202E, U+2066-U+2069, U+200E, U+200F, U+061C), which would make a line read differently
        from what it says; in JSON as JSON escapes, so the ``exc`` field still decodes to the text."""
        breaks = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
        self.assertEqual(len(("a%sb" % "b".join(breaks)).splitlines()), len(breaks) + 1)  # the list is whole
        controls = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
        hostile = "422 hook:t bad signature: %s" % "forged".join(breaks + controls)
        for fmt in ("text", "json"):
            log = logs.setup(fmt)
            with Stderr() as err:
                logs.info(log, hostile, 3)
                log.warning("%s", hostile)
                try:
                    raise ValueError(hostile) from RuntimeError(hostile)
                except ValueError:
                    log.exception("refused")
                lines = err.lines()
            for line in lines:
                self.assertEqual(line.splitlines(), [line] if line else [], (fmt, line))
                self.assertEqual([c for c in controls if c in line], [], (fmt, line))
            if fmt == "json":
                self.assertEqual(len(lines), 3, lines)
                records = [json.loads(line) for line in lines]
                self.assertEqual([r["msg"] for r in records[:2]], [logs.escaped(hostile)] * 2)
                self.assertIn(hostile, records[2]["exc"])
            else:
                self.assertEqual([TEXT_LINE.match(x).group(2) for x in lines[:2]],
                                 ["event=3 " + logs.escaped(hostile), logs.escaped(hostile)])
                for kind in ("RuntimeError", "ValueError"):  # the cause's text too
                    self.assertIn("%s: %s" % (kind, logs.escaped(hostile)), lines)
        self.assertEqual(logs.escaped("\u2028\u2029\x85\n"), "\\u2028\\u2029\\x85\\x0a")
        self.assertEqual(logs.escaped("a\u202eb\u2066c\u061c"), "a\\u202eb\\u2066c\\u061c")

    def test_batched_lines_are_held_until_the_block_ends(self):
        log = logs.setup("text")
        with Stderr() as err:
            with logs.batched():
                logs.info(log, "first", 1)
                log.warning("second")
                self.assertEqual(err.lines(), [])
            lines = err.lines()
        self.assertEqual([TEXT_LINE.match(x).group(1, 2) for x in lines],
                         [("INFO", "event=1 first"), ("WARNING", "second")])

    def test_level_above_info_writes_nothing(self):
        log = logs.setup("text", level=logging.WARNING)
        with Stderr() as err:
            logs.info(log, "quiet", 1)
        self.assertEqual(err.lines(), [])

    def test_another_handler_gets_the_record(self):
        log = logs.setup("text")
        extra = Recorder()
        log.addHandler(extra)
        try:
            with Stderr() as err:
                logs.info(log, "both", 5)
        finally:
            log.removeHandler(extra)
        self.assertEqual([(r.getMessage(), r.event) for r in extra.records], [("both", 5)])
        self.assertEqual(TEXT_LINE.match(err.lines()[0]).group(2), "event=5 both")



class StderrGoneTest(unittest.TestCase):
    def test_the_daemon_answers_and_stops_after_the_reader_of_its_stderr_went_away(self):
        """hookd's stderr is a pipe whose reader goes away (``hookd ... 2>&1 | tee`` and tee dies): every
        later log write fails with EPIPE. Each POST is still answered 202, also 16 at once (the writer
        thread logs a group's lines together), and SIGTERM stops it (review R5: the failed write inside
        ``batched()`` killed the writer thread; of 16 concurrent POSTs 1 was answered, and SIGTERM hung)."""
        tmp = tempfile.mkdtemp(prefix="hookd-stderr-gone-")
        self.addCleanup(shutil.rmtree, tmp, True)
        conf = os.path.join(tmp, "credentials.properties")
        with open(conf, "w") as f:
            f.write("[hookd]\nstate_dir = %s\nadmin.listen =\n[hook:h]\nverify = none\nallow_unsigned = true\n"
                    % os.path.join(tmp, "var"))
        os.chmod(conf, 0o600)
        p = subprocess.Popen([sys.executable, HOOKD, "127.0.0.1:0", "--config", conf], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(lambda: p.poll() is None and os.killpg(p.pid, signal.SIGKILL))
        seen, deadline, port = b"", time.monotonic() + 20, None
        while port is None and time.monotonic() < deadline:
            more = os.read(p.stdout.fileno(), 4096)
            self.assertTrue(more, "hookd ended before it listened: %r" % seen)
            seen += more
            m = re.search(rb"listening on https?://[0-9.]+:(\d+)", seen)
            port = int(m.group(1)) if m else None
        p.stdout.close()  # the log's reader goes away

        def post(i):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                body = b'{"i": %d}' % i
                s.sendall(b"POST /hooks/h HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                try:
                    return s.recv(4096).split(b"\r\n")[0]
                except socket.timeout:
                    return b"(no answer in 10 s)"
        answers = [post(i) for i in range(3)]
        threads = [threading.Thread(target=lambda i=i: answers.append(post(100 + i))) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(answers, [b"HTTP/1.1 202 Accepted"] * 19)
        os.killpg(p.pid, signal.SIGTERM)
        self.assertEqual(p.wait(30), 0)


if __name__ == "__main__":
    unittest.main()
