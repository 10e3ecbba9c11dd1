"""End-to-end tests of the Camio integration: the real daemon, real ffmpeg, real JPEG frames.

Strategy: ``setUpClass`` renders the frames once with ffmpeg (a colour test pattern, a dark grey-scale
"infra-red" frame, a bright frame, and the test pattern with a white box for motion), starts one
``FakeCamio`` on 127.0.0.1 and one daemon whose ``callback.hosts`` allows only ``127.0.0.1``, so a
callback at ``localhost`` (the same fake, another name) must be refused. Each test uses its own event
name (``/labels/<event>`` on the fake) so the tests share the daemon without seeing each other's posts.
The command labeler runs in a second daemon with a small Python "model" that records what it saw.
"""

import json
import os
import shutil
import sys
import tempfile
import unittest

from handlers import camio
from tests import support
from tests.fake_camio import FakeCamio, image, make_frames

KEY = "k3y-Camio_42"
RETRY = "retry.base_delay = 0.05\nretry.max_delay = 0.2\n"


def names(labels_of_one_image):
    return set(labels_of_one_image)


class CamioCase(unittest.TestCase):
    """One daemon (config: ``[hookd]`` retry settings + ``config()``), one fake Camio and the rendered
    frames, shared by the tests of a class."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="hookd-camio-")
        cls.frames = make_frames(cls.tmp)
        cls.camio = FakeCamio()
        cls.d = support.Daemon("[hookd]\n" + RETRY + cls.config(), tmpdir=cls.tmp).start()

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.camio.close()
        shutil.rmtree(cls.tmp, ignore_errors=True)


class CamioStatsTest(CamioCase):
    @classmethod
    def config(cls):
        return "workers = 2\nretry.max_attempts = 40\n[camio]\napi_key = %s\ncallback.hosts = 127.0.0.1\n" % KEY

    def send(self, task, key=KEY, chunked=False):
        return self.d.post("/camio/tasks/" + key, json.dumps(task), {"Content-Type": "application/json"},
                           chunked=chunked)

    def stored(self):
        return len(self.d.events("--route", "camio"))

    def pending(self):
        status, _, body = self.d.get("/camio/tasks/" + KEY)
        self.assertEqual(status, 200)
        return json.loads(body)

    def test_wrong_key_is_401_and_nothing_stored(self):
        before = self.stored()
        task = self.camio.task("wrongkey", [image(self.frames["colour"], "2017-05-05T01:31:13")])
        for key in ("nope", KEY[:-1], KEY + "x", KEY.upper()):
            self.assertEqual(self.send(task, key=key)[0], 401, key)
            self.assertEqual(self.d.get("/camio/tasks/" + key)[0], 401, key)
        self.assertEqual(self.stored(), before)
        self.assertEqual(self.camio.labels_posted("wrongkey"), [])

    def test_missing_fields_is_422(self):
        good = image(self.frames["colour"], "2017-05-05T01:31:13")
        url = self.camio.callback_url("shape")
        cases = {
            "no callback_url": {"images": [good]},
            "no images": {"callback_url": url},
            "empty images": {"callback_url": url, "images": []},
            "images not a list": {"callback_url": url, "images": good},
            "no image_b64": {"callback_url": url, "images": [{"timestamp": "t"}]},
            "image_b64 not base64": {"callback_url": url, "images": [dict(good, image_b64="%%%")]},
            "no timestamp": {"callback_url": url, "images": [{"image_b64": good["image_b64"]}]},
            "timestamp dict without date": {"callback_url": url,
                                            "images": [dict(good, timestamp={"meta_class": "x"})]},
            "callback_url not http": {"callback_url": "file:///etc/passwd", "images": [good]},
            "not an object": [good],
        }
        before = self.stored()
        for why, task in cases.items():
            self.assertEqual(self.send(task)[0], 422, why)
        self.assertEqual(self.d.post("/camio/tasks/" + KEY, b"{not json")[0], 400)
        self.assertEqual(self.stored(), before)

    def test_api_key_never_in_the_log(self):
        self.assertEqual(self.send({"images": []})[0], 422)
        self.d.wait_log("422 camio")
        self.assertNotIn(KEY, self.d.log())

    def test_check_config_reports_a_bad_labeler(self):
        bad = support.Daemon("[camio]\napi_key = a/b\nlabeler = magic\ncallback.hosts =\n",
                             tmpdir=tempfile.mkdtemp(dir=self.tmp))
        r = bad.cli("check-config")
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        out = r.stdout + r.stderr
        for words in ("labeler must be stats or command:", "api_key must not contain", "callback.hosts is empty"):
            self.assertIn(words, out)
        self.assertEqual(self.d.cli("check-config").returncode, 0)

    def test_labels_delivered_in_the_exact_shape_with_the_expected_labels(self):
        f = self.frames
        stamps = ["2017-05-05T01:31:13.00000%d" % n for n in range(1, 6)]
        task = self.camio.task("stills", [
            image(f["colour"], stamps[0]),
            image(f["colour"], stamps[1]),               # same frame again: no motion
            image(f["night"], stamps[2], legacy=True),   # {"meta_class", "date"} form
            image(f["night"], stamps[3]),
            image(f["bright"], stamps[4]),
        ], camera="porch", user_id="u-7")
        status, _, body = self.send(task)
        self.assertEqual(status, 202, body)
        event_id = json.loads(body)["id"]
        self.d.wait_status(event_id, "done")
        posts = self.camio.labels_posted("stills")
        self.assertEqual(len(posts), 1)
        self.assertEqual(posts[0].method, "POST")
        self.assertTrue(posts[0].headers["content-type"].startswith("application/json"))
        sent = posts[0].json()
        self.assertEqual(set(sent), {"status", "labels"})
        self.assertEqual(sent["status"], "success")
        labels = sent["labels"]
        self.assertEqual(set(labels), set(stamps))
        expected = [set(), set(), {"night", "dark", "motion"}, {"night", "dark"}, {"bright", "motion"}]
        for stamp, want in zip(stamps, expected):
            self.assertEqual(names(labels[stamp]), want, stamp)
            for name, value in labels[stamp].items():
                self.assertEqual(set(value), {"probability", "polygon"})
                self.assertEqual(value["polygon"], [])
                self.assertGreaterEqual(value["probability"], 0.5, name)
                self.assertLessEqual(value["probability"], 1.0, name)
        # the dark frame's mean luma (~24) is well past 64 but not black: a middling probability
        self.assertTrue(0.6 < labels[stamps[2]]["dark"]["probability"] < 1.0, labels[stamps[2]])
        self.assertEqual(labels[stamps[2]]["night"]["probability"], 1.0)
        self.assertEqual([n for n in os.listdir(os.path.join(self.d.state_dir, "tmp"))
                          if n.startswith("camio-")], [])

    def test_motion_between_two_different_frames(self):
        task = self.camio.task("motion", [image(self.frames["colour"], "a"), image(self.frames["moved"], "b")])
        status, _, body = self.send(task, chunked=True)
        self.assertEqual(status, 202, body)
        self.d.wait_status(json.loads(body)["id"], "done")
        labels = self.camio.labels_posted("motion")[0].json()["labels"]
        self.assertEqual(labels["a"], {})
        self.assertEqual(names(labels["b"]), {"motion"})
        self.assertGreater(labels["b"]["motion"]["probability"], 0.5)

    def test_callback_host_not_allowed_sends_nothing_and_goes_dead(self):
        task = self.camio.task("ssrf", [image(self.frames["colour"], "t")], host="localhost")
        status, _, body = self.send(task)
        self.assertEqual(status, 202, body)
        event = self.d.wait_status(json.loads(body)["id"], "dead")
        self.assertIn("localhost", event["last_error"])
        self.assertEqual(event["attempts"], 1)
        self.assertEqual(self.camio.labels_posted("ssrf"), [])

    def test_a_redirect_is_not_followed(self):
        elsewhere = self.camio.callback_url("redirected", host="localhost")
        self.camio.hold("bounce", 302, {"Location": elsewhere})
        status, _, body = self.send(self.camio.task("bounce", [image(self.frames["colour"], "t")]))
        self.assertEqual(status, 202, body)
        event_id = json.loads(body)["id"]
        support.wait_until(lambda: len(self.camio.labels_posted("bounce")) >= 2, 20, message="a retry")
        self.assertIn("302", self.d.event(event_id)["last_error"])
        self.camio.release("bounce")
        self.d.wait_status(event_id, "done")
        self.assertEqual(self.camio.labels_posted("redirected"), [])

    def test_callback_503_then_200_is_done(self):
        self.camio.fail_next("flaky", 1, 503)
        status, _, body = self.send(self.camio.task("flaky", [image(self.frames["bright"], "t")]))
        self.assertEqual(status, 202, body)
        event = self.d.wait_status(json.loads(body)["id"], "done")
        posts = self.camio.labels_posted("flaky")
        self.assertEqual(len(posts), 2)
        self.assertEqual(posts[0].json(), posts[1].json())
        self.assertEqual(names(posts[1].json()["labels"]["t"]), {"bright"})
        self.assertEqual(event["attempts"], 2)

    def test_pending_list_shows_a_task_until_it_is_done(self):
        self.camio.hold("slow", 503)
        task = self.camio.task("slow", [image(self.frames["colour"], "t")], camera="gate", user_id="u-9")
        status, _, body = self.send(task)
        self.assertEqual(status, 202, body)
        event_id = json.loads(body)["id"]
        support.wait_until(lambda: self.camio.labels_posted("slow"), 20, message="first callback attempt")
        listed = [t for t in self.pending() if t["id"] == event_id]
        self.assertEqual(len(listed), 1, self.pending())
        self.assertEqual((listed[0]["camera"], listed[0]["user_id"]), ("gate", "u-9"))
        self.assertIn(listed[0]["status"], ("queued", "running", "retry"))
        self.assertRegex(listed[0]["received_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
        self.camio.release("slow")
        self.d.wait_status(event_id, "done")
        self.assertEqual([t for t in self.pending() if t["id"] == event_id], [])

    def test_same_event_twice_is_a_duplicate_and_labelled_once(self):
        task = self.camio.task("twice", [image(self.frames["colour"], "t")])
        first = self.send(task)
        self.assertEqual(first[0], 202, first)
        # the event is known by its callback_url, even when the body differs (a re-sent, re-encoded event)
        for again in (task, dict(task, camera="cam1-renamed")):
            second = self.send(again)
            self.assertIn(second[0], (200, 202))
            self.assertEqual(json.loads(second[2])["status"], "duplicate")
        self.d.wait_status(json.loads(first[2])["id"], "done")
        self.assertEqual(len(self.camio.labels_posted("twice")), 1)


MODEL = r'''
import json, os, subprocess, sys, time
task = json.load(sys.stdin)
image_dir = os.environ["HOOKD_IMAGE_DIR"]
record = {"cwd": os.getcwd(), "image_dir": image_dir, "files": sorted(os.listdir(image_dir)),
          "event_id": os.environ.get("HOOKD_EVENT_ID"), "argv": sys.argv[1:]}
if task["camera"] == "hang":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    record["child"] = child.pid
path = os.path.join(sys.argv[1], "%s-%s.json" % (task["camera"], os.environ["HOOKD_ATTEMPT"]))
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path)
if task["camera"] == "hang":
    time.sleep(120)
if task["camera"] == "crash":
    sys.exit("model crashed: boom")
if task["camera"] == "junk":
    print("cat, dog, mouse")
    sys.exit(0)
labels = {}
for img in task["images"]:
    ts = img["timestamp"]["date"] if isinstance(img["timestamp"], dict) else img["timestamp"]
    labels[ts] = {"cat": {"probability": 0.93, "polygon": [[0.1, 0.2], [0.5, 0.9]]}}
print(json.dumps(labels))
'''


def process_gone(pid):
    """True when ``pid`` no longer runs (gone, or a zombie nobody reaped yet)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class CamioCommandTest(CamioCase):
    @classmethod
    def config(cls):
        """The model (MODEL) writes what it saw to records/<camera>-<attempt>.json."""
        cls.records = os.path.join(cls.tmp, "records")
        os.mkdir(cls.records)
        model = os.path.join(cls.tmp, "model.py")
        with open(model, "w") as f:
            f.write(MODEL)
        return ("retry.max_attempts = 2\n[camio]\napi_key = %s\ncallback.hosts = 127.0.0.1\n"
                "labeler.timeout = 2\nlabeler = command:%s %s %s\n" % (KEY, sys.executable, model, cls.records))

    def send(self, task):
        status, _, body = self.d.post("/camio/tasks/" + KEY, json.dumps(task))
        self.assertEqual(status, 202, body)
        return json.loads(body)["id"]

    def record(self, camera, attempt=1):
        with open(os.path.join(self.records, "%s-%d.json" % (camera, attempt))) as f:
            return json.load(f)

    def test_command_output_is_posted_as_given(self):
        task = self.camio.task("model", [image(self.frames["colour"], "t1"),
                                         image(self.frames["night"], "t2", legacy=True)], camera="yard")
        event_id = self.send(task)
        self.d.wait_status(event_id, "done")
        posts = self.camio.labels_posted("model")
        self.assertEqual(len(posts), 1)
        cat = {"cat": {"probability": 0.93, "polygon": [[0.1, 0.2], [0.5, 0.9]]}}
        self.assertEqual(posts[0].json(), {"status": "success", "labels": {"t1": cat, "t2": cat}})
        seen = self.record("yard")
        state = os.path.realpath(self.d.state_dir) + os.sep
        self.assertTrue(os.path.realpath(seen["image_dir"]).startswith(state), seen)
        self.assertEqual(os.path.realpath(seen["cwd"]), os.path.realpath(seen["image_dir"]))
        self.assertEqual(seen["files"], ["00.jpg", "01.jpg"])
        self.assertEqual(seen["event_id"], str(event_id))
        self.assertFalse(os.path.exists(seen["image_dir"]), "decoded images left behind")

    def test_a_retry_resends_the_labels_without_running_the_model_again(self):
        self.camio.fail_next("once", 1, 503)
        event_id = self.send(self.camio.task("once", [image(self.frames["bright"], "t")], camera="once"))
        event = self.d.wait_status(event_id, "done")
        self.assertEqual(event["attempts"], 2)
        posts = self.camio.labels_posted("once")
        self.assertEqual(len(posts), 2)
        self.assertEqual(posts[0].json(), posts[1].json())
        self.assertTrue(os.path.exists(os.path.join(self.records, "once-1.json")))
        self.assertFalse(os.path.exists(os.path.join(self.records, "once-2.json")), "model ran twice")

    def test_failing_model_is_retried_and_junk_output_fails_at_once(self):
        crash = self.send(self.camio.task("crash", [image(self.frames["colour"], "t")], camera="crash"))
        junk = self.send(self.camio.task("junk", [image(self.frames["colour"], "t")], camera="junk"))
        crashed = self.d.wait_status(crash, "dead")
        self.assertEqual(crashed["attempts"], 2)
        self.assertIn("exited with 1: model crashed: boom", crashed["last_error"])
        junked = self.d.wait_status(junk, "dead")
        self.assertEqual(junked["attempts"], 1)
        self.assertIn("not JSON", junked["last_error"])
        self.assertEqual(self.camio.labels_posted("crash") + self.camio.labels_posted("junk"), [])

    def test_hung_labeler_is_killed_retried_then_dead(self):
        event_id = self.send(self.camio.task("hang", [image(self.frames["colour"], "t")], camera="hang"))
        event = self.d.wait_status(event_id, "dead", timeout=30)
        self.assertIn("timed out", event["last_error"])
        self.assertEqual(event["attempts"], 2)
        self.assertEqual(self.camio.labels_posted("hang"), [])
        for attempt in (1, 2):
            child = self.record("hang", attempt)["child"]
            support.wait_until(lambda: process_gone(child), 10, message="labeler's child %d killed" % child)


class FakeCamioTest(unittest.TestCase):
    """The fake's hook registration, as docs/camio.md tells users to call it (upstreams.md §3.1)."""

    def setUp(self):
        self.camio = FakeCamio(token="t0k")
        self.addCleanup(self.camio.close)

    def test_create_hook_needs_the_token_and_echoes_the_hook(self):
        hook = {"callback_url": "https://hooks.example.org/camio/tasks/KEY", "type": "query_match",
                "parsed_query": "1==1"}
        url = self.camio.url + "/api/users/me/hooks"
        status, headers, body = support.request("POST", url, json.dumps(hook),
                                                {"Content-Type": "application/json",
                                                 "Authorization": "token t0k"})
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "application/json; charset=UTF-8")
        self.assertIn(b"1\\u003d\\u003d1", body)
        answer = json.loads(body)
        self.assertTrue(answer["id"])
        self.assertEqual({k: answer[k] for k in hook}, hook)
        self.assertEqual(support.request("POST", url, json.dumps(hook), {"Authorization": "token x"})[0], 401)
        self.assertEqual(support.request("POST", url, json.dumps(hook))[0], 401)


class ThresholdTest(unittest.TestCase):
    """The probability rule on its own: 0.5 at the threshold, 1.0 at the far end, clamped."""

    def test_past(self):
        self.assertEqual(camio.past(64.0, camio.DARK_LUMA, 0.0), 0.5)
        self.assertEqual(camio.past(0.0, camio.DARK_LUMA, 0.0), 1.0)
        self.assertEqual(camio.past(32.0, camio.DARK_LUMA, 0.0), 0.75)
        self.assertEqual(camio.past(300.0, camio.BRIGHT_LUMA, 255.0), 1.0)
        self.assertEqual(camio.past(18.0, camio.MOTION_DIFF, camio.MOTION_FULL), 0.75)

    def test_timestamp_forms(self):
        self.assertEqual(camio.timestamp_key("2017-05-05T01:31:13"), "2017-05-05T01:31:13")
        self.assertEqual(camio.timestamp_key({"meta_class": "datetime.datetime", "date": "d"}), "d")
        self.assertIsNone(camio.timestamp_key({"meta_class": "datetime.datetime"}))
        self.assertIsNone(camio.timestamp_key(17))


if __name__ == "__main__":
    unittest.main()
