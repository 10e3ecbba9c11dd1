"""Remote workers end to end (SPEC §10): a first hookd, ``hookd.py worker`` processes, real sockets and ffmpeg.

Each test starts the first hookd (intake, store, lease API on its admin listener with a token) and one or
two workers, each with its own configuration and state directory as another host would have. IXON
alarms are recorded from the loopback MJPEG camera (three cameras behind one fake, ``{device}`` in
``stream.url``); the camera's own record of its streams shows that one camera is never recorded twice at
once. Faults are real: kill -9 of a worker while it records, kill -9 of the first hookd while workers hold
leases (and before a lease's answer left it), SIGTERM of a worker with a job that cannot finish in time.
The lease API itself is also driven by hand over HTTP: 401 without the token, a done repeated, a done
after its lease expired.
"""

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest

from hookd_core import ffmpeg
from tests.fake_camera import FakeCamera
from tests.support import Daemon, Worker, request, wait_until

TOKEN = "lease-token-9c1d"
AUTH = {"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"}
CAMERAS = ("cam1", "cam2", "cam3")
SLEEPER = "%s -c \"import json, sys, time; time.sleep(json.load(sys.stdin)['payload']['sleep'])\"" % sys.executable


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alarm(device, n):
    return {"createdOn": "2026-11-30T05:%02d:%02d" % (n // 60, n % 60), "extraInfo": {"Device name": device}}


class RemoteCase(unittest.TestCase):
    """Helpers: the first hookd, workers, alarms, the admin API with the token."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="hookd-remote-")
        self.procs = []

    def tearDown(self):
        for p in reversed(self.procs):
            if p.proc is not None and p.proc.poll() is None:
                p.kill9()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def first(self, sections, hookd="", admin_port=None):
        os.makedirs(os.path.join(self.tmp, "first"), exist_ok=True)
        d = Daemon("[hookd]\nadmin.token = %s\nadmin.listen = 127.0.0.1:%d\nretry.base_delay = 0.2\n"
                   "retry.max_delay = 1\nretry.max_attempts = 5\n%s\n%s" % (
                       TOKEN, admin_port or free_port(), hookd, sections), tmpdir=os.path.join(self.tmp, "first"))
        self.procs.append(d)
        return d.start()

    def worker(self, name, first, sections, hookd="", lease_seconds=10, env=None, start=True):
        home = os.path.join(self.tmp, name)
        os.makedirs(home, exist_ok=True)
        routes = ",".join(line[1:-1] for line in sections.splitlines() if line.startswith("["))
        w = Worker("[hookd]\n%s\n%s" % (hookd, sections), ["--from", first.admin_url, "--token", TOKEN,
                                                          "--routes", routes, "--lease-seconds", str(lease_seconds),
                                                          "--name", name], tmpdir=home, env=env)
        self.procs.append(w)
        return w.start() if start else w

    def post(self, d, path, value):
        status, _, body = d.post(path, json.dumps(value).encode(), {"Content-Type": "application/json"})
        self.assertEqual(status, 202, body)
        return json.loads(body)["id"]

    def api(self, d, path, body, headers=AUTH):
        status, _, answer = d.admin("POST", path, json.dumps(body).encode(), headers)
        return status, json.loads(answer or b"null")

    def events(self, d):
        status, _, body = d.admin("GET", "/events?limit=1000", None, {"Authorization": AUTH["Authorization"]})
        assert status == 200, body
        return json.loads(body)

    def event(self, d, event_id):
        return json.loads(d.admin("GET", "/events/%d" % event_id, None, {"Authorization": AUTH["Authorization"]})[2])

    def all_done(self, d, ids, timeout):
        def done():
            events = {e["id"]: e for e in self.events(d)}
            return all(events[i]["status"] == "done" for i in ids) and events
        try:
            return wait_until(done, timeout, 0.2, "events %s to be done" % ids)
        except AssertionError:
            raise AssertionError("not all done: " + self.story(d))

    def story(self, d):
        """Each event's status, attempts and last error, and the logs: what a failure message shows."""
        return "%s\nfirst hookd:\n%s\nworkers:\n%s" % (
            [(e["id"], e["status"], e["attempts"], e["last_error"]) for e in self.events(d)], d.log()[-3000:],
            "\n".join(p.log()[-2000:] for p in self.procs if isinstance(p, Worker)))


class LeaseApiOverHttpTest(RemoteCase):
    """The lease API driven by hand on the real admin listener."""

    def test_token_done_twice_and_done_after_expiry(self):
        d = self.first("[hook:job]\nverify = none\nallow_unsigned = true\ndedupe = none\nremote = true\n"
                       "command = %s -c pass\n" % sys.executable)
        first, second = self.post(d, "/hooks/job", {"n": 1}), self.post(d, "/hooks/job", {"n": 2})
        lease = {"routes": ["hook:job"], "max": 1, "lease_seconds": 30, "worker": "by-hand", "wait": 0}
        self.assertEqual(self.api(d, "/work/lease", lease, {"Content-Type": "application/json"})[0], 401)
        self.assertEqual(self.api(d, "/work/lease", lease, {"Authorization": AUTH["Authorization"]})[0], 415)
        status, [job] = self.api(d, "/work/lease", lease)
        self.assertEqual((status, job["id"], job["attempt"]), (200, first, 1))
        self.assertEqual(self.event(d, first)["status"], "running")
        done = "/work/%s/done" % job["lease_id"]
        self.assertEqual(self.api(d, done, {"note": "by hand"})[0], 200)
        self.assertEqual(self.api(d, done, {"note": "by hand"})[0], 200, "the same verb again is 200")
        self.assertEqual(self.event(d, first)["status"], "done")
        # a lease nobody extends: it expires, the event goes back, and a late done is 409
        status, [job] = self.api(d, "/work/lease", dict(lease, lease_seconds=1))
        self.assertEqual(job["id"], second)
        wait_until(lambda: self.event(d, second)["status"] != "running", 10, 0.1, "the lease to expire")
        self.assertEqual(self.api(d, "/work/%s/done" % job["lease_id"], {})[0], 409)
        self.assertNotEqual(self.event(d, second)["status"], "done", "a 409 changes nothing")
        self.assertIn("expired", self.event(d, second)["last_error"])
        text = d.admin("GET", "/metrics", None, {"Authorization": AUTH["Authorization"]})[2].decode()
        self.assertIn('hookd_lease_expired_total{route="hook:job"} 1', text)
        self.assertIn('hookd_worker_last_seen_seconds{worker="by-hand"}', text)
        self.assertNotIn(TOKEN, d.log())


class WorkerLifecycleTest(RemoteCase):
    """A worker runs generic hook jobs with its own configuration; SIGTERM finishes or hands back."""

    def test_sigterm_finishes_what_fits_in_the_grace_and_hands_back_the_rest(self):
        d = self.first("[hook:slow]\nverify = none\nallow_unsigned = true\ndedupe = none\nremote = true\n"
                       "command = /bin/false\n")
        w = self.worker("w1", d, "[hook:slow]\nverify = none\nallow_unsigned = true\ncommand = %s\n" % SLEEPER,
                        hookd="workers = 2\nshutdown_grace = 2.5\n")
        quick, slow = self.post(d, "/hooks/slow", {"sleep": 1}), self.post(d, "/hooks/slow", {"sleep": 6})
        wait_until(lambda: all(self.event(d, i)["status"] == "running" for i in (quick, slow)), 10, 0.1,
                   "both leased")
        started = time.monotonic()
        self.assertEqual(w.stop(timeout=20), 0)
        self.assertLess(time.monotonic() - started, 2.5 + 6, "out within the grace (+ the hand-back)")
        self.assertEqual(self.all_done(d, [quick], 10)[quick]["attempts"], 1)
        back = wait_until(lambda: self.event(d, slow)["status"] in ("retry", "queued") and self.event(d, slow),
                          10, 0.1, "the slow job handed back")
        self.assertIn("stopped before the job finished", back["last_error"])
        self.assertIn("handed back (hook:slow, attempt 1)", w.log())
        # the next worker takes the handed-back job and the command it runs is its own
        self.worker("w2", d, "[hook:slow]\nverify = none\nallow_unsigned = true\ncommand = %s -c pass\n"
                    % sys.executable)
        self.assertEqual(self.all_done(d, [slow], 20)[slow]["attempts"], 2)

    def test_worker_waits_for_the_first_hookd_and_reconnects(self):
        port = free_port()
        d = self.first("[hook:j]\nverify = none\nallow_unsigned = true\ndedupe = none\nremote = true\n"
                       "command = /bin/false\n", admin_port=port)
        d.stop()
        w = self.worker("w1", d, "[hook:j]\nverify = none\nallow_unsigned = true\ncommand = %s -c pass\n"
                        % sys.executable)
        w.wait_log("cannot reach http://127.0.0.1:%d" % port)
        d.start()
        event = self.post(d, "/hooks/j", {"n": 1})
        self.all_done(d, [event], 40)
        w.wait_log("reached http://127.0.0.1:%d again" % port, timeout=5)
        self.assertRegex(w.log(), r"event=%d done \(hook:j, attempt 1, lease from " % event)

    def test_a_route_not_configured_here_is_refused(self):
        d = self.first("[hook:j]\nverify = none\nallow_unsigned = true\nremote = true\ncommand = /bin/false\n")
        w = self.worker("w1", d, "[hook:other]\nverify = none\nallow_unsigned = true\n", start=False)
        w.args[w.args.index("--routes") + 1] = "hook:j"
        w._spawn(["worker"] + w.args)
        self.assertEqual(w.proc.wait(20), 1)
        self.assertIn("route hook:j is not configured on this host", w.log())


@unittest.skipIf(shutil.which("openssl") is None, "no openssl command to make a test certificate")
class WorkerOverTlsTest(RemoteCase):
    def test_worker_leases_over_https_when_the_admin_listener_has_tls(self):
        cert, key = os.path.join(self.tmp, "cert.pem"), os.path.join(self.tmp, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
        d = self.first("[hook:t]\nverify = none\nallow_unsigned = true\ndedupe = none\nremote = true\n"
                       "command = /bin/false\n", hookd="tls.cert = %s\ntls.key = %s\n" % (cert, key))
        self.assertTrue(d.admin_url.startswith("https://"), d.admin_url)
        plain = "http://" + d.admin_url[8:]
        w = self.worker("w1", d, "[hook:t]\nverify = none\nallow_unsigned = true\ncommand = %s -c pass\n"
                        % sys.executable, env={"SSL_CERT_FILE": cert})
        self.assertIn("jobs leased from https://", w.log())
        event = post_tls(d, cert, {"n": 1})
        self.assertEqual(d.wait_status(event, "done", timeout=20)["attempts"], 1)
        self.assertNotIn("cannot reach", w.log())
        with self.assertRaises((http.client.HTTPException, OSError)):
            request("POST", plain + "/work/lease", b"{}", AUTH, timeout=5)


def post_tls(d, cert, value):
    conn = http.client.HTTPSConnection("127.0.0.1", d.port, context=ssl.create_default_context(cafile=cert),
                                       timeout=10)
    conn.request("POST", "/hooks/t", json.dumps(value).encode(), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 202, body
    return json.loads(body)["id"]


IXON_KEY = "remote-ixon-key"
IXON_PATH = "/ixon/webhook/" + IXON_KEY


class IxonRecordingTest(RemoteCase):
    """IXON recordings on two workers: three cameras, never one twice at once, faults in the middle."""

    def setUp(self):
        super().setUp()
        self.cam = FakeCamera(fps=10, paths=["/%s.mjpg" % c for c in CAMERAS])
        self.ixon = ("[ixon]\nkey = %s\nstream.url = %s/{device}.mjpg\nduration = %%g\nqueue_size = 50\n"
                     % (IXON_KEY, self.cam.url))

    def tearDown(self):
        super().tearDown()
        self.cam.close()

    def first_ixon(self, duration=2, admin_port=None):
        return self.first(self.ixon % duration + "remote = true\n", admin_port=admin_port)

    def ixon_worker(self, name, d, duration=2, lease_seconds=10, slots=2):
        return self.worker(name, d, self.ixon % duration + "video.dir = %s\n" % os.path.join(self.tmp, name, "v"),
                           hookd="workers = %d\nshutdown_grace = 10\n" % slots, lease_seconds=lease_seconds)

    def clips(self, *names):
        out = []
        for name in names:
            folder = os.path.join(self.tmp, name, "v")
            out += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".mp4")] \
                if os.path.isdir(folder) else []
        return out

    def assert_never_twice_at_once(self):
        for camera in CAMERAS:
            spans = sorted((s, e) for path, s, e in self.cam.streams if path == "/%s.mjpg" % camera)
            for (_, end), (start, _) in zip(spans, spans[1:]):
                self.assertGreater(start, end - 0.3, "%s recorded twice at once: %s" % (camera, spans))

    def test_six_alarms_three_cameras_two_workers(self):
        d = self.first_ixon()
        a, b = self.ixon_worker("wa", d), self.ixon_worker("wb", d)
        ids = [self.post(d, IXON_PATH, alarm(CAMERAS[n % 3], n)) for n in range(6)]
        self.all_done(d, ids, 90)
        clips = self.clips("wa", "wb")
        self.assertEqual(len(clips), 6, clips)
        for clip in clips:
            self.assertAlmostEqual(ffmpeg.probe(clip), 2.0, delta=1.0)
        self.assert_never_twice_at_once()
        self.assertEqual(len([s for s in self.cam.streams if s[2] is not None]), 6)
        for w in (a, b):
            self.assertRegex(w.log(), r"done \(ixon, attempt 1, lease from ", "jobs spread over both workers")
        self.assertTrue(self.clips("wa") and self.clips("wb"))

    def test_kill9_of_a_worker_mid_recording_its_lease_expires_the_other_records_it(self):
        d = self.first_ixon(duration=3)
        a = self.ixon_worker("wa", d, duration=3, lease_seconds=2)
        event = self.post(d, IXON_PATH, alarm("cam2", 1))
        wait_until(lambda: any(p == "/cam2.mjpg" for p, _, _ in self.cam.streams), 15, 0.05, "wa to record")
        time.sleep(0.5)  # mid-recording
        a.kill9()
        self.ixon_worker("wb", d, duration=3, lease_seconds=10)  # long enough not to expire under load
        done = self.all_done(d, [event], 60)[event]
        self.assertEqual(done["attempts"], 2, "\n".join(p.log() for p in self.procs))
        d.wait_log("lease of worker wa expired")
        [clip] = self.clips("wb")
        self.assertAlmostEqual(ffmpeg.probe(clip), 3.0, delta=1.0)
        self.assertEqual(self.clips("wa"), [], "the killed worker left no finished clip")

    def test_progress_travels_with_the_lease_so_a_retry_does_not_record_again(self):
        d = self.first_ixon()
        marker = os.path.join(self.tmp, "second-try")
        fails_once = "%s -c \"import os, sys; ok = os.path.exists(sys.argv[1]); open(sys.argv[1], 'a').close();" \
                     " sys.exit(0 if ok else 3)\" %s" % (sys.executable, marker)
        self.worker("wa", d, self.ixon % 2 + "video.dir = %s\ncommand = %s\n" % (
            os.path.join(self.tmp, "wa", "v"), fails_once), hookd="workers = 1\n")
        event = self.post(d, IXON_PATH, alarm("cam3", 7))
        self.assertEqual(self.all_done(d, [event], 60)[event]["attempts"], 2)
        self.assertEqual(len(self.cam.streams), 1, "the clip of attempt 1 was not recorded again")
        self.assertEqual(len(self.clips("wa")), 1)

    def test_kill9_of_the_first_hookd_while_workers_hold_leases(self):
        port = free_port()
        d = self.first_ixon(duration=3, admin_port=port)
        self.ixon_worker("wa", d, duration=3, lease_seconds=20)
        self.ixon_worker("wb", d, duration=3, lease_seconds=20)
        ids = [self.post(d, IXON_PATH, alarm(c, n)) for n, c in enumerate(CAMERAS)]
        # 'running' only says a lease committed: a kill -9 before its answer reached the worker loses the
        # answer, and that job runs again once the lease expires (attempt 2, the next test). A camera
        # streaming to a worker says that worker holds the lease: only then is the first hookd killed.
        wait_until(lambda: {p for p, _, _ in self.cam.streams} == {"/%s.mjpg" % c for c in CAMERAS}, 20, 0.05,
                   "all three recorded by the workers")
        self.assertEqual([self.event(d, i)["status"] for i in ids], ["running"] * 3, "killed while leased")
        d.kill9()
        d.start()
        events = self.all_done(d, ids, 60)
        self.assertEqual([events[i]["attempts"] for i in ids], [1, 1, 1],
                         "the leases survived the crash: each recording reported once, none run again\n"
                         + self.story(d))
        self.assertEqual(len(self.cam.streams), 3, "no camera recorded twice")
        self.assertEqual(len(self.clips("wa", "wb")), 3)

    def test_a_lease_whose_answer_a_kill9_cut_off_expires_and_the_job_runs_again(self):
        d = self.first_ixon()
        event = self.post(d, IXON_PATH, alarm("cam1", 3))
        lease = {"routes": ["ixon"], "max": 1, "lease_seconds": 2, "worker": "never-told", "wait": 0}
        status, [job] = self.api(d, "/work/lease", lease)  # as if its answer never reached the worker
        self.assertEqual((status, job["id"], job["attempt"]), (200, event, 1))
        d.kill9()
        d.start()
        self.ixon_worker("wa", d)
        done = self.all_done(d, [event], 60)[event]
        self.assertEqual(done["attempts"], 2, "at least once: the lost lease's attempt counts\n" + self.story(d))
        self.assertRegex(d.log(), r"event=%d lease of worker never-told expired \(ixon, attempt 1\)" % event)
        self.assertNotIn("left running by an earlier stop", d.log(), "a held lease is not requeued at the start")
        self.assertEqual(len(self.clips("wa")), 1)


if __name__ == "__main__":
    unittest.main()
