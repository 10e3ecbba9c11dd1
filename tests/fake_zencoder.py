"""A loopback Zencoder for tests: the job API hookd calls, and the notifications Zencoder sends.

Strategy: ``FakeZencoder`` is a ``FakeUpstream`` whose ``respond`` plays Zencoder's API v2 as described in
/work/shared/reference/upstreams.md §5.1 and §5.5: ``POST /api/v2/jobs`` needs ``Zencoder-Api-Key``
(else 401), answers 422 ``{"errors": [...]}`` for an invalid body and 201 ``{"id", "outputs": [{"id",
"label", "url"}]}`` otherwise; ``GET /api/v2/jobs/{id}/progress`` reports the job. ``fail_next`` scripts
outages (503, or 403 "Rate Limit Exceeded"). The other direction: ``notification()`` builds a notification
in the real captured shape of §5.2 (integer ids, ``format: "mpeg4"`` for mp4), and ``notify()`` POSTs it
to a notification URL like Zencoder does (JSON, the secret header or the URL's basic-auth credentials),
retrying on a connection error or a non-2xx answer with a short schedule.
"""

import base64
import itertools
import json
import re
import threading
import time
import urllib.parse

from tests import support

API_KEY = "zk-test-key"
ZENCODER_FORMATS = {"mp4": "mpeg4"}  # what a notification calls the output format
OUTPUT_KEYS = {"format", "url", "size", "width", "height", "upscale", "label", "notifications",
               "video_codec", "audio_codec", "quality", "public", "headers"}


class FakeZencoder(support.FakeUpstream):
    """Zencoder's job API on 127.0.0.1. ``jobs`` {id: request body}; ``strict`` rejects unknown output
    keys (such as pillar's ``witdh`` typo) with 422; ``fail_next`` [(status, body)] answered first."""

    def __init__(self, api_key=API_KEY, strict=True):
        self.api_key, self.strict = api_key, strict
        self.jobs, self.fail_next = {}, []
        self._ids = itertools.count(447043841)
        self._output_ids = itertools.count(1656104422)
        self._jobs_lock = threading.Lock()
        super().__init__(respond=self._respond)
        self.api_url = self.url + "/api/v2"

    def _respond(self, rec):
        with self._jobs_lock:
            if self.fail_next:
                return self.fail_next.pop(0)
        if rec.headers.get("zencoder-api-key") != self.api_key:
            return 401, {"errors": ["Invalid API key"]}
        if rec.method == "POST" and rec.path == "/api/v2/jobs":
            return self._create(rec)
        m = re.match(r"^/api/v2/jobs/(\d+)/progress$", rec.path)
        if rec.method == "GET" and m and int(m.group(1)) in self.jobs:
            return 200, {"state": "processing", "progress": 50.0, "input": {"state": "finished"},
                         "outputs": [{"id": o["id"], "state": "processing", "progress": 50.0,
                                      "current_event": "Transcoding"} for o in self.jobs[int(m.group(1))]["_outputs"]]}
        return 404, {"errors": ["Not found"]}

    def _create(self, rec):
        try:
            body = rec.json()
        except ValueError:
            return 422, {"errors": ["Body is not valid JSON"]}
        errors = self.job_errors(body)
        if errors:
            return 422, {"errors": errors}
        job_id = next(self._ids)
        outputs = [{"id": next(self._output_ids), "label": o.get("label"), "url": o.get("url")}
                   for o in body["outputs"]]
        with self._jobs_lock:
            self.jobs[job_id] = dict(body, _outputs=outputs)
        return 201, {"id": job_id, "outputs": outputs}

    def job_errors(self, body):
        """Zencoder-style validation messages for a job body ([] when valid)."""
        if not isinstance(body, dict) or not isinstance(body.get("input"), str) or not body["input"]:
            return ["Input can't be blank"]
        outputs = body.get("outputs")
        if not isinstance(outputs, list) or not outputs:
            return ["Outputs must be a non-empty list"]
        errors = []
        for i, out in enumerate(outputs):
            if not isinstance(out, dict):
                errors.append("Output %d is not an object" % i)
                continue
            if "size" in out and not re.match(r"^\d+x\d+$", str(out["size"])):
                errors.append("Output %d: size must be WIDTHxHEIGHT" % i)
            unknown = sorted(set(out) - OUTPUT_KEYS)
            if self.strict and unknown:
                errors.append("Output %d: unknown settings %s" % (i, ", ".join(unknown)))
        return errors


# -- notifications, in the shape Zencoder really sends (upstreams.md §5.2) -----------------------------

def output_entry(output_id, fmt, width, height, state="finished", size=6050358, duration_ms=100840,
                 error=None, url=None):
    """One element of a notification's ``outputs``; ``width=None`` leaves width and height out."""
    entry = {"id": output_id, "label": None, "state": state, "type": "standard",
             "format": ZENCODER_FORMATS.get(fmt, fmt),
             "url": url or "gcs://59d69c94f488551661254569/_/%s-%s.%s" % (output_id, fmt, fmt),
             "file_size_in_bytes": size, "duration_in_ms": duration_ms, "frame_rate": 25.0,
             "video_codec": "h264", "video_bitrate_in_kbps": 479, "total_bitrate_in_kbps": 479,
             "rfc_6381_video_codec": "avc1.420028", "audio_codec": None, "md5_checksum": None,
             "fragment_duration_in_ms": None}
    if width is not None:
        entry["width"], entry["height"] = width, height
    if error is not None:
        entry["error"] = error
        entry["error_message"] = error
        for key in ("file_size_in_bytes", "duration_in_ms", "url"):
            entry.pop(key)
    return entry


def notification(job_id, state, outputs=()):
    """A job notification: ``job`` (integer id, state), ``input`` media info, ``outputs``."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"job": {"id": job_id, "state": state, "created_at": "2018-01-23T15:16:17Z",
                    "submitted_at": "2018-01-23T15:16:17Z", "updated_at": stamp,
                    "pass_through": None, "test": False},
            "input": {"id": 447014781, "state": "finished", "format": "matroska", "duration_in_ms": 100840,
                      "file_size_in_bytes": 39283494, "width": 1920, "height": 1080, "frame_rate": 25.0,
                      "video_codec": "h264", "video_bitrate_in_kbps": 3054, "audio_codec": None,
                      "md5_checksum": None},
            "outputs": list(outputs)}


def job_notification(fake, job_id, state, sizes=None, output_state=None, errors=None):
    """A notification for a job created on ``fake``: one output per requested output, with the ids the
    fake gave. ``sizes`` {n: bytes}; ``errors`` {n: text} makes output n failed; n is 0-based."""
    job = fake.jobs[job_id]
    outputs = []
    for n, (req, made) in enumerate(zip(job["outputs"], job["_outputs"])):
        width, height = (int(v) for v in req["size"].split("x"))
        err = (errors or {}).get(n)
        outputs.append(output_entry(made["id"], req["format"], width, height,
                                    state="failed" if err else (output_state or state),
                                    size=(sizes or {}).get(n, 6050358 + n), error=err))
    return notification(job_id, state, outputs)


def notify(url, payload, secret=None, schedule=(0.05, 0.1, 0.2), extra_headers=None, raw=None):
    """POST ``payload`` to ``url`` as Zencoder does and return the last (status, headers, body).

    The secret goes in ``X-Zencoder-Notification-Secret`` when given; credentials in the URL
    (``http://user:pass@host/...``) become an ``Authorization: Basic`` header. A connection error or a
    non-2xx answer is tried again after each delay of ``schedule`` (Zencoder queues failed notifications);
    pass ``schedule=()`` to see a refusal at once. ``raw`` sends those bytes instead of the JSON."""
    url, headers = split_credentials(url)
    headers["Content-Type"] = "application/json"
    if secret is not None:
        headers["X-Zencoder-Notification-Secret"] = secret
    headers.update(extra_headers or {})
    body = raw if raw is not None else json.dumps(payload).encode("utf-8")
    answer = None
    for delay in (0,) + tuple(schedule):
        time.sleep(delay)  # Zencoder's retry schedule, not a wait for a condition
        try:
            answer = support.post(url, body, headers)
        except OSError:
            continue
        if 200 <= answer[0] < 300:
            break
    if answer is None:
        raise AssertionError("could not reach %s" % url)
    return answer


def split_credentials(url):
    """(url without user:password, headers with the matching ``Authorization: Basic``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, {}
    pair = "%s:%s" % (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
    netloc = parts.hostname + (":%d" % parts.port if parts.port else "")
    auth = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), {"Authorization": auth}


def rebase(notification_url, daemon_url):
    """The job's notification URL pointed at the test daemon: its credentials and path, the daemon's host."""
    parts = urllib.parse.urlsplit(notification_url)
    target = urllib.parse.urlsplit(daemon_url)
    creds = ""
    if parts.username is not None:
        creds = parts.username + (":" + parts.password if parts.password is not None else "") + "@"
    return urllib.parse.urlunsplit(parts._replace(scheme=target.scheme, netloc=creds + target.netloc))
