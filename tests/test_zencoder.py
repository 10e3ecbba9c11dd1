"""Zencoder end to end: zencoder-submit against a loopback Zencoder, notifications into the real daemon.

Strategy: one daemon and one ``FakeZencoder`` serve the whole class; every test submits its own job with
``hookd.py zencoder-submit`` so tests do not share state. Notifications are built in the real captured
shape (tests/fake_zencoder.py) and POSTed like Zencoder does. The section's ``command`` action is a tiny
python script that appends the JSON it gets on stdin to a file, so the tests see exactly what the user's
program received. A second class checks the state rules on a real sqlite database without the daemon.
"""

import json
import os
import shutil
import sqlite3
import sys
import tempfile
import unittest

from handlers import zencoder
from tests import fake_zencoder, support

SECRET = "zn-s3cret-9f2"
ROUTE = "/zencoder/notifications"
NOTIFY_URL = "http://zencoder:%s@hookd.example.org%s" % (SECRET, ROUTE)
RECORDER = """import os, sys
data = sys.stdin.read()
marker = os.path.join(os.path.dirname(sys.argv[1]), "fail-next")
if os.path.exists(marker):
    os.remove(marker)
    sys.exit(3)
with open(sys.argv[1], "a") as f:
    f.write(data.replace("\\n", " ") + "\\n")
"""


class ZencoderEndToEnd(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="hookd-zencoder-")
        cls.fake = fake_zencoder.FakeZencoder()
        cls.received = os.path.join(cls.tmp, "summaries.jsonl")
        script = os.path.join(cls.tmp, "record.py")
        with open(script, "w") as f:
            f.write(RECORDER)
        config = "\n".join([
            "[hookd]", "workers = 2", "retry.base_delay = 0.05", "retry.max_delay = 0.2",
            "[zencoder]",
            "api.url = %s" % cls.fake.api_url,
            "api_key = %s" % fake_zencoder.API_KEY,
            "notification.secret = %s" % SECRET,
            "notification.url = %s" % NOTIFY_URL,
            "output.url = gcs://bucket/_/{name}-{width}x{height}.{format}",
            "submit.attempts = 3",
            "submit.backoff = 0.05",
            "command = %s %s %s" % (sys.executable, script, cls.received),
            "command.timeout = 20", ""])
        cls.d = support.Daemon(config, tmpdir=cls.tmp).start()

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.fake.close()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def setUp(self):
        self.fake.fail_next = []

    # -- helpers ----------------------------------------------------------------------------------------
    def submit(self, *outputs, input_url="gcs://59d69c94f488551661254569/_/02.mkv"):
        args = ["zencoder-submit", input_url]
        for out in outputs:
            args += ["--output", out]
        r = self.d.cli(*args)
        self.assertEqual(r.returncode, 0, r.stderr)
        return int(r.stdout.strip())

    def notify(self, payload, secret=SECRET, **kw):
        kw.setdefault("schedule", ())
        return fake_zencoder.notify(self.d.url + ROUTE, payload, secret=secret, **kw)

    def delivered(self, payload, **kw):
        """Notify, expect 202, wait until the event is done; returns the event id."""
        status, _, body = self.notify(payload, **kw)
        self.assertEqual(status, 202, body)
        event_id = json.loads(body)["id"]
        self.d.wait_status(event_id, "done")
        return event_id

    def job(self, job_id):
        status, _, body = self.d.admin("GET", "/zencoder/jobs/%d" % job_id)
        self.assertEqual(status, 200, body)
        return json.loads(body)

    def summaries(self, job_id):
        """Every document the command got about this job (a summary, or any other event document)."""
        if not os.path.exists(self.received):
            return []
        with open(self.received) as f:
            docs = [json.loads(line) for line in f if line.strip()]
        return [doc for doc in docs if doc.get("job_id") == job_id or str(job_id) in json.dumps(doc)]

    def zencoder_events(self):
        return len(self.d.events("--route", "zencoder"))

    # -- submit -----------------------------------------------------------------------------------------
    def test_submit_records_pending_file_with_one_variation_per_output(self):
        job_id = self.submit("mp4:1920x1080", "webm:1280x720")
        sent = self.fake.jobs[job_id]
        self.assertEqual(sent["input"], "gcs://59d69c94f488551661254569/_/02.mkv")
        self.assertEqual(sent["notifications"], [NOTIFY_URL])
        self.assertEqual(sent["outputs"][0], {
            "format": "mp4", "size": "1920x1080", "notifications": [NOTIFY_URL],
            "url": "gcs://bucket/_/02-1920x1080.mp4"})
        self.assertEqual(sent["outputs"][1]["size"], "1280x720")
        self.assertNotIn("witdh", json.dumps(sent))
        posts = [r for r in self.fake.seen if r.path == "/api/v2/jobs" and r.json().get("outputs") == sent["outputs"]]
        self.assertEqual(posts[-1].headers["zencoder-api-key"], fake_zencoder.API_KEY)
        job = self.job(job_id)
        self.assertEqual((job["job_id"], job["status"]), (job_id, "pending"))
        self.assertEqual([(v["format"], v["width"], v["height"], v["state"]) for v in job["variations"]],
                         [("mp4", 1920, 1080, "pending"), ("webm", 1280, 720, "pending")])
        self.assertEqual([v["output_id"] for v in job["variations"]],
                         [o["id"] for o in sent["_outputs"]])

    def test_submit_reports_4xx_and_exits_1(self):
        self.fake.fail_next = [(422, {"errors": ["Input is not a valid URL"]})]
        r = self.d.cli("zencoder-submit", "nonsense", "--output", "mp4:640x360")
        self.assertEqual(r.returncode, 1)
        self.assertIn("422", r.stderr)
        self.assertIn("Input is not a valid URL", r.stderr)
        self.assertEqual(r.stdout, "")

    def test_submit_retries_5xx_and_rate_limit(self):
        before = self.fake.count("/api/v2/jobs")
        self.fake.fail_next = [(503, b"Service Unavailable"), (403, {"errors": ["Rate Limit Exceeded"]})]
        job_id = self.submit("mp4:640x360")
        self.assertEqual(self.fake.count("/api/v2/jobs") - before, 3)
        self.assertEqual(self.job(job_id)["status"], "pending")

    def test_submit_gives_up_after_a_few_attempts(self):
        before = self.fake.count("/api/v2/jobs")
        self.fake.fail_next = [(403, {"errors": ["Rate Limit Exceeded"]})] * 3
        r = self.d.cli("zencoder-submit", "gcs://b/x.mkv", "--output", "mp4:640x360")
        self.assertEqual(r.returncode, 1)
        self.assertIn("Rate Limit Exceeded", r.stderr)
        self.assertEqual(self.fake.count("/api/v2/jobs") - before, 3)

    def test_submit_bad_usage_exits_2(self):
        for args in (["gcs://b/x.mkv"], ["gcs://b/x.mkv", "--output", "mp4:1920"],
                     ["gcs://b/x.mkv", "--output", "mp4:0x360"]):
            r = self.d.cli("zencoder-submit", *args)
            self.assertEqual(r.returncode, 2, (args, r.stderr))

    # -- notifications ----------------------------------------------------------------------------------
    def test_missing_or_wrong_secret_is_401_and_nothing_stored(self):
        job_id = self.submit("mp4:1920x1080")
        payload = fake_zencoder.job_notification(self.fake, job_id, "finished")
        before = self.zencoder_events()
        self.assertEqual(self.notify(payload, secret=None)[0], 401)
        self.assertEqual(self.notify(payload, secret="not-the-secret")[0], 401)
        self.assertEqual(self.notify(payload, secret=SECRET + "x")[0], 401)
        wrong_auth = "http://zencoder:not-the-secret@127.0.0.1:%d%s" % (self.d.port, ROUTE)
        self.assertEqual(fake_zencoder.notify(wrong_auth, payload, schedule=())[0], 401)
        self.assertEqual(self.zencoder_events(), before)
        self.assertEqual(self.job(job_id)["status"], "pending")
        self.assertNotIn("not-the-secret", self.d.log())
        self.assertNotIn(SECRET, self.d.log())

    def test_basic_auth_secret_from_the_notification_url_is_accepted(self):
        job_id = self.submit("mp4:1920x1080")
        url = fake_zencoder.rebase(self.fake.jobs[job_id]["notifications"][0], self.d.url)
        payload = fake_zencoder.job_notification(self.fake, job_id, "processing")
        status, _, body = fake_zencoder.notify(url, payload)
        self.assertEqual(status, 202, body)
        self.d.wait_status(json.loads(body)["id"], "done")
        self.assertEqual(self.job(job_id)["status"], "processing")

    def test_finished_then_duplicate_then_late_processing(self):
        job_id = self.submit("mp4:1920x1080", "webm:1280x720")
        finished = fake_zencoder.job_notification(self.fake, job_id, "finished", sizes={0: 6050358, 1: 4100})
        self.delivered(finished)
        job = self.job(job_id)
        self.assertEqual(job["status"], "finished")
        mp4, webm = job["variations"]
        self.assertEqual(mp4["length"], finished["outputs"][0]["file_size_in_bytes"])
        self.assertEqual((mp4["width"], mp4["height"], mp4["duration"], mp4["state"]),
                         (1920, 1080, 100.84, "finished"))
        self.assertEqual((webm["length"], webm["state"]), (4100, "finished"))

        status, _, body = self.notify(finished)  # Zencoder repeats notifications
        self.assertIn(status, (200, 202))
        self.assertEqual(json.loads(body)["status"], "duplicate")
        again = fake_zencoder.job_notification(self.fake, job_id, "finished", sizes={0: 6050358, 1: 4100})
        again["job"]["updated_at"] = "2030-01-01T00:00:00Z"
        self.assertEqual(json.loads(self.notify(again)[2])["status"], "duplicate")  # only a timestamp differs
        one_output = fake_zencoder.notification(job_id, "finished", finished["outputs"][:1])
        self.delivered(one_output)  # other news of the same finished job: stored, changes nothing
        late = fake_zencoder.job_notification(self.fake, job_id, "processing", sizes={0: 1, 1: 2})
        self.delivered(late)
        self.assertEqual(self.job(job_id), job)

        sent = self.summaries(job_id)
        self.assertEqual(len(sent), 1, sent)
        self.assertEqual((sent[0]["status"], sent[0]["input"]), ("finished", job["input"]))
        self.assertEqual([v["length"] for v in sent[0]["variations"]], [6050358, 4100])

    def test_failed_output_keeps_its_error(self):
        job_id = self.submit("mp4:1920x1080", "webm:1280x720")
        failed = fake_zencoder.job_notification(self.fake, job_id, "failed",
                                                errors={1: "Unsupported video codec: vp9 at 1280x720"},
                                                output_state="finished")
        self.delivered(failed)
        job = self.job(job_id)
        self.assertEqual(job["status"], "failed")
        self.assertEqual(job["variations"][0]["state"], "finished")
        self.assertEqual(job["variations"][1]["state"], "failed")
        self.assertEqual(job["variations"][1]["error"], "Unsupported video codec: vp9 at 1280x720")
        self.delivered(fake_zencoder.job_notification(self.fake, job_id, "finished"))
        self.assertEqual(self.job(job_id)["status"], "failed")
        sent = self.summaries(job_id)
        self.assertEqual([s["status"] for s in sent], ["failed"])
        self.assertEqual(sent[0]["variations"][1]["error"], "Unsupported video codec: vp9 at 1280x720")

    def test_failed_command_is_retried_with_the_same_summary(self):
        job_id = self.submit("mp4:640x360")
        open(os.path.join(self.tmp, "fail-next"), "w").close()  # the command exits 3 once
        status, _, body = self.notify(fake_zencoder.job_notification(self.fake, job_id, "finished"))
        self.assertEqual(status, 202, body)
        event = self.d.wait_status(json.loads(body)["id"], "done")
        self.assertEqual(event["attempts"], 2)
        sent = self.summaries(job_id)
        self.assertEqual([(s["job_id"], s["status"]) for s in sent], [(job_id, "finished")])

    def test_output_without_width_matches_by_format(self):
        job_id = self.submit("mp4:640x360")
        output = fake_zencoder.output_entry(999000111, "mp4", None, None, state="finished", size=777)
        self.delivered(fake_zencoder.notification(job_id, "processing", [output]))
        var = self.job(job_id)["variations"][0]
        self.assertEqual((var["length"], var["state"], var["width"]), (777, "finished", 640))

    def test_chunked_notification_is_accepted(self):
        job_id = self.submit("mp4:640x360")
        body = json.dumps(fake_zencoder.job_notification(self.fake, job_id, "processing")).encode()
        status, _, reply = self.d.post(ROUTE, body, {"Content-Type": "application/json",
                                                     "X-Zencoder-Notification-Secret": SECRET},
                                       chunked=True, chunk_size=13)
        self.assertEqual(status, 202, reply)

    def test_unknown_job_is_404(self):
        self.assertEqual(self.notify(fake_zencoder.notification(1, "finished"))[0], 404)
        status, _, _ = self.d.admin("GET", "/zencoder/jobs/1")
        self.assertEqual(status, 404)
        status, _, _ = self.d.admin("GET", "/zencoder/jobs/not-a-number")
        self.assertEqual(status, 404)

    def test_bad_bodies_are_400_or_422(self):
        job_id = self.submit("mp4:640x360")
        self.assertEqual(self.notify(None, raw=b"<job><id>1</id></job>")[0], 400)
        as_string = fake_zencoder.notification(str(job_id), "finished")
        self.assertEqual(self.notify(as_string)[0], 422)
        self.assertEqual(self.notify({"outputs": []})[0], 422)
        bad_outputs = dict(fake_zencoder.notification(job_id, "finished"), outputs="none")
        self.assertEqual(self.notify(bad_outputs)[0], 422)
        self.assertEqual(self.job(job_id)["status"], "pending")


class ZencoderStateRules(unittest.TestCase):
    """apply_notification on a real sqlite database: ordering, matching and the notify-once rule."""

    def setUp(self):
        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        self.conn.executescript(zencoder.SCHEMA)
        zencoder.record_job(self.conn, 7, "gcs://b/a.mkv", [("mp4", 1920, 1080), ("mp4", 1280, 720)],
                            [{"id": 70}, {"id": 71}])

    def apply(self, event_id, state, outputs=()):
        return zencoder.apply_notification(self.conn, event_id,
                                           fake_zencoder.notification(7, state, outputs))

    def test_same_format_is_told_apart_by_width(self):
        self.apply(1, "processing", [fake_zencoder.output_entry(None, "mp4", 1280, 720, size=10),
                                     fake_zencoder.output_entry(None, "mp4", 1920, 1080, size=20)])
        summary = zencoder.file_summary(self.conn, 7)
        self.assertEqual([v["length"] for v in summary["variations"]], [20, 10])

    def test_only_the_finishing_event_notifies_even_when_run_again(self):
        self.assertFalse(self.apply(1, "processing")[1])
        self.assertTrue(self.apply(2, "finished")[1])
        self.assertTrue(self.apply(2, "finished")[1])  # the same event re-run after a crash
        self.assertFalse(self.apply(3, "finished")[1])
        self.assertFalse(self.apply(4, "failed")[1])
        self.assertEqual(zencoder.file_summary(self.conn, 7)["status"], "finished")

    def test_final_variation_is_not_moved_back(self):
        self.apply(1, "processing", [fake_zencoder.output_entry(70, "mp4", 1920, 1080, size=5)])
        self.apply(2, "processing", [fake_zencoder.output_entry(70, "mp4", 1920, 1080, state="processing",
                                                                size=1)])
        var = zencoder.file_summary(self.conn, 7)["variations"][0]
        self.assertEqual((var["state"], var["length"]), ("finished", 5))


class FakeZencoderFollowsUpstreams(unittest.TestCase):
    """The fake itself answers like upstreams.md §5.5 says, so the tests above can trust it."""

    def setUp(self):
        self.fake = fake_zencoder.FakeZencoder()
        self.addCleanup(self.fake.close)

    def create(self, body, key=fake_zencoder.API_KEY):
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Zencoder-Api-Key"] = key
        status, _, reply = support.post(self.fake.api_url + "/jobs", json.dumps(body), headers)
        return status, json.loads(reply)

    def test_job_creation_answers(self):
        good = {"input": "gcs://b/a.mkv", "outputs": [{"format": "mp4", "size": "640x360"}]}
        self.assertEqual(self.create(good, key=None)[0], 401)
        self.assertEqual(self.create(good, key="wrong")[0], 401)
        status, reply = self.create({"input": "gcs://b/a.mkv", "outputs": [{"format": "mp4", "witdh": 640}]})
        self.assertEqual(status, 422)
        self.assertIn("witdh", reply["errors"][0])
        status, reply = self.create(good)
        self.assertEqual(status, 201)
        self.assertIsInstance(reply["id"], int)
        self.assertEqual(set(reply["outputs"][0]), {"id", "label", "url"})


if __name__ == "__main__":
    unittest.main()
