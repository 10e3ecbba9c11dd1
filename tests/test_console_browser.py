"""The console against the real daemon with events from every route, and what each job produced.

Strategy: one daemon serves the whole module, configured with every integration against its loopback
fake (Preservica with thumbnails, iconik, Camio, an IXON camera recording real H.264 clips, Zencoder) and
two generic hooks: ``demo`` (stores anything) and ``flaky`` (a command that fails until a marker file
exists, so its event goes dead). ``setUpModule`` sends one event to each route and waits until every one
has settled. The console is read the way the operator reads it.
"""

import json
import os
import re
import shutil
import sys
import tempfile
import unittest
import urllib.parse

from hookd_core import console
from hookd_core.api import Headers, Request
from hookd_core.app import App
from tests import fake_preservica as fp
from tests import fake_zencoder
from tests.fake_camera import FakeCamera
from tests.fake_camio import FakeCamio, image, make_frames
from tests.fake_iconik import FakeIconik, asset_created, deliver
from tests.support import Daemon

PV_SECRET, PV_PASSWORD = "pv-s3cret", "pv-password-1"
IC_SECRET, CAMIO_KEY, ZC_SECRET = "ic-s3cret-header", "camio-k3y", "zc-s3cret"
XSS = '<script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'">'
FLAKY = "import os, sys; sys.exit(0 if os.path.exists(sys.argv[1]) else 3)"

CONFIG = """[hookd]
workers = 4
retry.base_delay = 0.05
retry.max_delay = 0.2
retry.max_attempts = 2

[preservica]
secret.key = {pv_secret}
server = {pv_url}
username = hookd
password = {pv_password}
tenant = DEMO
actions = thumbnail

[iconik]
url = {ic_url}
app_id = {ic_app}
auth_token = {ic_token}
secret.header = X-Hookd-Secret
secret.key = {ic_secret}

[camio]
api_key = {camio_key}
callback.hosts = 127.0.0.1

[ixon]
stream.url = {camera}
duration = 2

[zencoder]
api.url = {zc_url}
api_key = {zc_key}
notification.secret = {zc_secret}
notification.url = http://127.0.0.1:9/zencoder/notifications

[hook:demo]
verify = none
allow_unsigned = true

[hook:flaky]
verify = none
allow_unsigned = true
command = {python} -c "{flaky}" {marker}
"""

D = {}  # the module's daemon, fakes and the ids of the events sent


def setUpModule():
    tmp = D["tmp"] = tempfile.mkdtemp(prefix="hookd-console-e2e-")
    try:
        _start(tmp)
    except BaseException:
        tearDownModule()
        raise


def _start(tmp):
    pv = D["pv"] = fp.FakePreservica(username="hookd", password=PV_PASSWORD, tenant="DEMO")
    ic = D["ic"] = FakeIconik()
    camio = D["camio"] = FakeCamio()
    cam = D["cam"] = FakeCamera(fps=10)
    zc = D["zc"] = fake_zencoder.FakeZencoder()
    D["marker"] = os.path.join(tmp, "flaky-may-pass")
    d = D["d"] = Daemon(CONFIG.format(
        pv_secret=PV_SECRET, pv_url=pv.url, pv_password=PV_PASSWORD, ic_url=ic.url, ic_app=ic.app_id,
        ic_token=ic.auth_token, ic_secret=IC_SECRET, camio_key=CAMIO_KEY, camera=cam.stream_url, zc_url=zc.api_url,
        zc_key=fake_zencoder.API_KEY, zc_secret=ZC_SECRET, python=sys.executable, flaky=FLAKY,
        marker=D["marker"]), tmpdir=tmp).start()
    ids = D["ids"] = {}
    png, _ = fp.make_images("160x120")
    D["png"] = png
    pv.thumbnails["ref-1"] = (png, "image/png")
    ids["preservica"] = _accepted(fp.deliver(d.url + "/preservica", PV_SECRET, fp.envelope([fp.io_event("ref-1")])))
    ids["iconik"] = _accepted(deliver(d.url + "/iconik", asset_created(ic.add_asset()),
                                      {"X-Hookd-Secret": IC_SECRET}))
    frames = make_frames(tmp)
    task = camio.task("e2e", [image(frames["night"], "2017-05-05T01:31:13.000001")])
    ids["camio"] = _accepted(d.post("/camio/tasks/" + CAMIO_KEY, json.dumps(task),
                                    {"Content-Type": "application/json"}))
    alarm = {"createdOn": "2019-08-29T12:26:24", "extraInfo": {"Device name": "Project D4 Alarming machine"},
             "shortContent": "Counter above 30"}
    ids["ixon"] = _accepted(d.post("/ixon/webhook", json.dumps(alarm), {"Content-Type": "application/json"}))
    r = d.cli("zencoder-submit", "gcs://bucket/_/in.mkv", "--output", "mp4:1280x720", "--output", "webm:640x360")
    assert r.returncode == 0, r.stderr
    job = D["job"] = int(r.stdout.strip())
    ids["zencoder"] = _accepted(fake_zencoder.notify(d.url + "/zencoder/notifications", fake_zencoder.job_notification(
        zc, job, "finished"), secret=ZC_SECRET, schedule=()))
    ids["demo"] = _accepted(d.post("/hooks/demo", json.dumps({"title": XSS}), {"Content-Type": "application/json"}))
    ids["flaky"] = _accepted(d.post("/hooks/flaky", b'{"try": 1}', {"Content-Type": "application/json"}))
    for route, event_id in ids.items():
        d.wait_status(event_id, "dead" if route == "flaky" else "done", timeout=60)


def _accepted(answer):
    status, _, body = answer
    assert status == 202, (status, body)
    return json.loads(body)["id"]


def tearDownModule():
    try:
        if "d" in D:
            D["d"].stop()
    finally:
        for name in ("pv", "ic", "camio", "cam", "zc"):
            if name in D:
                D[name].close()
        shutil.rmtree(D["tmp"], ignore_errors=True)


class ProductsTest(unittest.TestCase):
    """Each integration's job recorded what it produced, and the console shows it."""

    @classmethod
    def setUpClass(cls):
        cls.app = App(D["d"].config_path)
        cls.app.open_store()

    @classmethod
    def tearDownClass(cls):
        cls.app.store.close()

    def console(self, target):
        parts = urllib.parse.urlsplit(target)
        resp = console.handle(self.app, Request("GET", parts.path, urllib.parse.parse_qs(parts.query),
                                                Headers([]), b"", "127.0.0.1"))
        self.assertEqual(resp.status, 200, target)
        return resp

    def event_page(self, route):
        return self.console("/ui/events/%d" % D["ids"][route]).body.decode()

    def test_preservica_thumbnail_is_shown_inline(self):
        html = self.event_page("preservica")
        src = re.search(r'<img src="(/ui/files/\d+)" alt="thumbnail ref-1.png">', html).group(1)
        self.assertEqual(self.console(src).body, D["png"])

    def test_ixon_clip_is_a_video_with_a_download_link(self):
        html = self.event_page("ixon")
        src = re.search(r'<video src="(/ui/files/\d+)" controls', html).group(1)
        self.assertIn('href="%s?download=1" download="2019-08-29T12-26-24_Project_D4_Alarming_machine.mp4"' % src,
                      html)
        clip = self.console(src)
        self.assertEqual(clip.content_type, "video/mp4")
        self.assertEqual(clip.body[4:8], b"ftyp")

    def test_camio_labels_sent_are_listed(self):
        html = self.event_page("camio")
        self.assertIn("Labels sent to Camio", html)
        self.assertRegex(html, r"<tr><th>2017-05-05T01:31:13.000001</th><td>[^<]*night 1.00")

    def test_zencoder_variations_are_listed(self):
        html = self.event_page("zencoder")
        self.assertIn("Zencoder job %d: finished" % D["job"], html)
        self.assertRegex(html, r"<tr><td>mp4</td><td>1280</td><td>720</td><td>\d+</td>")
        self.assertRegex(html, r"<tr><td>webm</td><td>640</td><td>360</td>")

    def test_routes_without_products_show_none(self):
        for route in ("iconik", "demo"):
            self.assertNotIn("<h2>Products</h2>", self.event_page(route))


if __name__ == "__main__":
    unittest.main()
