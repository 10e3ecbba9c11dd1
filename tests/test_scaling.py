"""Partitioned intake (SPEC §11): real HAProxy on loopback in front of two hookd instances, every route through it.

The HAProxy configuration is the ``haproxy`` block of docs/scaling.md, used as it stands (the three
addresses come from the environment, as the doc says). One instance owns the asset routes (Preservica,
iconik, Zencoder), the other the camera routes (IXON, Camio, a generic hook), each with its own state
directory. A signed request for every route goes through the balancer and must be stored by the instance
that owns the route and by no other; an unknown path is refused by the balancer itself; when the camera
instance stops, its routes answer 503 (its /readyz health check fails) and the asset routes keep working.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import unittest

from tests.fake_camera import make_frames
from tests.fake_camio import image
from tests.support import ROOT, Daemon, hmac_hex, post, request, wait_until

SECRET = "scaling-secret-4f2a"
CAMIO_KEY = "camio-key-77"
ASSETS = """[hookd]
proxy.trusted = 127.0.0.1/32
[preservica]
secret.key = %(s)s
[iconik]
app_id = app
auth_token = tok
secret.header = X-Hookd-Secret
secret.key = %(s)s
[zencoder]
notification.secret = %(s)s
"""
CAMERAS = """[hookd]
proxy.trusted = 127.0.0.1/32
[ixon]
key = scaling-ixon-key
stream.url = http://127.0.0.1:9/{device}.mjpg
remote = true
[camio]
api_key = %(k)s
remote = true
[hook:cams]
verify = token
secret = %(s)s
"""


def doc_config():
    """The HAProxy configuration as docs/scaling.md gives it."""
    with open(os.path.join(ROOT, "docs", "scaling.md")) as f:
        return re.search(r"^```haproxy\n(.*?)^```", f.read(), re.S | re.M).group(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@unittest.skipIf(shutil.which("haproxy") is None, "haproxy is not installed (tests/run installs it)")
class HaproxyTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="hookd-scaling-")
        for sub in ("a", "c"):
            os.makedirs(os.path.join(cls.tmp, sub))
        cls.assets = Daemon(ASSETS % {"s": SECRET}, tmpdir=os.path.join(cls.tmp, "a"))
        cls.cameras = Daemon(CAMERAS % {"s": SECRET, "k": CAMIO_KEY}, tmpdir=os.path.join(cls.tmp, "c"))
        cls.assets.start()
        cls.cameras.start()
        cfg = os.path.join(cls.tmp, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(doc_config())
        cls.lb = "http://127.0.0.1:%d" % free_port()
        env = dict(os.environ, HOOKD_LB=cls.lb[7:], HOOKD_ASSETS="127.0.0.1:%d" % cls.assets.port,
                   HOOKD_CAMERAS="127.0.0.1:%d" % cls.cameras.port)
        check = subprocess.run(["haproxy", "-c", "-f", cfg], env=env, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        cls.haproxy = subprocess.Popen(["haproxy", "-db", "-f", cfg], env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, start_new_session=True)
        wait_until(lambda: cls._up(), 15, 0.1, "haproxy to listen")

    @classmethod
    def _up(cls):
        try:
            return request("GET", cls.lb + "/nowhere", timeout=2)[0] == 404
        except OSError:
            return False

    @classmethod
    def tearDownClass(cls):
        cls.haproxy.terminate()
        cls.haproxy.wait(10)
        cls.haproxy.stderr.close()
        for d in (cls.assets, cls.cameras):
            d.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def through_lb(self, path, body, headers):
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        return post(self.lb + path, body, dict({"Content-Type": "application/json"}, **headers))

    def stored_by(self, d, event_id, route):
        [event] = [e for e in d.events() if e["id"] == event_id]
        self.assertEqual(event["route"], route)
        return event

    def test_every_route_reaches_the_instance_that_owns_it(self):
        body = json.dumps({"subscriptionId": "s1", "events": [{"entityType": "IO", "entityRef": "ref-1"}]}).encode()
        sig = hmac_hex(SECRET, b"preservica-webhook-auth" + body)
        jpeg = make_frames()[0]
        cases = [
            ("/preservica", body, {"Preservica-Signature": sig}, self.assets, "preservica"),
            ("/iconik", {"event_type": "assets", "realm": "entity", "operation": "create", "object_id": "a-1"},
             {"X-Hookd-Secret": SECRET}, self.assets, "iconik"),
            ("/ixon/webhook/scaling-ixon-key", {"createdOn": "2026-11-30T05:00:00", "extraInfo": {"Device name": "press 1"}}, {},
             self.cameras, "ixon"),
            ("/camio/tasks/" + CAMIO_KEY, {"callback_url": "https://camio.com/x",
                                            "images": [image(jpeg, "2026-11-30T05:00:00")]}, {},
             self.cameras, "camio"),
            ("/hooks/cams", {"n": 1}, {"Authorization": "Bearer " + SECRET}, self.cameras, "hook:cams"),
        ]
        for path, payload, headers, owner, route in cases:
            status, _, answer = self.through_lb(path, payload, headers)
            self.assertEqual(status, 202, (path, answer))
            self.stored_by(owner, json.loads(answer)["id"], route)
        for d, other in ((self.assets, ("ixon", "camio", "hook:cams")),
                         (self.cameras, ("preservica", "iconik", "zencoder"))):
            self.assertFalse([e for e in d.events() if e["route"] in other], "a route stored by the wrong instance")
        # Zencoder: a notification for a job this instance does not know is its own 404 (and log line)
        status, _, answer = self.through_lb("/zencoder/notifications", {"job": {"id": 4242, "state": "finished"},
                                                                        "outputs": []},
                                            {"X-Zencoder-Notification-Secret": SECRET})
        self.assertEqual(status, 404, answer)
        self.assertNotIn(b"no route", answer)
        wait_until(lambda: "404 zencoder" in self.assets.log(), 5, message="the assets instance's 404 line")
        self.assertNotIn("zencoder", self.cameras.log())
        self.assertEqual(self.through_lb("/nowhere", {}, {})[0], 404)

    def test_zz_a_stopped_instance_makes_only_its_routes_unavailable(self):
        self.cameras.stop()

        def refused():
            return self.through_lb("/hooks/cams", {"n": 2}, {"Authorization": "Bearer " + SECRET})[0] == 503
        wait_until(refused, 15, 0.2, "the camera routes to answer 503")
        body = json.dumps({"subscriptionId": "s1", "events": [{"entityType": "IO", "entityRef": "ref-2"}]}).encode()
        status, _, answer = self.through_lb("/preservica", body, {
            "Preservica-Signature": hmac_hex(SECRET, b"preservica-webhook-auth" + body)})
        self.assertEqual(status, 202, answer)


if __name__ == "__main__":
    unittest.main()
