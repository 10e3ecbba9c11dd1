"""A loopback stand-in for Camio (upstreams.md §3.5), and real JPEG frames for it to send.

Strategy: ``FakeCamio`` is a ``support.FakeUpstream`` whose ``respond`` function plays Camio's two
inbound endpoints: ``POST /api/users/me/hooks`` (needs ``Authorization: token <t>``, else 401; echoes
the hook with a generated ``id``, 200 ``application/json; charset=UTF-8`` with ``=`` escaped as
``\\u003d`` like the captured answer) and ``POST /labels/<event>``, the per-event callback, which records
the JSON and answers 200 when ``status`` is present and ``labels`` is an object or a list (400 otherwise).
``hold(event, status)`` makes a callback answer ``status`` until ``release(event)``; ``fail_next`` answers
the next N calls with a status. Outbound (the fake acting as Camio): ``task()`` builds the payload Camio
POSTs to a hook (``callback_url`` back at the fake, ``user_id``, ``camera``, ``images[]`` of base64 JPEG
bytes, either timestamp form). ``make_frames`` renders the frames with the real ffmpeg.
"""

import base64
import itertools
import json
import os
import subprocess
import threading

from tests.support import FakeUpstream

# name -> lavfi source: what each frame must look like to the stats labeler
FRAMES = {
    "colour": "testsrc=size=320x240:rate=1",                                  # saturated, mid luma: no label
    "night": "color=c=0x181818:size=320x240,noise=alls=20:allf=t,format=gray",  # grey-scale and dark
    "bright": "color=c=0xF8F0C8:size=320x240",                                # luma ~238, some colour
    "moved": "testsrc=size=320x240:rate=1,drawbox=x=100:y=60:w=120:h=120:color=white:t=fill",
}


def make_frames(directory):
    """Render FRAMES as JPEG files with ffmpeg; return {name: jpeg bytes}."""
    out = {}
    for name, source in FRAMES.items():
        path = os.path.join(directory, name + ".jpg")
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", source,
                        "-frames:v", "1", "-pix_fmt", "yuvj420p", path], check=True, timeout=60)
        with open(path, "rb") as f:
            out[name] = f.read()
    return out


def image(jpeg, timestamp, legacy=False):
    """One element of images[]: the 2017-05-04 form has timestamp {"meta_class", "date"}."""
    ts = {"meta_class": "datetime.datetime", "date": timestamp} if legacy else timestamp
    return {"type": "image/jpeg", "size": [320, 240], "timestamp": ts,
            "image_b64": base64.b64encode(jpeg).decode("ascii")}


class FakeCamio:
    """Camio's side: hook registration and per-event label callbacks, on 127.0.0.1."""

    def __init__(self, token="dev-token"):
        self.token = token
        self.hooks = []
        self._held = {}
        self._fail = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.up = FakeUpstream(respond=self._respond)
        self.url = self.up.url
        self.port = self.up.port

    def close(self):
        self.up.close()

    # -- what the tests steer ------------------------------------------------------------------------

    def callback_url(self, event, host="127.0.0.1"):
        return "http://%s:%d/labels/%s" % (host, self.port, event)

    def task(self, event, images, camera="cam1", user_id="user-1", host="127.0.0.1"):
        """The JSON Camio POSTs to a hook for one event."""
        return {"callback_url": self.callback_url(event, host), "user_id": user_id, "camera": camera,
                "images": images}

    def hold(self, event, status=503, headers=None):
        """Answer /labels/<event> with ``status`` (and ``headers``, e.g. a Location) until release()."""
        with self._lock:
            self._held[event] = (status, headers or {})

    def release(self, event):
        with self._lock:
            self._held.pop(event, None)

    def fail_next(self, event, count, status=503):
        with self._lock:
            self._fail[event] = [status] * count

    def labels_posted(self, event):
        """Every request that reached /labels/<event>, oldest first."""
        return [r for r in list(self.up.seen) if r.path == "/labels/" + event]

    # -- Camio's endpoints ---------------------------------------------------------------------------

    def _respond(self, rec):
        if rec.method == "POST" and rec.path == "/api/users/me/hooks":
            return self._create_hook(rec)
        if rec.method == "POST" and rec.path.startswith("/labels/"):
            return self._labels(rec, rec.path[len("/labels/"):])
        return 404, b"not found", {"Content-Type": "text/plain"}

    def _create_hook(self, rec):
        if rec.headers.get("authorization") != "token " + self.token:
            return 401, b'{"error": "unauthorized"}', {"Content-Type": "application/json"}
        try:
            body = rec.json()
        except ValueError:
            return 400, b"bad json", {"Content-Type": "text/plain"}
        hook = {"id": "ag1zfmNhbWlvbG9nZ2VyHook%d" % next(self._ids), "type": body.get("type"),
                "parsed_query": body.get("parsed_query"), "callback_url": body.get("callback_url")}
        self.hooks.append(hook)
        text = json.dumps(hook).replace("=", "\\u003d")
        return 200, text.encode("utf-8"), {"Content-Type": "application/json; charset=UTF-8"}

    def _labels(self, rec, event):
        with self._lock:
            if event in self._held:
                status, headers = self._held[event]
                return status, b"", headers
            pending = self._fail.get(event)
            if pending:
                return pending.pop(0), b"", {}
        try:
            body = rec.json()
        except ValueError:
            return 400, b"bad json", {"Content-Type": "text/plain"}
        if not isinstance(body, dict) or "status" not in body or not isinstance(body.get("labels"), (dict, list)):
            return 400, b"bad labels", {"Content-Type": "text/plain"}
        return 200, b"", {}
