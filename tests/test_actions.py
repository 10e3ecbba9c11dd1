"""Tests of hookd_core/actions.py called directly, as a worker does after run(): a real program for
``command`` (stdin, env, exit codes, a timeout that kills its sleeping child), a loopback upstream for
``forward`` (exact bytes, no redirects), and tests/fake_teams.py for both Teams card formats."""

import json
import logging
import os
import shutil
import sys
import tempfile
import textwrap
import threading
import unittest

from hookd_core import actions, config, proc
from hookd_core.api import Fail, JobContext, Retry
from handlers.hook import Handler
from tests.fake_teams import FakeTeams
from tests.support import FakeUpstream, process_alive, wait_until

BODY = b'{"type": "user.created", "data": {"name": "Zo\xc3\xab"}}'

RECORDER = textwrap.dedent("""\
    import json, os, sys
    out = sys.argv[1]
    with open(out + ".stdin", "wb") as f:
        f.write(sys.stdin.buffer.read())
    with open(out + ".env", "w") as f:
        json.dump({k: v for k, v in os.environ.items() if k.startswith("HOOKD_")}, f)
    sys.stderr.write("first line\\nlast line mentions s3cret-value\\n")
    sys.exit(int(sys.argv[2]))
""")

SPAWNER = textwrap.dedent("""\
    import subprocess, sys, time
    child = subprocess.Popen(["sleep", "60"])
    with open(sys.argv[1], "w") as f:
        f.write(str(child.pid))
    time.sleep(60)
""")


def make_ctx(body=BODY, **conf_values):
    """A JobContext for event 7 of [hook:t], its section built the way the core builds it."""
    keys = dict(Handler.KEYS, **config.ACTION_KEYS)
    conf = config.Section("hook:t", dict({"verify": "token", "secret": "s3cret-value"}, **conf_values), keys)
    try:
        payload = json.loads(body.decode("utf-8"))
    except ValueError:
        payload = None
    ctx = JobContext(id=7, route="hook:t", attempt=2, payload=payload, body=body,
                     headers={"x-github-event": "push"}, content_type="application/json; charset=utf-8",
                     received_at="2026-01-02T03:04:05Z", conf=conf, stopping=threading.Event(),
                     log=logging.getLogger("test"))
    return ctx, Handler("hook:t", conf, None)


def run_command_action(ctx, hook):
    """The ``command`` action run alone, as a worker with a batch of one runs it."""
    return proc.drive(actions.STEPS["command"](ctx, hook))


class CommandTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="hookd-actions-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.script = os.path.join(self.tmp, "recorder.py")
        with open(self.script, "w") as f:
            f.write(RECORDER)
        self.out = os.path.join(self.tmp, "out dir", "rec")  # a space: argv is split with shlex, no shell
        os.makedirs(os.path.dirname(self.out))

    def command(self, code):
        return "%s %s '%s' %d" % (sys.executable, self.script, self.out, code)

    def test_exit_0_is_done_with_event_json_on_stdin_and_env(self):
        ctx, hook = make_ctx(command=self.command(0))
        self.assertEqual(run_command_action(ctx, hook), "command exited 0")
        with open(self.out + ".stdin", "rb") as f:
            doc = json.loads(f.read())
        self.assertEqual((doc["id"], doc["route"], doc["attempt"]), (7, "hook:t", 2))
        self.assertEqual(doc["payload"], {"type": "user.created", "data": {"name": "Zo\u00eb"}})
        self.assertEqual((doc["body"].encode("utf-8"), doc["body_encoding"]), (BODY, "utf-8"))
        self.assertEqual(doc["headers"], {"x-github-event": "push"})
        self.assertEqual(doc["received_at"], "2026-01-02T03:04:05Z")
        with open(self.out + ".env") as f:
            env = json.load(f)
        self.assertRegex(env.pop("HOOKD_JOB"), r"^[0-9a-f]{16}$")  # the marker its descendants inherit
        self.assertEqual(env, {"HOOKD_EVENT_ID": "7", "HOOKD_ROUTE": "hook:t", "HOOKD_ATTEMPT": "2"})

    def test_non_utf8_body_is_base64_and_action_input_replaces_the_event(self):
        ctx, hook = make_ctx(body=b"\xff\x00raw", command=self.command(0))
        run_command_action(ctx, hook)
        with open(self.out + ".stdin", "rb") as f:
            doc = json.loads(f.read())
        self.assertEqual((doc["body"], doc["body_encoding"], doc["payload"]), ("/wByYXc=", "base64", None))
        ctx.action_input = {"summary": "thumbnail written"}
        run_command_action(ctx, hook)
        with open(self.out + ".stdin", "rb") as f:
            self.assertEqual(json.loads(f.read()), {"summary": "thumbnail written"})

    def test_other_exit_is_retry_with_code_and_last_stderr_line_without_secret(self):
        ctx, hook = make_ctx(command=self.command(3))
        with self.assertRaises(Retry) as cm:
            run_command_action(ctx, hook)
        msg = str(cm.exception)
        self.assertIn("exited 3", msg)
        self.assertIn("last line mentions ***", msg)
        self.assertNotIn("s3cret-value", msg)

    def test_stdout_is_dev_null_and_stderr_gives_the_reason(self):
        probe = "import os, sys; sys.stderr.write(os.readlink('/proc/self/fd/1')); sys.exit(4)"
        ctx, hook = make_ctx(command='%s -c "%s"' % (sys.executable, probe))
        with self.assertRaises(Retry) as cm:
            run_command_action(ctx, hook)
        self.assertEqual(str(cm.exception), "command exited 4: /dev/null")

    def test_the_reason_is_the_last_line_of_stderr_however_much_came_before(self):
        """20 MB of stderr, then the line that says why: last_error gets that line (it got the last line
        of the first 4 MB, a run of "e", when the first MAX_OUTPUT bytes of stderr were kept)."""
        probe = os.path.join(self.tmp, "noisy.py")
        with open(probe, "w") as f:
            f.write("import sys\nw = sys.stderr.buffer.write\nfor _ in range(320):\n    w(b'e' * 65535 + b'\\n')\n"
                    "w(b'out of disk writing /srv/clip.mp4 (s3cret-value)\\n\\n')\nsys.exit(5)\n")
        ctx, hook = make_ctx(command="%s %s" % (sys.executable, probe))
        with self.assertRaises(Retry) as cm:
            run_command_action(ctx, hook)
        self.assertEqual(str(cm.exception), "command exited 5: out of disk writing /srv/clip.mp4 (***)")

    def test_missing_program_is_retry_and_unbalanced_quotes_fail(self):
        ctx, hook = make_ctx(command=os.path.join(self.tmp, "no-such-program"))
        with self.assertRaises(Retry) as cm:
            run_command_action(ctx, hook)
        self.assertIn("could not start", str(cm.exception))
        ctx, hook = make_ctx(command="/bin/echo 'unbalanced")
        with self.assertRaises(Fail):
            run_command_action(ctx, hook)

    def test_timeout_kills_the_whole_process_group(self):
        spawner = os.path.join(self.tmp, "spawner.py")
        with open(spawner, "w") as f:
            f.write(SPAWNER)
        pidfile = os.path.join(self.tmp, "child.pid")
        ctx, hook = make_ctx(**{"command": "%s %s %s" % (sys.executable, spawner, pidfile),
                                "command.timeout": "1.5"})
        with self.assertRaises(Retry) as cm:
            run_command_action(ctx, hook)
        self.assertIn("timed out", str(cm.exception))
        with open(pidfile) as f:
            child = int(f.read())
        wait_until(lambda: not process_alive(child), 5, message="sleeping child %d to be gone" % child)


class ForwardTest(unittest.TestCase):
    def setUp(self):
        self.up = FakeUpstream([(200, b"ok")])
        self.addCleanup(self.up.close)

    def test_delivers_the_exact_bytes_and_content_type(self):
        body = b"\x00\xffnot json, not utf-8\r\n"
        ctx, hook = make_ctx(body=body, forward=self.up.url + "/in?x=1")
        ctx.content_type = "application/octet-stream; x=1"
        self.assertIn("200", actions.ACTIONS["forward"](ctx, hook))
        rec = self.up.wait_for_request()
        self.assertEqual((rec.method, rec.path, rec.body), ("POST", "/in?x=1", body))
        self.assertEqual(rec.headers["content-type"], "application/octet-stream; x=1")
        self.assertEqual(rec.headers["x-hookd-event-id"], "7")

    def test_action_input_is_sent_as_json(self):
        ctx, hook = make_ctx(forward=self.up.url + "/in")
        ctx.action_input = {"asset": "a1"}
        actions.forward(ctx, hook)
        rec = self.up.wait_for_request()
        self.assertEqual((rec.json(), rec.headers["content-type"]), ({"asset": "a1"}, "application/json"))

    def test_non_2xx_is_retry_with_retry_after(self):
        self.up.script = [(503, b"busy", {"Retry-After": "7"})]
        ctx, hook = make_ctx(forward=self.up.url + "/in")
        with self.assertRaises(Retry) as cm:
            actions.forward(ctx, hook)
        self.assertEqual(cm.exception.after, 7)
        self.up.script = [(404, b"no")]
        with self.assertRaises(Retry):
            actions.forward(ctx, hook)

    def test_redirect_is_retry_and_never_followed(self):
        other = FakeUpstream([(200, b"")])
        self.addCleanup(other.close)
        self.up.script = [(307, b"", {"Location": other.url + "/elsewhere"})]
        ctx, hook = make_ctx(forward=self.up.url + "/in")
        with self.assertRaises(Retry) as cm:
            actions.forward(ctx, hook)
        self.assertIn("redirects are not followed", str(cm.exception))
        self.assertEqual((self.up.count(), other.count()), (1, 0))

    def test_unreachable_is_retry(self):
        port = self.up.port
        self.up.close()
        ctx, hook = make_ctx(forward="http://127.0.0.1:%d/in" % port, **{"forward.timeout": "2"})
        with self.assertRaises(Retry):
            actions.forward(ctx, hook)


class TeamsTest(unittest.TestCase):
    def setUp(self):
        self.teams = FakeTeams()
        self.addCleanup(self.teams.close)

    def test_adaptive_card_to_workflows_202_is_done(self):
        ctx, hook = make_ctx(**{"teams.url": self.teams.workflow_url, "teams.format": "adaptive"})
        note = actions.ACTIONS["teams"](ctx, hook)
        self.assertIn("202", note)
        self.assertNotIn("SECRETSIG", note)
        kind, doc = self.teams.cards[0]
        card = doc["attachments"][0]["content"]
        self.assertEqual(kind, "adaptive")
        self.assertEqual(card["body"][0]["text"], "hookd: /hooks/t received an event")
        facts = {f["title"]: f["value"] for f in card["body"][-1]["facts"]}
        self.assertEqual((facts["event"], facts["type"], facts["x-github-event"]), ("7", "user.created", "push"))

    def test_messagecard_to_legacy_200_1_is_done(self):
        ctx, hook = make_ctx(**{"teams.url": self.teams.legacy_url, "teams.format": "messagecard"})
        self.assertIn("200", actions.teams(ctx, hook))
        kind, doc = self.teams.cards[0]
        self.assertEqual((kind, doc["@type"], doc["summary"]), ("messagecard", "MessageCard",
                                                                "hookd: /hooks/t received an event"))
        self.assertIn({"name": "hook", "value": "t"}, doc["sections"][0]["facts"])

    def test_post_teams_reusable_with_text(self):
        card = {"title": "Preservica: MOVED", "facts": [("ref", "abc")], "text": "moved to /x"}
        actions.post_teams(self.teams.workflow_url, "adaptive", card)
        actions.post_teams(self.teams.legacy_url, "messagecard", card)
        adaptive, legacy = self.teams.cards[0][1], self.teams.cards[1][1]
        self.assertEqual(adaptive["attachments"][0]["content"]["body"][1]["text"], "moved to /x")
        self.assertEqual(legacy["text"], "moved to /x")

    def test_wrong_format_for_the_endpoint_is_a_4xx_fail(self):
        card = {"title": "t", "facts": [], "text": ""}
        with self.assertRaises(Fail) as cm:
            actions.post_teams(self.teams.workflow_url, "messagecard", card)
        self.assertIn("400", str(cm.exception))
        with self.assertRaises(Fail):
            actions.post_teams(self.teams.legacy_url, "adaptive", card)
        with self.assertRaises(Fail):
            actions.post_teams(self.teams.legacy_url, "html", card)

    def test_throttling_and_server_errors_are_retry(self):
        card = {"title": "t", "facts": [], "text": ""}
        self.teams.throttle = True
        with self.assertRaises(Retry):
            actions.post_teams(self.teams.legacy_url, "messagecard", card)
        self.teams.throttle = False
        for status in (429, 500, 502):
            self.teams.status = status
            with self.assertRaises(Retry) as cm:
                actions.post_teams(self.teams.workflow_url, "adaptive", card)
            self.assertEqual(cm.exception.after, 1)
        self.teams.status = 404
        with self.assertRaises(Fail):
            actions.post_teams(self.teams.workflow_url, "adaptive", card)


class CheckTest(unittest.TestCase):
    def test_problems_with_action_keys(self):
        ctx, _ = make_ctx(**{"command": "/bin/x 'open", "command.timeout": "0", "forward": "ftp://x",
                             "teams.url": "https://t", "teams.format": "html", "forward.timeout": "x",
                             "command.batch": "0"})
        problems = "\n".join(actions.check(ctx.conf))
        self.assertIn("command.batch must be 1 or more", problems)
        ctx, _ = make_ctx(**{"command": "/bin/true", "command.batch": "two"})
        self.assertIn("command.batch must be a whole number", "\n".join(actions.check(ctx.conf)))
        ctx, _ = make_ctx(**{"command": "/bin/x 'open", "command.timeout": "0", "forward": "ftp://x",
                             "teams.url": "https://t", "teams.format": "html", "forward.timeout": "x"})
        problems = "\n".join(actions.check(ctx.conf))
        for expected in ("cannot be split", "command.timeout must be more than 0",
                         "forward.timeout must be a number", "forward must be an http",
                         "teams.format must be"):
            self.assertIn(expected, problems)
        ctx, _ = make_ctx(command="/bin/true", forward="https://example.org/x")
        self.assertEqual(actions.check(ctx.conf), [])


if __name__ == "__main__":
    unittest.main()
