"""IXON alarm → camera clip, end to end: the real daemon, the real ffmpeg, a loopback camera and IXON API v2.

Each class starts ``hookd.py`` with its own ``[ixon]`` section: through the IXON fake (bearer token, or
email/password login), straight from the camera (``stream.url``), with a stalling camera, with a queue of
one, with an unreachable stream, and a shutdown in the middle of a recording. Clips are checked with
ffprobe: the right name, a video stream, and the configured 2 s within ±1 s.
"""

import json
import os
import signal
import time
import unittest

from hookd_core import ffmpeg
from tests.fake_camera import FakeCamera
from tests.fake_ixon import COOKIE, FakeIxon
from tests.support import Daemon, wait_until

HOOKD = """[hookd]
workers = 4
retry.base_delay = 0.05
retry.max_delay = 0.2
retry.max_attempts = %(attempts)d
shutdown_grace = 15
"""

MESSAGE = {
    "userName": "Jane Operator", "alarmRateLimitTill": None,
    "extraInfo": {"Device ID": "0000-1111", "Device name": "Project D4 Alarming machine",
                  "Counter1000Max30": "31"},
    "shortContent": "Counter above 30", "companyId": "1111-2222-3333-4444-5555",
    "systemLabel": "alarm-medium", "createdOn": "2019-08-29T12:26:24", "companyName": "Acme",
    "userId": "u-1", "longContent": "Counter1000Max30 went above 30 on Project D4 Alarming machine",
}
FIRST_NAME = "2019-08-29T12-26-24_Project_D4_Alarming_machine.mp4"
KEY = "ixon-door-Kq7vR2"  # the secret path segment of the URL given to IXON


def message(**changes):
    msg = json.loads(json.dumps(MESSAGE))
    extra = changes.pop("device", None)
    if extra is not None:
        msg["extraInfo"]["Device name"] = extra
    msg.update(changes)
    return msg


def post_json(d, value, path="/ixon/webhook/" + KEY, **kw):
    status, headers, body = d.post(path, json.dumps(value).encode(), {"Content-Type": "application/json"},
                                   **kw)
    return status, headers, json.loads(body.decode() or "null")


def start_daemon(section, attempts=3, hookd=""):
    d = Daemon(HOOKD % {"attempts": attempts} + hookd + "\n[ixon]\nkey = %s\n" % KEY + section)
    d.start()
    return d


class Base(unittest.TestCase):
    def video_dir(self):
        return os.path.join(self.d.state_dir, "videos")

    def videos(self):
        try:
            return sorted(os.listdir(self.video_dir()))
        except FileNotFoundError:
            return []

    def accepted(self, value, **kw):
        status, _, doc = post_json(self.d, value, **kw)
        self.assertEqual(status, 202, doc)
        self.assertEqual(doc["status"], "queued")
        return doc["id"]

    def assert_clip(self, name, seconds=2.0, codec=None):
        path = os.path.join(self.video_dir(), name)
        self.assertTrue(os.path.exists(path), "%s not in %s" % (name, self.videos()))
        self.assertAlmostEqual(ffmpeg.probe(path), seconds, delta=1.0)
        if codec:
            from tests.test_ffmpeg import codec_of
            self.assertEqual(codec_of(path), codec)
        return path


class ThroughIxonApiTest(Base):
    """IXON API v2 with a service-account token; the camera sits behind the web-access proxy."""

    @classmethod
    def setUpClass(cls):
        cls.cam = FakeCamera(fps=10)
        cls.ixon = FakeIxon(cls.cam)
        cls.d = start_daemon("""api.url = %s
api.application = %s
company = %s
token = %s
webaccess.server = %s
stream.path = /video.mjpg
duration = 2
""" % (cls.ixon.api_url, cls.ixon.application, cls.ixon.company, next(iter(cls.ixon.tokens)),
            cls.ixon.server_id))

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.ixon.close()
        cls.cam.close()

    def test_alarm_records_one_named_clip_through_web_access(self):
        event_id = self.accepted(MESSAGE)
        e = self.d.wait_status(event_id, "done", timeout=30)
        self.assertIn(FIRST_NAME, e["note"] or "")
        self.assert_clip(FIRST_NAME, codec="h264")
        posts = self.ixon.requests("api", "/api/web-access")
        self.assertTrue(posts)
        _, _, h = posts[-1]
        self.assertEqual(h["api-version"], "2")
        self.assertEqual(h["api-application"], self.ixon.application)
        self.assertEqual(h["api-company"], self.ixon.company)
        self.assertEqual(h["authorization"], "Bearer " + next(iter(self.ixon.tokens)))
        streams = self.ixon.requests("wa", "/video.mjpg")
        self.assertTrue(streams and COOKIE + "=" in streams[-1][2].get("cookie", ""))
        self.assertNotIn(next(iter(self.ixon.tokens)), self.d.log())

    def test_double_encoded_body_and_chunked_framing(self):
        value = json.dumps(message(device="Press 7", createdOn="2020-01-02T03:04:05"))
        event_id = self.accepted(value, chunked=True)  # a JSON string holding the message
        self.d.wait_status(event_id, "done", timeout=30)
        self.assert_clip("2020-01-02T03-04-05_Press_7.mp4")

    def test_same_name_gets_a_suffix_and_a_repeat_is_a_duplicate(self):
        first = message(device="Lathe/../3", createdOn="2021-05-06T07:08:09", shortContent="a")
        second = message(device="Lathe/../3", createdOn="2021-05-06T07:08:09", shortContent="b")
        ids = [self.accepted(first), self.accepted(second)]
        status, _, doc = post_json(self.d, first)
        self.assertIn(status, (200, 202))
        self.assertEqual(doc["status"], "duplicate")
        for event_id in ids:
            self.d.wait_status(event_id, "done", timeout=40)
        self.assert_clip("2021-05-06T07-08-09_Lathe..3.mp4")
        self.assert_clip("2021-05-06T07-08-09_Lathe..3-2.mp4")

    def test_bad_bodies_are_refused_and_not_stored(self):
        before = len(self.d.events())
        no_device = message()
        del no_device["extraInfo"]["Device name"]
        cases = [(message(createdOn=""), 422), (no_device, 422), ({"extraInfo": "x"}, 422),
                 ([MESSAGE], 422), (json.dumps("just a string"), 422)]
        for value, want in cases:
            self.assertEqual(post_json(self.d, value)[0], want, value)
        status, _, _ = self.d.post("/ixon/webhook/" + KEY, b"{not json", {"Content-Type": "application/json"})
        self.assertEqual(status, 400)
        self.assertEqual(len(self.d.events()), before)

    def test_test_recording_prints_an_existing_playable_path(self):
        out = os.path.join(self.d.tmp, "check.mp4")
        r = self.d.cli("test-recording", "--out", out)
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = r.stdout.splitlines()
        self.assertEqual(lines[0], out)
        self.assertTrue(os.path.exists(lines[0]))
        self.assertAlmostEqual(ffmpeg.probe(out), 2.0, delta=1.0)
        self.assertRegex(lines[1], r"^duration \d+\.\d\d s$")

    def test_ixon_configure_lists_companies_agents_and_servers(self):
        r = self.d.cli("ixon-configure")
        self.assertEqual(r.returncode, 0, r.stderr)
        for text in (self.ixon.company, "agent-1", self.ixon.server_id):
            self.assertIn(text, r.stdout)


class LoginAndDigestTest(Base):
    """email/password login (token cached across recordings); the camera wants HTTP digest auth."""

    @classmethod
    def setUpClass(cls):
        cls.cam = FakeCamera(fps=10, auth="digest", username="viewer", password="d1gest pass")
        cls.ixon = FakeIxon(cls.cam, token=None, data_as_list=True)
        cls.d = start_daemon("""api.url = %s
api.application = %s
company = %s
email = %s
password = %s
webaccess.server = %s
camera.auth = digest
camera.username = viewer
camera.password = d1gest pass
duration = 2
recode = false
""" % (cls.ixon.api_url, cls.ixon.application, cls.ixon.company, cls.ixon.email, cls.ixon.password,
            cls.ixon.server_id))

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.ixon.close()
        cls.cam.close()

    def test_login_once_for_two_recordings(self):
        ids = [self.accepted(message(createdOn="2022-01-01T00:00:0%d" % i)) for i in (1, 2)]
        for event_id in ids:
            self.d.wait_status(event_id, "done", timeout=40)
        self.assertEqual(self.ixon.logins, 1)
        self.assert_clip("2022-01-01T00-00-01_Project_D4_Alarming_machine.mp4", codec="mjpeg")
        digest = [h for _, _, h in self.ixon.requests("wa", "/video.mjpg")
                  if h.get("authorization", "").startswith("Digest ")]
        self.assertTrue(digest, "the camera's digest challenge was not answered")
        self.assertNotIn("d1gest pass", self.d.log())
        self.assertNotIn(self.ixon.password, self.d.log())


class DirectStreamTest(Base):
    """stream.url straight from a camera with basic auth, stream copy, and a queue of one."""

    @classmethod
    def setUpClass(cls):
        cls.cam = FakeCamera(fps=10, auth="basic", username="cam", password="b4sic")
        cls.d = start_daemon("""stream.url = %s
camera.auth = basic
camera.username = cam
camera.password = b4sic
duration = 2
recode = false
queue_size = 1
""" % cls.cam.stream_url)

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.cam.close()

    def test_direct_stream_with_basic_auth_and_copy(self):
        event_id = self.accepted(message(createdOn="2023-03-03T03:03:03"))
        self.d.wait_status(event_id, "done", timeout=30)
        self.assert_clip("2023-03-03T03-03-03_Project_D4_Alarming_machine.mp4", codec="mjpeg")
        self.assertTrue(any(h.get("authorization", "").startswith("Basic ") for _, h in self.cam.requests))
        self.assertNotIn("b4sic", self.d.log())

    def test_full_queue_answers_503_with_retry_after_and_stores_nothing(self):
        event_id = self.accepted(message(createdOn="2023-04-04T04:04:04"))
        status, headers, _ = post_json(self.d, message(createdOn="2023-04-04T04:04:05"))
        self.assertEqual(status, 503)
        self.assertGreaterEqual(int(headers["retry-after"]), 1)
        self.d.wait_status(event_id, "done", timeout=30)
        created = [(self.d.event(x["id"]).get("payload") or {}).get("createdOn") for x in self.d.events()]
        self.assertNotIn("2023-04-04T04:04:05", created)
        later = self.accepted(message(createdOn="2023-04-04T04:04:05"))  # the sender's retry gets in
        self.d.wait_status(later, "done", timeout=30)


class DoorTest(Base):
    """The URL given to IXON carries a key (IXON signs nothing); clips older than video.keep_days go."""

    @classmethod
    def setUpClass(cls):
        cls.cam = FakeCamera(fps=10)
        cls.d = start_daemon("stream.url = %s\nduration = 2\nallow.from = 10.0.0.0/8, 127.0.0.0/8\n"
                             "video.keep_days = 1\n" % cls.cam.stream_url)

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.cam.close()

    def test_no_key_is_404_wrong_key_401_and_the_key_is_never_logged(self):
        before = len(self.d.events())
        self.assertEqual(post_json(self.d, MESSAGE, path="/ixon/webhook")[0], 404)
        self.assertEqual(post_json(self.d, MESSAGE, path="/ixon/webhook/")[0], 404)
        self.assertEqual(post_json(self.d, MESSAGE, path="/ixon/webhook/%s/x" % KEY)[0], 404)
        self.assertEqual(post_json(self.d, MESSAGE, path="/ixon/webhook/" + KEY[:-1])[0], 401)
        self.assertEqual(post_json(self.d, MESSAGE, path="/ixon/webhook/" + KEY + "x")[0], 401)
        self.assertEqual(len(self.d.events()), before)
        event_id = self.accepted(message(createdOn="2024-02-02T02:02:02"))
        self.d.wait_status(event_id, "done", timeout=30)
        self.assertNotIn(KEY, self.d.log())

    def test_deeply_nested_json_is_400_not_500(self):
        for body in (b"[" * 100000 + b"]" * 100000, json.dumps("[" * 100000).encode()):
            status, _, _ = self.d.post("/ixon/webhook/" + KEY, body, {"Content-Type": "application/json"})
            self.assertIn(status, (400, 422))
        self.assertNotIn("Traceback", self.d.log())

    def test_prune_deletes_clips_older_than_keep_days(self):
        os.makedirs(self.video_dir(), exist_ok=True)
        old, fresh, other = (os.path.join(self.video_dir(), n) for n in ("old.mp4", "fresh.mp4", "notes.txt"))
        for path in (old, fresh, other):
            with open(path, "wb") as f:
                f.write(b"x")
        two_days_ago = time.time() - 2 * 86400
        for path in (old, other):
            os.utime(path, (two_days_ago, two_days_ago))
        r = self.d.cli("prune")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertFalse(os.path.exists(old))
        self.assertTrue(os.path.exists(fresh) and os.path.exists(other))  # only clips, only old ones
        self.assertIn("1 clip", r.stdout)


class AllowFromTest(Base):
    """allow.from: only these client addresses may post (403 otherwise, right key or not)."""

    @classmethod
    def setUpClass(cls):
        cls.d = start_daemon("stream.url = http://127.0.0.1:9/video.mjpg\nallow.from = 10.0.0.0/8 192.0.2.7\n")

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def test_other_addresses_get_403_and_nothing_is_stored(self):
        for path in ("/ixon/webhook/" + KEY, "/ixon/webhook/wrong"):
            self.assertEqual(post_json(self.d, MESSAGE, path=path)[0], 403)
        self.assertEqual(self.d.events(), [])


class LowDiskTest(Base):
    """Below min_free_mb a recording waits (retried later) instead of filling the disk; intake goes on and
    /readyz says why."""

    @classmethod
    def setUpClass(cls):
        cls.cam = FakeCamera(fps=10)
        cls.d = start_daemon("stream.url = %s\nduration = 2\n" % cls.cam.stream_url, attempts=8,
                             hookd="min_free_mb = 900000000\n")

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.cam.close()

    def test_recording_waits_and_readyz_says_why(self):
        event_id = self.accepted(MESSAGE)
        e = self.d.wait_status(event_id, ("retry", "dead"), timeout=20)
        self.assertIn("min_free_mb", e["last_error"])
        self.assertEqual(self.videos(), [])
        self.assertEqual(self.cam.connections, 0)
        status, _, body = self.d.get("/readyz")
        self.assertEqual(status, 200)  # still ready: a load balancer must keep sending webhooks here
        self.assertEqual(json.loads(body)["status"], "degraded")
        self.assertIn("min_free_mb", json.loads(body)["reason"])
        self.accepted(message(createdOn="2025-01-01T00:00:00"))  # intake keeps working


class CheckConfigTest(unittest.TestCase):
    def test_ixon_without_key_is_a_problem_line(self):
        d = Daemon("[ixon]\nstream.url = http://127.0.0.1:9/v.mjpg\n")
        r = d.cli("check-config")
        self.assertEqual(r.returncode, 1)
        self.assertIn("[ixon] key is required", r.stdout.splitlines())
        d = Daemon("[ixon]\nkey = a/b\nstream.url = http://127.0.0.1:9/v.mjpg\nallow.from = 10.0.0.0/33\n")
        out = d.cli("check-config").stdout
        self.assertIn("[ixon] key must not contain '/'", out)
        self.assertIn("[ixon] allow.from", out)


class CameraOnly(Base):
    """A daemon recording straight from one fake camera: CAMERA (FakeCamera options), SECTION (the rest
    of [ixon], with %(url)s for the camera's base URL), ATTEMPTS (retry.max_attempts)."""
    CAMERA, SECTION, ATTEMPTS = {}, "", 3

    @classmethod
    def setUpClass(cls):
        cls.cam = FakeCamera(fps=10, **cls.CAMERA)
        cls.d = start_daemon(cls.SECTION % {"url": cls.cam.url}, attempts=cls.ATTEMPTS)

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.cam.close()


class StallTest(CameraOnly):
    """A camera that hangs mid-stream: ffmpeg is killed by the stall check, the job is retried."""
    CAMERA = {"stall_after": 5, "stall_connections": 1}
    SECTION = "stream.url = %(url)s/video.mjpg\nduration = 2\nstall_timeout = 1\n"

    def test_stalled_recording_is_killed_and_retried(self):
        event_id = self.accepted(MESSAGE)
        e = self.d.wait_status(event_id, "done", timeout=40)
        self.assertEqual(e["attempts"], 2)
        self.assertEqual(self.cam.connections, 2)
        self.assertRegex(self.d.log(), r"ffmpeg killed: no new frame .*stalled")
        self.assertEqual(self.videos(), [FIRST_NAME])
        self.assert_clip(FIRST_NAME)


class UnreachableStreamTest(CameraOnly):
    """A stream that never works: retried, then dead, and no file at all."""
    SECTION, ATTEMPTS = "stream.url = %(url)s/missing\nduration = 2\n", 2

    def test_failed_recording_is_retried_then_dead(self):
        event_id = self.accepted(MESSAGE)
        e = self.d.wait_status(event_id, "dead", timeout=30)
        self.assertEqual(e["attempts"], 2)
        self.assertIn("404", e["last_error"])
        self.assertEqual(self.videos(), [])


class ShutdownTest(Base):
    """SIGTERM in the middle of a recording: a playable (shorter) clip under the final name, or none."""

    def setUp(self):
        self.cam = FakeCamera(fps=10)
        self.addCleanup(self.cam.close)
        self.d = start_daemon("stream.url = %s\nduration = 8\n" % self.cam.stream_url)
        self.addCleanup(self.d.stop)

    def test_sigterm_mid_recording_leaves_a_playable_clip_or_none(self):
        self.accepted(MESSAGE)
        wait_until(lambda: self.cam.first_frame_at, 15, message="ffmpeg to read the camera")
        wait_until(lambda: time.monotonic() - self.cam.first_frame_at[0] > 1.5, 5)
        self.assertEqual(self.d.stop(signal.SIGTERM), 0)
        names = self.videos()
        self.assertFalse([n for n in names if n.endswith(".part")], names)
        self.assertEqual(names, [FIRST_NAME])  # ffmpeg stopped gracefully: the partial clip is kept
        duration = ffmpeg.probe(os.path.join(self.video_dir(), FIRST_NAME))
        self.assertIsNotNone(duration)
        self.assertLess(duration, 7.0)


class CameraPerDeviceTest(unittest.TestCase):
    """``{device}`` in stream.url / webaccess.server: a camera per machine, each its own serial key."""

    def handler(self, **values):
        from handlers.ixon import Handler
        from hookd_core.config import Section
        return Handler("ixon", Section("ixon", values, Handler.KEYS), None)

    def test_device_names_pick_the_camera_and_the_serial_key(self):
        from handlers.ixon import for_device
        self.assertEqual(for_device("rtsp://cams/{device}/s1", "Hall 3 / press"), "rtsp://cams/Hall_3__press/s1")
        self.assertEqual(for_device("rtsp://cams/{device}", "../.."), "rtsp://cams/unknown")
        self.assertEqual(for_device("rtsp://cams/one", "Hall 3"), "rtsp://cams/one")
        h = self.handler(**{"stream.url": "http://cams/{device}.mjpg"})
        self.assertEqual(h.camera_key("cam1"), h.camera_key("cam1"))
        self.assertNotEqual(h.camera_key("cam1"), h.camera_key("cam2"))
        self.assertEqual(h.stream_input(None, "cam2")[0][-1], "http://cams/cam2.mjpg")
        self.assertEqual(self.handler(**{"webaccess.server": "srv-{device}"}).camera_key("A"), "webaccess:srv-A")
        fixed = self.handler(**{"stream.url": "http://cams/one.mjpg"})
        self.assertEqual(fixed.camera_key("cam1"), fixed.camera_key("cam2"))


if __name__ == "__main__":
    unittest.main()
