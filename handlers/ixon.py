"""IXON Cloud Notify alarms: record a clip from the IP camera next to the alarming machine.

Wire contract. IXON Cloud forwards every message of a user's message centre (Cloud Notify alarms among
them) as an HTTPS POST to a webhook URL; its webhook form has only a name and a URL
(https://www.ixon.cloud/knowledge-hub/expand-your-services-using-webhooks). It signs nothing, so the URL
carries the secret: ``POST /ixon/webhook/{key}``, ``key`` compared in constant time and never logged (a
wrong key is 401, no key 404); ``allow.from`` may also limit the client addresses (403). The body is the
message: a JSON object with ``createdOn`` and ``extraInfo["Device name"]`` (422 without them), or a JSON
string holding that object, as job-van-schipstal/video_store_service (``test_post.py``,
``video_store_service/__main__.py``) sent it. Camera access goes through the IXON API v2
(https://developer.ixon.cloud/docs/ixon-api-authentication-headers: headers ``Api-Version: 2``,
``Api-Application``, ``Api-Company``, ``Authorization: Bearer``; ``POST /access-tokens`` with Basic
``email:otp:password`` answers 201 ``data.secretId``; ``POST /web-access`` ``{"server": {"publicId"}}``
answers 201 ``data.url``, whose GET sets the auth cookie for the camera behind it), or straight to
``stream.url``.

Strategy: ``accept`` checks the client address, the key, the body (the core's ``Request.json``), and
answers 503 + Retry-After when ``queue_size`` recordings are already waiting, so nothing is dropped
silently. Each event's serial key is the camera, so one camera is never recorded twice at once;
``max_parallel`` bounds recordings overall. ``run`` waits for ``min_free_mb`` of free space, finds the
stream through ``IxonApi`` (token configured, or a cached login) and lets the supervised ffmpeg in
``hookd_core.ffmpeg`` read the URL itself, with the cookie and camera credentials as ffmpeg options. The
clip is ``video.dir/<createdOn, : → ->_<device name>.mp4``, appears only when complete, and is deleted by
the daily prune after ``video.keep_days``.
"""

import base64
import hashlib
import json
import os
import re
import sys
import threading
import time
import urllib.parse

from hookd_core import client, ffmpeg, verify
from hookd_core.api import (REQUIRED, BadPayload, Busy, Fail, Files, Forbidden, Integration,
                            NewEvent, Retry, json_or_none, path_segment)
from hookd_core.config import ConfigError

PREFIX = "/ixon/webhook/"
API_TIMEOUT = 20           # seconds for one IXON API call
TOKEN_LIFETIME = 3600      # seconds a login token is asked to live (IXON allows 60..5184000)
TOKEN_SLACK = 120          # renew a cached token this long before it expires
MAX_PAGES = 50             # list pages followed by ixon-configure (moreAfter paging)
NAME_RE = re.compile(r"[^A-Za-z0-9_.-]")
AUTH_MODES = ("none", "basic", "digest")
STREAM_SCHEMES = ("http", "https", "rtsp", "rtsps")


# -- the message and the file name (pure functions) ----------------------------------------------------

def parse_message(req):
    """The IXON message of a request: a JSON object, or a JSON string containing one."""
    msg = req.json()
    if isinstance(msg, str):
        msg = json_or_none(msg.encode("utf-8"))
    if not isinstance(msg, dict):
        raise BadPayload("the IXON message must be a JSON object (or a JSON string holding one)")
    created, device = msg.get("createdOn"), device_name(msg)
    if not isinstance(created, str) or not created.strip():
        raise BadPayload("the IXON message has no createdOn")
    if not device:
        raise BadPayload('the IXON message has no extraInfo["Device name"]')
    return msg


def device_name(msg):
    extra = msg.get("extraInfo")
    name = extra.get("Device name") if isinstance(extra, dict) else None
    return name.strip() if isinstance(name, str) and name.strip() else None


def clip_name(msg):
    """``<createdOn with : → ->_<device name with spaces → _>.mp4``, only ``[A-Za-z0-9_.-]``, as the
    original service named them (2019-08-29T12-26-24_Project_D4_Alarming_machine.mp4)."""
    raw = "%s_%s" % (msg["createdOn"].strip().replace(":", "-"), device_name(msg).replace(" ", "_"))
    name = NAME_RE.sub("", raw).lstrip(".")[:200] or "clip"
    return name + ".mp4"


def for_device(template, device):
    """``template`` with ``{device}`` replaced by the alarming device's name as in clip names (spaces as
    ``_``, only ``[A-Za-z0-9_.-]``), so one [ixon] section can serve a camera per machine."""
    if "{device}" not in template:
        return template
    return template.replace("{device}", NAME_RE.sub("", (device or "").replace(" ", "_")).lstrip(".") or "unknown")


def with_credentials(url, username, password):
    """``url`` with ``user:password@`` in it (percent-encoded), which ffmpeg uses for basic and digest."""
    parts = urllib.parse.urlsplit(url)
    userinfo = urllib.parse.quote(username, safe="") + ":" + urllib.parse.quote(password, safe="")
    netloc = userinfo + "@" + parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def behind_webaccess(webaccess_url, stream_path):
    """The camera path behind a web-access URL: its query (``?auth=...``) dropped, the path appended."""
    base = webaccess_url.split("?", 1)[0].split("#", 1)[0]
    return base.rstrip("/") + "/" + stream_path.lstrip("/")


def cookies_of(reply):
    """``name=value`` pairs from every Set-Cookie header of an client.Reply."""
    pairs = []
    for header in reply.headers.get_all("Set-Cookie") or []:
        first = header.split(";", 1)[0].strip()
        if "=" in first and first.split("=", 1)[0].strip():
            pairs.append(first)
    return pairs


# -- IXON API v2 client ---------------------------------------------------------------------------------

class IxonApi(client.Api):
    """Calls to the IXON API v2 with the ``Api-*`` headers and a bearer token (configured, or obtained by
    logging in and cached until shortly before it expires; a login token refused with 401 is renewed once)."""

    REFUSED = "[ixon] token (or email, password and otp), api.application and company"

    def __init__(self, conf):
        super().__init__(conf.get("api.url"), API_TIMEOUT)
        self.conf = conf
        self._lock = threading.Lock()
        self._token, self._expires = None, 0.0
        self.logins = 0

    def headers(self):
        return {"Accept": "application/json", "Api-Version": "2",
                "Api-Application": self.conf.get("api.application")}

    def token(self, fresh=False):
        if self.conf.get("token"):
            return self.conf.get("token")
        with self._lock:
            if fresh or not self._token or time.time() > self._expires - TOKEN_SLACK:
                self._token, self._expires = self._login(), time.time() + TOKEN_LIFETIME
            return self._token

    def _login(self):
        """``POST /access-tokens`` with Basic base64(email:otp:password) → 201 data.secretId."""
        if not (self.conf.get("email") and self.conf.get("password")):
            raise Fail("[ixon] needs token, or email and password")
        cred = "%s:%s:%s" % (self.conf.get("email"), self.conf.get("otp") or "", self.conf.get("password"))
        basic = "Basic " + base64.b64encode(cred.encode("utf-8")).decode("ascii")
        reply = self.call("POST", "/access-tokens?fields=secretId", {"expiresIn": TOKEN_LIFETIME},
                          headers={"Authorization": basic})
        self.logins += 1
        data = _data(client.check(reply, "IXON login", self.REFUSED))
        secret = data.get("secretId") if isinstance(data, dict) else None
        if isinstance(secret, str) and secret:
            return secret
        raise Retry("IXON login answered %d without a secretId" % reply.status)

    def request(self, method, path, body=None, company=True):
        """One authorised call; the 2xx Reply, or ``client.check``'s mapping. Renews a login token once
        on 401. ``company``: True the configured company, a string that one, False none."""
        company = self.conf.get("company") if company is True else company
        for attempt in (1, 2):
            h = {"Authorization": "Bearer " + self.token(fresh=attempt == 2)}
            if company:
                h["Api-Company"] = company
            reply = self.call(method, path, body, headers=h)
            if reply.status == 401 and attempt == 1 and not self.conf.get("token"):
                continue
            return client.check(reply, "IXON %s %s" % (method, path.split("?")[0]), self.REFUSED)

    def web_access_url(self, server):
        """``POST /web-access`` for the server's publicId → the URL of a web-access session."""
        data = _data(self.request("POST", "/web-access", {"server": {"publicId": server}}))
        if isinstance(data, list):
            data = data[0] if data else None
        url = data.get("url") if isinstance(data, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise Retry("IXON web-access answer has no usable url")
        return url

    def listing(self, path, company=True):
        """Every item of a list endpoint, following ``moreAfter`` paging."""
        items, after = [], None
        for _ in range(MAX_PAGES):
            sep = "&" if "?" in path else "?"
            page = path + (sep + "page-after=" + urllib.parse.quote(after) if after else "")
            body = self.request("GET", page, company=company).json()
            data = body.get("data") if isinstance(body, dict) else None
            items += [d for d in (data or []) if isinstance(d, dict)]
            after = body.get("moreAfter") if isinstance(body, dict) else None
            if not after:
                break
        return items


def _data(reply):
    body = reply.json()
    return body.get("data") if isinstance(body, dict) else None


# -- the integration -----------------------------------------------------------------------------------

class Handler(Integration):
    SECTION = "ixon"
    route = PREFIX + "{key}"
    KEYS = {
        "key": REQUIRED,
        "allow.from": "",
        "video.keep_days": "0",
        "api.url": "https://portal.ixon.cloud/api",
        "api.application": "",
        "company": "",
        "token": "",
        "email": "",
        "password": "",
        "otp": "",
        "webaccess.server": "",
        "stream.path": "/video.mjpg",
        "stream.url": "",
        "camera.auth": "none",
        "camera.username": "",
        "camera.password": "",
        "duration": "10",
        "framerate": "auto",
        "recode": "true",
        "video.dir": "",
        "queue_size": "10",
        "max_parallel": "1",
        "stall_timeout": "10",
        "time_margin": "15",
    }
    SECRET_KEYS = ("key", "token", "password", "otp", "camera.password")

    def __init__(self, name, conf, core):
        super().__init__(name, conf, core)
        self.api = IxonApi(conf)
        try:
            self.allowed, self.allow_problem = verify.networks(conf.get("allow.from")), None
        except ValueError as e:
            self.allowed, self.allow_problem = [], "[%s] allow.from: %s" % (name, e)
        self.duration = _number(conf, "duration", 10.0)
        self.stall_timeout = _number(conf, "stall_timeout", 10.0)
        self.margin = _number(conf, "time_margin", 15.0)
        self.max_parallel = max(1, int(_number(conf, "max_parallel", 1)))
        self.queue_size = max(1, int(_number(conf, "queue_size", 10)))
        # API calls + connect + the clip + ffmpeg's grace and margin; the watchdog must not beat ffmpeg's own.
        self.job_timeout = int(4 * API_TIMEOUT + self.stall_timeout + self.duration + self.margin + 30)

    # -- configuration -------------------------------------------------------------------------------
    def check(self):
        c, problems = self.conf, []
        if "/" in (c.get("key") or ""):
            problems.append("[%s] key must not contain '/' (it is a path segment)" % self.name)
        if self.allow_problem:
            problems.append(self.allow_problem)
        for key in ("duration", "stall_timeout", "time_margin", "queue_size", "max_parallel"):
            if _number(c, key, None) is None or _number(c, key, 0) <= 0:
                problems.append("[%s] %s must be a positive number" % (self.name, key))
        if _number(c, "video.keep_days", None) is None or _number(c, "video.keep_days", 0) < 0:
            problems.append("[%s] video.keep_days must be 0 (keep) or a number of days" % self.name)
        rate = (c.get("framerate") or "auto").strip().lower()
        if rate != "auto" and (_float(rate) is None or _float(rate) <= 0):
            problems.append("[%s] framerate must be auto or a positive number" % self.name)
        try:
            c.bool("recode")
        except ConfigError as e:
            problems.append(str(e))
        if (c.get("camera.auth") or "none").strip().lower() not in AUTH_MODES:
            problems.append("[%s] camera.auth must be one of %s" % (self.name, ", ".join(AUTH_MODES)))
        problems += self._check_source()
        problems += ["[%s] %s is not installed (needed to record)" % (self.name, p) for p in ffmpeg.which()]
        return problems

    def _check_source(self):
        c = self.conf
        if c.get("stream.url"):
            scheme = urllib.parse.urlsplit(c.get("stream.url")).scheme.lower()
            if scheme not in STREAM_SCHEMES:
                return ["[%s] stream.url must be http(s):// or rtsp(s)://" % self.name]
            return []
        missing = [k for k in ("api.url", "api.application", "company", "webaccess.server") if not c.get(k)]
        if not c.get("token") and not (c.get("email") and c.get("password")):
            missing.append("token (or email and password)")
        return ["[%s] %s is required unless stream.url is set" % (self.name, k) for k in missing]

    # -- request thread ------------------------------------------------------------------------------
    def match(self, path):
        return path_segment(path, PREFIX) is not None

    def accept(self, req):
        if self.allowed and not verify.client_allowed(req.client, self.allowed):
            raise Forbidden("client %s is not in allow.from" % req.client)
        verify.path_secret(path_segment(req.path, PREFIX), self.conf.get("key"))
        msg = parse_message(req)
        waiting = self.core.waiting()
        if waiting >= self.queue_size:
            raise Busy("%d recordings already waiting (queue_size = %d)" % (waiting, self.queue_size),
                       retry_after=max(5, int(self.duration)))
        key = None
        if not self.conf.get("dedupe"):  # the same alarm sent twice, as object or as string: one clip
            key = "ixon:" + hashlib.sha256(json.dumps(msg, sort_keys=True).encode("utf-8")).hexdigest()
        return [NewEvent(payload=msg, dedupe_key=key, serial_key=self.camera_key(device_name(msg)))]

    def camera_key(self, device=None):
        """One string per camera, so the core never runs two recordings of it at once."""
        if self.conf.get("stream.url"):
            return "camera:" + client.redact_url(for_device(self.conf.get("stream.url"), device))
        return "webaccess:" + for_device(self.conf.get("webaccess.server") or "", device)

    # -- worker thread -------------------------------------------------------------------------------
    def run(self, ctx):
        msg = ctx.payload
        if not isinstance(msg, dict) or not device_name(msg) or not msg.get("createdOn"):
            raise Fail("stored event is not an IXON message")
        self.core.need_space(self.video_dir())
        out = os.path.join(self.video_dir(), clip_name(msg))
        clip = self.record(out, ctx.stopping, ctx.log, device=device_name(msg))
        ctx.product("clip", path=clip.path)
        ctx.action_input = {"file": clip.path, "duration": round(clip.duration, 2),
                            "device": device_name(msg), "createdOn": msg.get("createdOn"),
                            "stopped_early": clip.stopped_early, "message": msg}
        note = "recorded %s (%.1f s)" % (os.path.basename(clip.path), clip.duration)
        return note + (", stopped early by shutdown" if clip.stopped_early else "")

    def record(self, out_path, stopping, log, overwrite=False, duration=None, device=None):
        """Find the stream (of ``device``'s camera) and record one clip into ``out_path``; returns ffmpeg.Clip."""
        input_args, secrets = self.stream_input(log, device)
        return ffmpeg.record(input_args, out_path, duration or self.duration,
                             recode=self.conf.bool("recode"), framerate=self.conf.get("framerate"),
                             stopping=stopping, margin=self.margin, stall_timeout=self.stall_timeout,
                             overwrite=overwrite, secrets=secrets, log=log)

    def video_dir(self):
        d = self.conf.get("video.dir") or os.path.join(self.core.state_dir, "videos")
        return os.path.abspath(d)

    def files(self):
        return [Files(self.video_dir(), (".mp4",), _number(self.conf, "video.keep_days", 0), "clip")]

    def stream_input(self, log=None, device=None):
        """ffmpeg input options ending in ``-i URL``, and the secrets in them (for redaction)."""
        c = self.conf
        secrets = [c.get("camera.password"), c.get("token")]
        headers = []
        if c.get("stream.url"):
            url = for_device(c.get("stream.url"), device)
        else:
            url, cookies = self.open_webaccess(device)
            headers.append("Cookie: " + "; ".join(cookies))
            secrets += [p.split("=", 1)[1] for p in cookies] + [url.split("?", 1)[-1]]
            url = behind_webaccess(url, c.get("stream.path") or "/")
        if log:
            log.info("recording from %s", client.redact_url(url))
        return camera_input(url, c, headers, self.stall_timeout), secrets

    def open_webaccess(self, device=None):
        """A web-access session for ``webaccess.server``: its URL and the auth cookie(s) it sets."""
        url = self.api.web_access_url(for_device(self.conf.get("webaccess.server"), device))
        reply = client.request("GET", url, timeout=API_TIMEOUT)  # a redirect is not followed: we want its cookie
        cookies = cookies_of(reply)
        if reply.status >= 400 or not cookies:
            raise Retry("IXON web-access URL answered %d%s" % (
                reply.status, "" if cookies else " without an auth cookie"))
        return url, cookies

    def card(self, ctx):
        msg = ctx.payload if isinstance(ctx.payload, dict) else {}
        info = ctx.action_input or {}
        return {"title": "IXON alarm: %s" % (device_name(msg) or "?"),
                "facts": [("device", device_name(msg) or "?"), ("created", str(msg.get("createdOn"))),
                          ("clip", os.path.basename(info.get("file") or "") or "-")],
                "text": str(msg.get("shortContent") or "")}


def camera_input(url, conf, headers=(), stall_timeout=10):
    """Input options for ffmpeg: camera credentials in the URL (ffmpeg answers basic and digest
    challenges itself; ``-auth_type basic`` sends basic at once), extra headers, an I/O timeout twice the
    stall timeout (the supervisor's stall check acts first), and RTSP over TCP."""
    auth = (conf.get("camera.auth") or "none").strip().lower()
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    args = []
    if auth in ("basic", "digest") and conf.get("camera.username"):
        url = with_credentials(url, conf.get("camera.username"), conf.get("camera.password") or "")
    if scheme in ("http", "https"):
        if auth == "basic":
            args += ["-auth_type", "basic"]
        if headers:
            args += ["-headers", "".join(h + "\r\n" for h in headers)]
        args += ["-rw_timeout", str(int(stall_timeout * 2 * 1000000))]
    elif scheme in ("rtsp", "rtsps"):
        args += ["-rtsp_transport", "tcp"]
    return args + ["-i", url]


def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _number(conf, key, default):
    value = _float(conf.get(key))
    return default if value is None else value


# -- CLI: test-recording and ixon-configure ------------------------------------------------------------

def test_recording(handler, argv):
    """``test-recording [--out FILE]``: record one clip now; print its path and ffprobe duration."""
    import argparse
    parser = argparse.ArgumentParser(prog="hookd.py test-recording")
    parser.add_argument("--out", help="file to write (default: video.dir/test.mp4, replaced)")
    parser.add_argument("--device", help="the device name {device} in stream.url / webaccess.server stands for")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out or os.path.join(handler.video_dir(), "test.mp4"))
    try:
        clip = handler.record(out, threading.Event(), handler.core.log, overwrite=True, device=args.device)
    except (Retry, Fail) as e:
        print("hookd: test recording failed: %s" % e, file=sys.stderr)
        return 1
    print(clip.path)
    print("duration %.2f s" % clip.duration)
    return 0


def ixon_configure(handler, argv):
    """``ixon-configure``: list companies, their agents and the agents' servers with publicIds."""
    api = handler.api
    try:
        companies = api.listing("/companies?fields=publicId,name", company=False)
        chosen = handler.conf.get("company")
        for comp in companies:
            print("company %s  %s" % (comp.get("publicId"), comp.get("name", "")))
            if chosen and comp.get("publicId") != chosen:
                print("  (not the configured company; set company = %s to use it)" % comp.get("publicId"))
                continue
            _print_agents(api, comp.get("publicId"))
    except (Retry, Fail) as e:
        print("hookd: IXON API: %s" % e, file=sys.stderr)
        return 1
    print("put the camera's server publicId in [ixon] webaccess.server, the company in company")
    return 0


def _print_agents(api, company):
    for agent in api.listing("/agents?fields=publicId,name", company=company):
        print("  agent %s  %s" % (agent.get("publicId"), agent.get("name", "")))
        path = "/agents/%s/servers?fields=publicId,name" % urllib.parse.quote(
            str(agent.get("publicId")), safe="")
        for server in api.listing(path, company=company):
            print("    server %s  %s" % (server.get("publicId"), server.get("name", "")))


Handler.COMMANDS = {"test-recording": test_recording, "ixon-configure": ixon_configure}
