"""The ffmpeg supervisor on its own: real ffmpeg, a real loopback MJPEG camera, files checked by ffprobe.

Each test records from tests/fake_camera.py into a temporary directory and checks what is left there:
a playable clip of the right length under the final name, or nothing at all (no corrupt file, no
leftover temporary file).
"""

import os
import shutil
import subprocess
import tempfile
import threading
import time
import unittest

from hookd_core import ffmpeg
from tests.fake_camera import FakeCamera


def codec_of(path):
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "stream=codec_name", "-of", "default=nw=1:nk=1", path],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


class SupervisorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cam = FakeCamera(fps=10)

    @classmethod
    def tearDownClass(cls):
        cls.cam.close()

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="hookd-ffmpeg-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def out(self, name="clip.mp4"):
        return os.path.join(self.dir, name)

    def assert_only(self, names):
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(names))

    def test_recoded_clip_lasts_duration_and_is_h264(self):
        clip = ffmpeg.record(["-i", self.cam.stream_url], self.out(), 2, recode=True)
        self.assertEqual(clip.path, self.out())
        self.assertAlmostEqual(ffmpeg.probe(clip.path), 2.0, delta=1.0)
        self.assertEqual(codec_of(clip.path), "h264")
        self.assertFalse(clip.stopped_early)
        self.assertIsNotNone(clip.first_frame)
        self.assertGreater(clip.cpu, 0.0)
        self.assert_only(["clip.mp4"])

    def test_stream_copy_keeps_mjpeg(self):
        clip = ffmpeg.record(["-i", self.cam.stream_url], self.out(), 2, recode=False)
        self.assertAlmostEqual(ffmpeg.probe(clip.path), 2.0, delta=1.0)
        self.assertEqual(codec_of(clip.path), "mjpeg")

    def test_fixed_input_framerate(self):
        clip = ffmpeg.record(["-i", self.cam.stream_url], self.out(), 2, recode=True, framerate="10")
        self.assertAlmostEqual(clip.duration, 2.0, delta=1.0)

    def test_taken_name_gets_a_numeric_suffix(self):
        with open(self.out(), "wb") as f:
            f.write(b"someone else's file")
        clip = ffmpeg.record(["-i", self.cam.stream_url], self.out(), 1, recode=False)
        self.assertEqual(clip.path, self.out("clip-2.mp4"))
        with open(self.out(), "rb") as f:
            self.assertEqual(f.read(), b"someone else's file")
        self.assert_only(["clip.mp4", "clip-2.mp4"])

    def test_stalled_camera_is_killed_and_nothing_is_left(self):
        cam = FakeCamera(fps=10, stall_after=5)
        self.addCleanup(cam.close)
        started = time.monotonic()
        with self.assertRaises(ffmpeg.RecordingFailed) as cm:
            ffmpeg.record(["-i", cam.stream_url], self.out(), 4, stall_timeout=1.0, margin=30)
        self.assertIn("stalled", str(cm.exception))
        self.assertLess(time.monotonic() - started, 4.0)  # killed by the stall check, not the deadline
        self.assert_only([])

    def test_over_long_run_is_killed(self):
        # 25 fps assumed for a 5 fps camera: 2 s of video needs 10 s of stream, past 2 s + 1 s margin.
        cam = FakeCamera(fps=5)
        self.addCleanup(cam.close)
        started = time.monotonic()
        with self.assertRaises(ffmpeg.RecordingFailed) as cm:
            ffmpeg.record(["-i", cam.stream_url], self.out(), 2, framerate="25", margin=1, stall_timeout=5)
        self.assertIn("still running", str(cm.exception))
        self.assertLess(time.monotonic() - started, 6.0)
        self.assert_only([])

    def test_stop_event_leaves_a_playable_partial_clip(self):
        stop = threading.Event()
        timer = threading.Timer(1.5, stop.set)
        timer.start()
        self.addCleanup(timer.cancel)
        clip = ffmpeg.record(["-i", self.cam.stream_url], self.out(), 8, recode=True, stopping=stop)
        self.assertTrue(clip.stopped_early)
        duration = ffmpeg.probe(self.out())
        self.assertIsNotNone(duration, "the partial clip must be playable")
        self.assertLess(duration, 6.0)
        self.assert_only(["clip.mp4"])

    def test_stop_while_stalled_leaves_nothing_corrupt(self):
        cam = FakeCamera(fps=10, stall_after=5)
        self.addCleanup(cam.close)
        stop = threading.Event()
        timer = threading.Timer(1.5, stop.set)
        timer.start()
        self.addCleanup(timer.cancel)
        try:
            clip = ffmpeg.record(["-i", cam.stream_url], self.out(), 8, stopping=stop, stall_timeout=30,
                                 grace=2)
        except ffmpeg.RecordingFailed:
            self.assert_only([])
        else:
            self.assertIsNotNone(ffmpeg.probe(clip.path))
        for name in os.listdir(self.dir):
            self.assertIsNotNone(ffmpeg.probe(os.path.join(self.dir, name)), name)

    def test_not_started_when_already_stopping(self):
        stop = threading.Event()
        stop.set()
        with self.assertRaises(ffmpeg.RecordingFailed):
            ffmpeg.record(["-i", self.cam.stream_url], self.out(), 2, stopping=stop)
        self.assert_only([])

    def test_http_error_is_a_retryable_failure_with_the_reason(self):
        with self.assertRaises(ffmpeg.RecordingFailed) as cm:
            ffmpeg.record(["-i", self.cam.url + "/no-such-stream"], self.out(), 2)
        self.assertIn("404", str(cm.exception))
        self.assert_only([])

    def test_failure_message_has_no_secret(self):
        cam = FakeCamera(fps=10, auth="basic", password="hunter2-secret")
        self.addCleanup(cam.close)
        url = cam.stream_url.replace("http://", "http://cam:wrong-pass-xyz@")
        with self.assertRaises(ffmpeg.RecordingFailed) as cm:
            ffmpeg.record(["-auth_type", "basic", "-i", url], self.out(), 1, secrets=["wrong-pass-xyz"])
        self.assertIn("401", str(cm.exception))
        self.assertNotIn("wrong-pass-xyz", str(cm.exception))

    def test_orphaned_temporary_file_of_a_dead_process_is_removed(self):
        dead = subprocess.Popen(["true"])
        dead.wait()
        orphan = self.out(".clip.mp4.%d.0000.part" % dead.pid)
        mine = self.out(".clip.mp4.%d.1111.part" % os.getpid())
        for path in (orphan, mine):
            with open(path, "wb") as f:
                f.write(b"half a recording")
        ffmpeg.record(["-i", self.cam.stream_url], self.out(), 1, recode=False)
        self.assert_only(["clip.mp4", os.path.basename(mine)])

    def test_missing_ffmpeg_is_a_permanent_failure(self):
        saved = ffmpeg.FFMPEG
        ffmpeg.FFMPEG = "/nonexistent/ffmpeg"
        try:
            self.assertEqual(ffmpeg.which(), ["/nonexistent/ffmpeg"])
            with self.assertRaises(ffmpeg.Missing):
                ffmpeg.record(["-i", self.cam.stream_url], self.out(), 1)
        finally:
            ffmpeg.FFMPEG = saved
        self.assertEqual(ffmpeg.which(), [])


class ProbeTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="hookd-probe-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_garbage_and_missing_files_are_not_video(self):
        path = os.path.join(self.dir, "bad.mp4")
        with open(path, "wb") as f:
            f.write(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
        self.assertIsNone(ffmpeg.probe(path))
        self.assertIsNone(ffmpeg.probe(os.path.join(self.dir, "absent.mp4")))

    def test_audio_only_file_is_not_video(self):
        path = os.path.join(self.dir, "tone.mp4")
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                        "sine=duration=1", "-c:a", "aac", path], check=True, timeout=60)
        self.assertIsNone(ffmpeg.probe(path))

    def test_truncated_clip_is_not_video(self):
        path = os.path.join(self.dir, "v.mp4")
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                        "testsrc=duration=2:size=160x120:rate=10", "-c:v", "libx264", "-preset",
                        "ultrafast", path], check=True, timeout=60)
        self.assertAlmostEqual(ffmpeg.probe(path), 2.0, delta=0.2)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])  # moov is at the end without +faststart: now gone
        self.assertIsNone(ffmpeg.probe(path))


class HelpersTest(unittest.TestCase):
    def test_redact(self):
        text = "GET http://user:pa55@cam/x Cookie: a=b\r\nAuthorization: Basic zzz token-123"
        out = ffmpeg.redact(text, ["token-123"])
        for secret in ("pa55", "a=b", "zzz", "token-123"):
            self.assertNotIn(secret, out)

    def test_argv_copy_vs_recode(self):
        recode = ffmpeg.build_argv(["-i", "http://c/v"], "/t/x.part", 3, True)
        copy = ffmpeg.build_argv(["-i", "rtsp://c/v"], "/t/x.part", 3, False, framerate="12")
        self.assertIn("libx264", recode)
        self.assertIn("yuv420p", recode)
        self.assertIn("-use_wallclock_as_timestamps", recode)
        self.assertEqual(copy[copy.index("-c:v") + 1], "copy")
        self.assertEqual(copy[copy.index("-r") + 1], "12")
        self.assertLess(copy.index("-r"), copy.index("-i"))
        self.assertNotIn("-use_wallclock_as_timestamps", copy)


if __name__ == "__main__":
    unittest.main()
