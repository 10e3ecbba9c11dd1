"""The console in a real browser, against the real daemon with events from every route.

Strategy: one daemon serves the whole module, configured with every integration against its loopback
fake (Preservica with thumbnails, iconik with the webhooks ``subscribe iconik`` made, Camio, an IXON
camera recording real H.264 clips, Zencoder), two generic hooks, ``demo`` (stores anything, here a
payload full of HTML) and ``flaky`` (a command that fails until a marker file exists, so its event goes
dead), and an ``admin.token``. ``setUpModule`` sends one
event to each route and waits until every one has settled. ``ProductsTest`` reads the console over HTTP
with the bearer token: what each job produced. ``BrowserTest`` drives one headless Chromium (tests/cdp.py)
as the person on call would: the login form, the overview's counts against the CLI's, a dead event's
error, a mouse click on Retry with the page's scripts off and then the CLI's word that the event is done,
the HTML payload shown as text, and the IXON clip playing in its ``<video>``. Screenshots of the overview
and of the IXON event are taken every run; with ``HOOKD_SCREENSHOTS=DIR`` they are kept there (that is
how docs/ got its own).
"""

import json
import os
import re
import shutil
import sys
import tempfile
import unittest

from tests import cdp
from tests import fake_preservica as fp
from tests import fake_zencoder
from tests.fake_camera import FakeCamera
from tests.fake_camio import FakeCamio, image, make_frames
from tests.fake_iconik import FakeIconik, asset_created, deliver
from tests.support import Daemon

PV_SECRET, PV_PASSWORD = "pv-s3cret", "pv-password-1"
IC_SECRET, CAMIO_KEY, ZC_SECRET = "ic-s3cret-header", "camio-k3y", "zc-s3cret"
TOKEN = "console-e2e-admin-t0ken"
XSS = '<script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'">'
FLAKY = "import os, sys; sys.exit(0 if os.path.exists(sys.argv[1]) else 3)"

CONFIG = """[hookd]
admin.token = {token}
public_url = https://hooks.example.org
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
key = console-ixon-key
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
        marker=D["marker"], token=TOKEN), tmpdir=tmp).start()
    r = d.cli("subscribe", "iconik")  # the two iconik webhooks hookd needs, so the overview has their health
    assert r.returncode == 0, r.stdout + r.stderr
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
    ids["ixon"] = _accepted(d.post("/ixon/webhook/console-ixon-key", json.dumps(alarm), {"Content-Type": "application/json"}))
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

    def console(self, path):
        status, headers, body = D["d"].admin("GET", path, headers={"Authorization": "Bearer " + TOKEN})
        self.assertEqual(status, 200, path)
        self.assertEqual(headers["content-security-policy"].split(";")[0], "default-src 'self'")
        return headers, body

    def event_page(self, route):
        return self.console("/ui/events/%d" % D["ids"][route])[1].decode()

    def test_preservica_thumbnail_is_shown_inline(self):
        html = self.event_page("preservica")
        src = re.search(r'<img src="(/ui/files/\d+)" alt="thumbnail ref-1.png">', html).group(1)
        self.assertEqual(self.console(src)[1], D["png"])

    def test_ixon_clip_is_a_video_with_a_download_link(self):
        html = self.event_page("ixon")
        src = re.search(r'<video src="(/ui/files/\d+)" controls', html).group(1)
        self.assertIn('href="%s?download=1" download="2019-08-29T12-26-24_Project_D4_Alarming_machine.mp4"' % src,
                      html)
        headers, body = self.console(src)
        self.assertEqual(headers["content-type"], "video/mp4")
        self.assertEqual(body[4:8], b"ftyp")

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

    def test_a_console_post_without_the_csrf_token_is_403_even_with_the_token(self):
        status, _, _ = D["d"].admin("POST", "/ui/events/%d/retry" % D["ids"]["flaky"], b"",
                                    {"Authorization": "Bearer " + TOKEN,
                                     "Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(status, 403)


class BrowserTest(unittest.TestCase):
    """Headless Chromium through the admin listener; the tests run in the order of their names."""

    @classmethod
    def setUpClass(cls):
        cls.browser = cdp.Browser()
        cls.shots = os.environ.get("HOOKD_SCREENSHOTS") or D["tmp"]

    @classmethod
    def tearDownClass(cls):
        cls.browser.close()

    def url(self, path):
        return D["d"].admin_url + path

    def logged_in(self, path="/", javascript=True):
        """A new tab (no cookies) that logs in through the form and then opens ``path``; ``javascript``
        False turns the page's own scripts off (the console must work without them)."""
        page = self.browser.new_page()
        page.call("Emulation.setScriptExecutionDisabled", {"value": not javascript})
        self.assertEqual(page.goto(self.url(path)), 401)
        page.type("form.login input[name=token]", TOKEN)
        self.assertEqual(page.click("form.login button"), 200)
        self.assertEqual(page.eval("location.pathname"), path)
        return page

    def screenshot(self, page, name):
        path = page.screenshot(os.path.join(self.shots, name))
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_1_without_the_token_the_console_answers_401_with_the_login_form(self):
        page = self.browser.new_page()
        self.assertEqual(page.goto(self.url("/ui/events")), 401)
        self.assertEqual(page.eval("document.querySelector('form.login').getAttribute('action')"), "/ui/login")
        self.assertEqual(page.eval("document.querySelector('form.login input[name=token]').type"), "password")
        self.assertIsNone(page.eval("document.querySelector('table')"), "no data before the login")
        page.type("form.login input[name=token]", "not-the-token")
        self.assertEqual(page.click("form.login button"), 401)
        self.assertIn("not the admin token", page.eval("document.body.innerText"))

    def test_2_overview_counts_match_the_cli(self):
        page = self.logged_in("/")
        shown = page.eval("""(() => {
            const heads = [...document.querySelectorAll('table.counts thead th')].map(th => th.textContent);
            const out = {};
            for (const tr of document.querySelectorAll('table.counts tbody tr:not(.total)')) {
                const cells = [...tr.children].map(c => c.textContent);
                for (let i = 1; i < heads.length - 1; i++) {
                    if (cells[i] !== '0') { out[cells[0] + ' ' + heads[i]] = Number(cells[i]); }
                }
            }
            return out; })()""")
        expected = {}
        for ev in D["d"].events():
            key = "%s %s" % (ev["route"], ev["status"])
            expected[key] = expected.get(key, 0) + 1
        self.assertEqual(shown, expected)
        self.assertEqual(expected["hook:flaky dead"], 1)
        self.assertEqual(len(expected), 7, "one event from each of the seven routes")
        dead_rows = page.eval("[...document.querySelectorAll('table.events tbody tr')].map(r => r.innerText)")
        self.assertEqual(len(dead_rows), 1)
        self.assertIn("hook:flaky", dead_rows[0])
        subs = page.eval("[...document.querySelectorAll('table.subscriptions tbody tr')].map("
                         "r => [r.children[0].textContent, r.children[5].textContent])")
        self.assertEqual(subs, [["iconik", "up"], ["iconik", "up"]])
        self.screenshot(page, "console-overview.png")

    def test_3_a_dead_event_shows_its_error_and_retry_makes_it_done_with_javascript_off(self):
        event_id = D["ids"]["flaky"]
        page = self.logged_in("/ui/events/%d" % event_id, javascript=False)
        error = page.eval("document.querySelector('pre.error').textContent")
        self.assertEqual(error, D["d"].event(event_id)["last_error"])
        self.assertIn("exit", error)
        open(D["marker"], "w").close()
        self.assertEqual(page.click("form[action$='/retry'] button"), 200)
        self.assertEqual(page.eval("location.pathname + location.search"), "/ui/events/%d?done=retried" % event_id)
        self.assertIn("Queued again", page.eval("document.querySelector('.notice').textContent"))
        done = D["d"].wait_status(event_id, "done", timeout=30)
        self.assertEqual(done["note"], "retried by hand")

    def test_4_an_html_payload_renders_as_text(self):
        page = self.logged_in("/ui/events/%d" % D["ids"]["demo"])
        self.assertIn(json.dumps(XSS), page.eval("document.querySelector('pre.payload').textContent"))
        self.assertNotEqual(page.eval("document.title"), "pwned")
        self.assertEqual(page.eval("document.querySelectorAll('main script, main img').length"), 0)

    def test_5_the_ixon_clip_plays_in_its_video_element(self):
        page = self.logged_in("/ui/events/%d" % D["ids"]["ixon"])
        size = page.eval("""new Promise((resolve, reject) => {
            const v = document.querySelector('video');
            const done = () => resolve([v.videoWidth, v.videoHeight, Math.round(v.duration)]);
            if (v.readyState >= 2) { done(); } else { v.addEventListener('loadeddata', done); }
            v.addEventListener('error', () => reject(new Error('video error ' + v.error.code)));
            setTimeout(() => reject(new Error('no video data in 20 s')), 20000); })""")
        self.assertEqual(size, [320, 240, 2])
        link = page.eval("document.querySelector('figure.clip a[download]').getAttribute('href')")
        self.assertEqual(link, page.eval("document.querySelector('video').getAttribute('src')") + "?download=1")
        self.screenshot(page, "console-ixon-event.png")


if __name__ == "__main__":
    unittest.main()
